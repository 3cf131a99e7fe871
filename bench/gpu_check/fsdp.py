"""Section ``fsdp``: a short torchrun FSDP2 run against one process, at the CPU suite's tolerances.

The CLI as users run it: ``python -m metarm_fast.cli train`` on one GPU, and ``torchrun
--nproc_per_node=N -m metarm_fast.cli train --parallel fsdp`` on N GPUs (N = 4 with 4 or more GPUs,
else 2: the global batch of 4 pairs splits evenly), with the same global batch, fp32 and bf16-master (FSDP2's
mixed precision). Each step's loss and the exported weights must agree within the tolerances
tests/test_parallel.py holds 2 gloo ranks to on the CPU (copied below, with what they measured).
The tiny Llama of those tests, attention through SDPA with prompt sharing's dense mask: this checks
the sharding and NCCL, not attention (FlexAttention's compile is the attention section's).
Skipped with fewer than two GPUs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from bench.gpu_check.report import Skip

STEPS = 6
BASE = ["train", "--max-steps", str(STEPS), "--max-records", "64", "--batch-size", "4", "--meta-batch-size", "4",
        "--meta-k", "3", "--max-length", "48", "--tiny-hidden", "32", "--no-progress", "--method", "metarm",
        "--eta", "1e-2", "--save-every", str(STEPS), "--keep-last", "1", "--attn-implementation", "sdpa"]
SETTINGS = {"fp32": [], "bf16": ["--precision", "bf16-master"]}
# tests/test_parallel.py's TOLERANCES (loss relative, final weights max abs): about twice the largest
# error measured there over 6 steps with 2 gloo ranks (fp32 2.1e-6 / 2.3e-6; bf16 compute 9.1e-4 / 3.2e-3).
TOLERANCES = {"fp32": (5e-6, 5e-6), "bf16": (2e-3, 8e-3)}
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def ranks_here(ctx) -> int:
    if ctx.fsdp_ranks:
        return ctx.fsdp_ranks
    if not ctx.cuda:
        raise Skip("needs 2 or more CUDA GPUs (no CUDA here; tests/test_parallel.py runs 2 gloo ranks on the CPU)")
    n = torch.cuda.device_count()
    if n < 2:
        raise Skip(f"needs 2 or more CUDA GPUs, this machine has {n}")
    return 4 if n >= 4 else 2  # the global batch of 4 pairs and 4 meta prompts splits evenly


def _losses(out: str) -> list[float]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f if '"final"' not in line]


def _max_diff(a: str, b: str) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


def _launch(cmd, env, rec, what: str) -> bool:
    timeout = max(10.0, rec.time_left() - 5)
    try:
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return rec.check(f"{what} finished", False, f"still running after {timeout:.0f} s")
    return rec.check(f"{what} exited 0", r.returncode == 0, r.returncode, 0, r.stderr[-1500:] if r.returncode else "")


def run(ctx, rec) -> None:
    n = ranks_here(ctx)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # a fresh process: the CLI picks its own kernel paths
    one_env = dict(env)
    if ctx.cuda:
        one_env["CUDA_VISIBLE_DEVICES"] = one_env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    for name, tol in TOLERANCES.items():
        rec.tolerance(name, {"loss_rtol": tol[0], "weights_atol": tol[1]}, "tests/test_parallel.py TOLERANCES")
    results = {}
    for name, extra in SETTINGS.items():
        if ctx.fsdp_settings and name not in ctx.fsdp_settings:
            continue
        one, many = ctx.run_dir(f"fsdp-{name}-1"), ctx.run_dir(f"fsdp-{name}-{n}")
        args = [*BASE, *extra, "--overwrite"]
        if not _launch([sys.executable, "-m", "metarm_fast.cli", *args, "--output-dir", one], one_env, rec,
                       f"{name}: one process"):
            continue
        if not _launch([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                        "-m", "metarm_fast.cli", *args, "--parallel", "fsdp", "--output-dir", many], env, rec,
                       f"{name}: torchrun FSDP2, {n} ranks"):
            continue
        la, lb = _losses(one), _losses(many)
        loss_rtol, weight_atol = TOLERANCES[name]
        rel = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(la, lb)) if len(la) == len(lb) == STEPS else float("inf")
        diff = _max_diff(one, many)
        results[name] = {"loss_rel": rel, "weights_max_abs": diff, "losses_one": la, "losses_fsdp": lb}
        rec.check(f"{name}: losses, {n} ranks vs one process", rel <= loss_rtol, f"{rel:.3g}", loss_rtol,
                  f"{len(lb)} of {STEPS} steps")
        rec.check(f"{name}: exported weights, {n} ranks vs one process", diff <= weight_atol, f"{diff:.3g}", weight_atol)
        rec.measure(ranks=n, results=results)
