"""The command line and the runner of bench.gpu_check.

    python -m bench.gpu_check [--size 1b] [--out runs/gpu_check/report.json] [--only kernels,step]
    python -m bench.gpu_check --dry-run          # every section at toy size, on a CPU too

Each section is a function ``run(ctx, rec)`` (its module says what it checks); the runner calls it
under its own time limit (SIGALRM on the main thread: a section past its limit is stopped between
two Python statements, and what it recorded so far stays in the report), catches whatever it raises,
writes the report after it and goes on with the next. The table at the end gives one line a
section; the exit code is 1 when a correctness section failed, 0 otherwise (skips do not fail).
"""
from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
import tempfile
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from bench.gpu_check.model import GPU_WORKLOAD, SIZES, TOY_WORKLOAD, Workload, write_model_folder
from bench.gpu_check.report import Report, SectionRecord, Skip, exit_code, table

NO_CUDA = ("bench.gpu_check: needs a CUDA device, and torch sees none here (torch.cuda.is_available() is False); "
           "on a CPU, `python -m bench.gpu_check --dry-run` runs every section at toy size")


@dataclass
class Context:
    """What every section shares: the device, the sizes, a work folder and the model folder (written
    once, on first use)."""

    device: torch.device
    dry_run: bool
    size: str
    workload: Workload
    work: str
    warmup: int
    steps: int
    seed: int = 0
    cpu_compile: bool = False  # --compile in a CPU dry run (inductor takes ~20 s there; off by default)
    fsdp_ranks: int | None = None  # override the rank count of the fsdp section (tests: 2 gloo ranks)
    fsdp_settings: tuple | None = None  # the fsdp section's precisions (default: all; tests: one)
    log: object = print
    _model_dir: str | None = field(default=None, repr=False)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def shape(self):
        return SIZES[self.size]

    def model_dir(self) -> str:
        folder = os.path.join(self.work, f"model-{self.size}")
        if self._model_dir is None and os.path.isfile(os.path.join(folder, "done")):
            self._model_dir = folder  # written by an earlier section's process (--isolate)
        if self._model_dir is None:
            t0 = time.perf_counter()
            self._model_dir = write_model_folder(self.shape, folder, self.device, seed=self.seed)
            open(os.path.join(folder, "done"), "w").close()
            self.log(f"  model {self.shape.name} written to {self._model_dir} in {time.perf_counter() - t0:.1f} s")
        return self._model_dir

    def run_dir(self, name: str) -> str:
        return tempfile.mkdtemp(prefix=f"{name}-", dir=self.work)


@dataclass(frozen=True)
class Section:
    name: str
    title: str
    module: str
    time_limit_s: float
    correctness: bool = True


SECTIONS = (
    # Limits: about 8 minutes in all on one GPU (fsdp runs with 2+ GPUs only); --time-scale stretches them.
    Section("kernels", "Triton kernels vs their torch references", "bench.gpu_check.kernels", 50),
    Section("attention", "FlexAttention / FlashAttention 2 varlen vs padded SDPA", "bench.gpu_check.attention", 110),
    Section("step", "the recommended one-GPU MetaRM step", "bench.gpu_check.step", 150),
    Section("trl", "TRL's RewardTrainer on the same model and batches", "bench.gpu_check.trl_step", 70,
            correctness=False),
    Section("speed", "--compile and --liger against the eager step", "bench.gpu_check.speed", 100),
    Section("fsdp", "torchrun FSDP2 against one GPU", "bench.gpu_check.fsdp", 120),
)


class SectionTimeout(Exception):
    pass


@contextmanager
def time_limit(seconds: float):
    """Raise SectionTimeout in the main thread after ``seconds`` (SIGALRM); no-op off the main thread."""
    import threading

    if threading.current_thread() is not threading.main_thread() or seconds <= 0:
        yield
        return

    def handler(signum, frame):
        raise SectionTimeout(f"time limit of {seconds:.0f} s reached")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_section(sec: Section, ctx: Context, report: Report, scale: float = 1.0) -> SectionRecord:
    import importlib

    rec = SectionRecord(sec.name, sec.title, sec.correctness, sec.time_limit_s * scale)
    report.add(rec)  # written as "running": a run killed here names the section
    ctx.log(f"[{sec.name}] {sec.title} (limit {rec.time_limit_s:.0f} s)")
    t0 = time.perf_counter()
    rec.start()
    try:
        with time_limit(rec.time_limit_s), warnings.catch_warnings():
            warnings.simplefilter("default")
            importlib.import_module(sec.module).run(ctx, rec)
        rec.status = "fail" if rec.failed_checks else "pass"
    except Skip as e:
        rec.status, rec.reason = "skip", str(e)
    except SectionTimeout as e:
        rec.status, rec.reason = "fail", f"{e} (what it measured before is recorded)"
    except Exception as e:  # noqa: BLE001 - every section runs whatever the one before did
        rec.status, rec.reason = "fail", f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        rec.measurements["traceback"] = traceback.format_exc(limit=12)[-4000:]
    rec.seconds = time.perf_counter() - t0
    if not rec.correctness and rec.status == "fail":
        rec.reason = rec.reason or "a measurement failed"
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        rec.measurements.setdefault("cuda_max_memory_allocated_GB", torch.cuda.max_memory_allocated() / 1e9)
        torch.cuda.reset_peak_memory_stats()
    report.write()
    ctx.log(f"[{sec.name}] {rec.status}{': ' + rec.reason if rec.reason else ''} ({rec.seconds:.1f} s)")
    for c in rec.failed_checks:
        ctx.log(f"    FAILED {c.name}: {c.value} (bound {c.bound}) {c.note}")
    return rec


def environment(argv, device) -> dict:
    from bench.environment import full_environment

    try:
        env = full_environment(argv)
    except Exception as e:  # noqa: BLE001 - no git, say: the checks still run
        env = {"environment_error": f"{type(e).__name__}: {e}", "torch": torch.__version__}
    env["command"] = "python -m bench.gpu_check " + " ".join(argv)
    for name in ("triton", "flash_attn", "liger_kernel", "bitsandbytes", "accelerate"):
        try:
            mod = __import__(name)
            env[name] = getattr(mod, "__version__", "?")
        except ImportError:
            env[name] = None
    env["triton_interpret"] = os.environ.get("TRITON_INTERPRET")
    if device.type == "cuda":
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        env["capability"] = "sm_%d%d" % torch.cuda.get_device_capability(device)
        env["cuda"] = torch.version.cuda
        env["gpu_memory_GB"] = torch.cuda.get_device_properties(device).total_memory / 1e9
    return env


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="every section at toy size (on a CPU: Triton's interpreter, "
                                                           "CUDA-only parts skipped with the reason)")
    ap.add_argument("--size", choices=sorted(SIZES), default=None, help="the Llama-shaped model (default 1b; toy with --dry-run)")
    ap.add_argument("--out", default=os.path.join("runs", "gpu_check", "report.json"), help="the JSON report")
    ap.add_argument("--only", default="", help="comma-separated sections to run: " + ",".join(s.name for s in SECTIONS))
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 5; 2 with --dry-run)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; 1 with --dry-run)")
    ap.add_argument("--time-scale", type=float, default=1.0, help="multiply every section's time limit (a slower GPU)")
    ap.add_argument("--cpu-compile", action="store_true", help="dry run on the CPU: run the --compile step too (~20 s)")
    ap.add_argument("--work", default=None, help="folder for the model and run folders (default: a temporary one)")
    ap.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                    help="each section in a process of its own (default on a GPU, without --dry-run): a hang or a "
                         "crash takes only that section down")
    ap.add_argument("--no-isolate", dest="isolate", action="store_false", help="every section in this process")
    ap.add_argument("--section-process", default=None, help=argparse.SUPPRESS)  # the child of --isolate
    ap.add_argument("--section-record", default=None, help=argparse.SUPPRESS)
    return ap


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    if not torch.cuda.is_available() and not a.dry_run:
        print(NO_CUDA, file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    wanted = [x.strip() for x in a.only.split(",") if x.strip()]
    unknown = set(wanted) - {s.name for s in SECTIONS}
    if unknown:
        print(f"bench.gpu_check: --only {','.join(sorted(unknown))}: no such section "
              f"({', '.join(s.name for s in SECTIONS)})", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    size = a.size or ("toy" if a.dry_run else "1b")
    work = a.work or tempfile.mkdtemp(prefix="gpu-check-")
    ctx = Context(device=device, dry_run=a.dry_run, size=size, workload=TOY_WORKLOAD if a.dry_run else GPU_WORKLOAD,
                  work=work, warmup=a.warmup if a.warmup is not None else (1 if a.dry_run else 3),
                  steps=a.steps if a.steps is not None else (2 if a.dry_run else 5), cpu_compile=a.cpu_compile,
                  log=lambda *x: print(*x, flush=True))
    shape = ctx.shape
    if a.section_process:  # a child of --isolate: one section, its record in --section-record
        (sec,) = [s for s in SECTIONS if s.name == a.section_process]
        run_section(sec, ctx, Report(a.section_record, {}), a.time_scale)
        return 0
    header = {"tool": "bench.gpu_check", "dry_run": a.dry_run, "device": str(device), "size": size,
              "model": dict(shape.__dict__, params=shape.counted_params()), "workload": ctx.workload.__dict__,
              "environment": environment(argv, device), "work": work}
    report = Report(a.out, header)
    print(f"bench.gpu_check: {header['environment'].get('gpus', ['CPU (dry run)'])[0]}, model {shape.name} "
          f"({shape.counted_params() / 1e9:.3g}B params), report {a.out}", flush=True)
    isolate = a.isolate if a.isolate is not None else (device.type == "cuda" and not a.dry_run)
    report.header["isolated"] = isolate
    for sec in SECTIONS:
        if wanted and sec.name not in wanted:
            continue
        if isolate:
            from bench.gpu_check.isolate import run_isolated

            run_isolated(sec, argv, work, report, sec.time_limit_s * a.time_scale, log=ctx.log)
        else:
            run_section(sec, ctx, report, a.time_scale)
    code = exit_code(report.sections)
    report.write(finished=True, exit_code=code)
    print()
    print(table(report.sections))
    print(f"\nreport: {a.out}; exit {code}" + (" (a correctness section failed)" if code else ""))
    return code
