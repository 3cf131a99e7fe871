"""bench.gpu_check on a CPU: the dry run end to end, the one-line refusal without CUDA, the runner's
time limits and report, and the sections that a dry run skips, run here on their own (FSDP2 with 2
gloo ranks, --compile through inductor, TRL when installed)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1")
ENV.pop("TRITON_INTERPRET", None)  # as a user's shell has it: the command sets it up itself
SECTIONS = ["kernels", "attention", "step", "trl", "speed", "fsdp"]

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's behaviour (on a GPU run the real thing)")


def _run(args, timeout=300):
    return subprocess.run([sys.executable, "-m", "bench.gpu_check", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
@cpu_only
def test_dry_run_runs_every_section_and_writes_the_report(tmp_path):
    out = tmp_path / "sub" / "report.json"
    r = _run(["--dry-run", "--out", str(out), "--work", str(tmp_path / "work")])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert not os.path.exists(str(out) + ".tmp")
    assert report["finished"] and report["exit_code"] == 0 and report["dry_run"]
    assert report["environment"]["triton_interpret"] == "1"  # set by the module itself
    sec = {s["name"]: s for s in report["sections"]}
    assert list(sec) == SECTIONS
    for name in ("kernels", "attention", "step"):
        assert sec[name]["status"] == "pass" and sec[name]["checks"], sec[name]
        assert all(c["ok"] for c in sec[name]["checks"])
    # the parts that need CUDA are skipped with the reason
    assert "CUDA" in sec["attention"]["skipped"]["flex_attention"]
    assert "CUDA" in sec["kernels"]["skipped"]["device PTX"]
    assert sec["speed"]["status"] == "skip" and "CUDA" in sec["speed"]["skipped"]["liger"]
    assert sec["fsdp"]["status"] == "skip" and "2 or more CUDA GPUs" in sec["fsdp"]["reason"]
    assert sec["trl"]["status"] == ("pass" if importlib.util.find_spec("trl") else "skip")
    # the step's measurements are there, with the plan's predictions beside them
    step = sec["step"]["measurements"]
    for key in ("step_s", "machinery_share", "meta_frac_changed", "meta_realised_ratio", "memory"):
        assert key in step, key
    assert set(step["memory"]) == {"vanilla", "metarm", "copy_based", "standing"}
    assert all(v["predicted_GB"] > 0 for v in step["memory"].values())
    # the kernels ran through the interpreter, with the suite's bounds
    assert any(c["name"].startswith("perturb_ triton == torch") for c in sec["kernels"]["checks"])
    # the final table: one line a section
    table = r.stdout[r.stdout.index("section "):]
    for name in SECTIONS:
        assert f"\n{name} " in table


@cpu_only
def test_without_cuda_and_without_dry_run_one_line_and_non_zero(tmp_path):
    r = _run(["--out", str(tmp_path / "r.json")], timeout=120)
    assert r.returncode != 0
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs a CUDA device" in lines[0] and "--dry-run" in lines[0], r.stderr
    assert not (tmp_path / "r.json").exists()


# -- the runner -------------------------------------------------------------------------------------
def _fake_sections(monkeypatch):
    import time

    def slow(ctx, rec):
        for i in range(100):
            rec.measure(done=i)
            time.sleep(0.05)

    def broken(ctx, rec):
        raise ValueError("broken on purpose")

    def skipped(ctx, rec):
        from bench.gpu_check.report import Skip

        raise Skip("not here")

    def passing(ctx, rec):
        rec.check("one", True, 1, 1)

    def failing_measurement(ctx, rec):
        rec.check("slower than hoped", False, 3, 2)

    for name, fn in dict(slow=slow, broken=broken, skipped=skipped, passing=passing,
                         failing_measurement=failing_measurement).items():
        monkeypatch.setitem(sys.modules, f"fake_sections.{name}", types.SimpleNamespace(run=fn))


def test_runner_time_limit_errors_and_report_after_each_section(tmp_path, monkeypatch):
    from bench.gpu_check import runner
    from bench.gpu_check.model import TOY_WORKLOAD
    from bench.gpu_check.report import Report, exit_code, table

    _fake_sections(monkeypatch)
    ctx = runner.Context(device=torch.device("cpu"), dry_run=True, size="toy", workload=TOY_WORKLOAD,
                         work=str(tmp_path), warmup=1, steps=1, log=lambda *a: None)
    report = Report(str(tmp_path / "r.json"), {"tool": "test"})
    secs = [runner.Section("slow", "", "fake_sections.slow", 0.3), runner.Section("broken", "", "fake_sections.broken", 5),
            runner.Section("skipped", "", "fake_sections.skipped", 5), runner.Section("passing", "", "fake_sections.passing", 5)]
    for sec in secs:
        runner.run_section(sec, ctx, report)
        on_disk = json.loads((tmp_path / "r.json").read_text())
        assert on_disk["sections"][-1]["name"] == sec.name and on_disk["sections"][-1]["status"] != "running"
    by = {s.name: s for s in report.sections}
    assert by["slow"].status == "fail" and "time limit" in by["slow"].reason
    assert 0 < by["slow"].measurements["done"] < 99 and by["slow"].seconds < 2  # stopped, what it had kept
    assert by["broken"].status == "fail" and "broken on purpose" in by["broken"].reason
    assert "Traceback" in by["broken"].measurements["traceback"]
    assert by["skipped"].status == "skip" and by["skipped"].reason == "not here"
    assert by["passing"].status == "pass"
    assert exit_code(report.sections) == 1
    assert "time limit" in table(report.sections)
    # a failed measurement section alone does not fail the run
    only = Report(str(tmp_path / "m.json"), {})
    runner.run_section(runner.Section("m", "", "fake_sections.failing_measurement", 5, correctness=False), ctx, only)
    runner.run_section(secs[3], ctx, only)
    assert only.sections[0].status == "fail" and exit_code(only.sections) == 0


@pytest.mark.slow
@cpu_only
def test_isolated_sections_a_crash_and_a_hang_are_recorded(tmp_path, monkeypatch):
    """--isolate (the default on a GPU): each section in a child process; a child that dies before
    recording, or outlives its limit, is recorded as failed with its output, and the run goes on."""
    from bench.gpu_check import isolate, runner
    from bench.gpu_check.report import Report, exit_code

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(isolate, "GRACE_S", 0.0)
    report = Report(str(tmp_path / "r.json"), {})
    argv = ["--dry-run", "--out", str(tmp_path / "ignored.json")]
    crash = isolate.run_isolated(runner.Section("nosuch", "a section the child does not know", "x", 60), argv,
                                 str(tmp_path), report, 60, log=lambda *a: None)
    assert crash.status == "fail" and "exited with code" in crash.reason and "Traceback" in crash.measurements["output_tail"]
    hang = isolate.run_isolated(runner.SECTIONS[0], argv, str(tmp_path), report, 0.5, log=lambda *a: None)
    assert hang.status == "fail" and "killed" in hang.reason
    ok = isolate.run_isolated(runner.SECTIONS[2], argv, str(tmp_path), report, 120, log=lambda *a: None)
    assert ok.status == "pass" and ok.measurements["memory"]
    on_disk = json.loads((tmp_path / "r.json").read_text())
    assert [s["status"] for s in on_disk["sections"]] == ["fail", "fail", "pass"]
    assert exit_code(report.sections) == 1
    assert isolate.child_argv(["--dry-run", "--only", "step", "--out=x.json", "--size", "toy", "--isolate"]) == \
        ["--dry-run", "--size", "toy"]


def test_kernel_bounds_are_the_kernel_suites():
    from bench.gpu_check import kernels
    from tests.kernel_tests import tolerances

    assert (kernels.ERR_FACTOR, kernels.FLOOR_ULPS, kernels.FP32_ULP, kernels.LOSS_RTOL) == \
        (tolerances.ERR_FACTOR, tolerances.FLOOR_ULPS, tolerances.FP32_ULP, tolerances.LOSS_RTOL)
    assert kernels.GRAD_RTOL == tolerances.GRAD_RTOL


def test_the_model_presets_are_what_the_plan_counts():
    from bench.gpu_check.model import SIZES, build_llama

    assert 0.85e9 < SIZES["1b"].counted_params() < 1.1e9
    model = build_llama(SIZES["toy"], 0, "cpu")
    assert sum(p.numel() for p in model.parameters()) == SIZES["toy"].counted_params()


# -- the sections a dry run skips, run on the CPU ------------------------------------------------------
def _section(name, tmp_path, **ctx_kw):
    import importlib

    from bench.gpu_check import runner
    from bench.gpu_check.model import TOY_WORKLOAD
    from bench.gpu_check.report import SectionRecord

    ctx = runner.Context(device=torch.device("cpu"), dry_run=True, size="toy", workload=TOY_WORKLOAD,
                         work=str(tmp_path), warmup=1, steps=2, log=lambda *a: None, **ctx_kw)
    rec = SectionRecord(name, "", True, 280)
    rec.start()
    importlib.import_module(f"bench.gpu_check.{name}").run(ctx, rec)
    assert rec.checks and not rec.failed_checks, [c for c in rec.failed_checks]
    return rec


@pytest.mark.slow
@cpu_only
def test_fsdp_section_with_two_gloo_ranks(tmp_path):
    # One precision: the section's launch-and-compare code is the same for both, and
    # tests/test_parallel.py holds both precisions' 2-rank runs to these tolerances.
    rec = _section("fsdp", tmp_path, fsdp_ranks=2, fsdp_settings=("fp32",))
    assert set(rec.measurements["results"]) == {"fp32"}


@pytest.mark.slow
@pytest.mark.skipif(not (os.environ.get("CC") or __import__("shutil").which("g++") or __import__("shutil").which("cc")),
                    reason="inductor on the CPU needs a C++ compiler")
@cpu_only
def test_speed_section_with_compile_on_the_cpu(tmp_path):
    rec = _section("speed", tmp_path, cpu_compile=True)
    assert "compile" in rec.measurements["step_s"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl is not installed")
@cpu_only
def test_trl_section(tmp_path):
    rec = _section("trl_step", tmp_path)
    assert rec.measurements["vanilla_over_trl"] > 0 and rec.measurements["metarm_over_trl"] > 0


@pytest.mark.parametrize("direction", ["sgd", "optimizer-step"])
def test_timed_meta_step_runs_the_trainers_step_on_the_cpu(tmp_path, direction):
    """The step section's wrapper around the meta step (it needs CUDA, so --dry-run skips it): the
    trainer's own step through it, diagnostic steps included, leaves its marks and checks the restore."""
    from bench.gpu_check.timing import Clock, TimedMeta
    from metarm_fast.trainer import RewardTrainer
    from tests.helpers import tiny_config

    tr = RewardTrainer(tiny_config(tmp_path, method="metarm", eta=1e-2, meta_direction=direction,
                                   meta_diagnostic_every=1))
    clock = Clock(False)
    tr.meta = TimedMeta(tr.meta, clock)
    tr.meta.snapshot = True
    m = tr.train_step(*tr.step_inputs(0))
    assert "meta_max_move_over_eta" in m and tr.meta.restored_bitwise is True
    assert {"perturb_start", "perturbed", "l_done", "restored"} <= set(clock.marks)
