"""The reference command-line runs that tests/test_resume.py and tests/test_parallel.py compare
against, and helpers to start and read CLI runs (tests import this; nothing else does).

One setting per precision/layout, each run once per session (tests/conftest.py's `reference_runs`):
the uninterrupted run a killed and resumed run must equal bit for bit, and the one-process run a
2-rank run must equal to rounding. A checkpoint is written after every step, so each step can be
resumed from.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

STEPS = 6
# The global batch: 4 pairs and 4 meta groups a step, so that 2 ranks take 2 of each.
BASE = ["train", "--max-steps", str(STEPS), "--max-records", "64", "--batch-size", "4", "--meta-batch-size", "4",
        "--meta-k", "3", "--max-length", "48", "--tiny-hidden", "32", "--no-progress", "--method", "metarm",
        "--eta", "1e-2", "--save-every", "1", "--keep-last", "0"]
SETTINGS = {
    "fp32": [],
    "bf16-master": ["--precision", "bf16-master"],
    "grad_accum 2": ["--grad-accum", "2", "--batch-size", "2"],
}
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def cli_command(args) -> list[str]:
    return [sys.executable, "-m", "metarm_fast.cli", *map(str, args)]


def run_cli(args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(args), env=ENV, capture_output=True, text=True, timeout=timeout)


def start_reference_runs(root) -> dict:
    """Every setting's uninterrupted run, into root/<setting>; returns {setting: folder}. The runs are
    single-threaded and started together, so that one's start-up overlaps another's work."""
    folders, procs = {}, {}
    for name, extra in SETTINGS.items():
        folders[name] = os.path.join(str(root), name.replace(" ", "_"))
        procs[name] = subprocess.Popen(cli_command([*BASE, *extra, "--output-dir", folders[name]]), env=ENV,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for name, p in procs.items():
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, f"reference run {name}: {err[-3000:]}"
    return folders


def checkpoint(out, step: int) -> str:
    return os.path.join(str(out), "checkpoints", f"step-{step:08d}")


def metric_records(out) -> list[dict]:
    with open(os.path.join(str(out), "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def metric_steps(out) -> list[int]:
    return [r["step"] for r in metric_records(out) if "step" in r]


def losses(out) -> list[float]:
    return [r["loss"] for r in metric_records(out) if "step" in r]


def model_weights(out) -> dict:
    return load_file(os.path.join(str(out), "model.safetensors"))


def assert_same_model(a, b) -> None:
    """The exported weights of two runs, bit for bit."""
    wa, wb = model_weights(a), model_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k].view(torch.uint8), wb[k].view(torch.uint8)), k


def max_weight_diff(a, b) -> float:
    wa, wb = model_weights(a), model_weights(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
