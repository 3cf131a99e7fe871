"""Section ``speed``: ``--compile`` and ``--liger`` against the eager step, in the recommended setting.

Three trainers load the same model folder (so the same weights): eager, ``compile=True``
(metarm_fast.compile: RMSNorm and MLP modules through inductor) and ``liger=True`` (Liger-Kernel's
RMSNorm, SwiGLU and RoPE; GPU only, needs liger-kernel). On the same pair and meta batches:

- rewards against an fp32 truth (the same weights in fp32, padded, SDPA): the variant's error at most
  ERR_FACTOR x the eager bf16 model's, plus a floor (the kernel tests' rule);
- one MetaRM step each from the same weights and batch: loss and J against the eager step's
  (the same rule on |variant - truth| is not available for a step, so the difference is recorded
  and bounded by the rewards' measured error);
- step time (the first steps compile; the median of the timed ones is reported) against eager's.

Liger patches transformers' Llama RoPE for the whole process, so it is built last. On a CPU dry
run --liger is refused (no GPU kernels) and --compile is skipped (inductor on the CPU takes ~20 s,
tests/test_compile.py holds it to the eager model) unless ``--cpu-compile`` is given.
"""
from __future__ import annotations

import dataclasses
import gc
import statistics
import time

import torch

from bench.gpu_check.model import recommended_config
from bench.gpu_check.report import Skip

# The rule of bench.gpu_check.attention (measured there on the CPU: ratios <= 1.03); here the variant
# changes the element-wise kernels instead of attention.
ERR_FACTOR = 4.0
FLOOR_ULPS = 2.0


def variants(ctx, rec) -> list[str]:
    from metarm_fast.liger import liger_unavailable
    from metarm_fast.model import build_tiny_llama

    out = []
    if ctx.cuda or ctx.cpu_compile:
        out.append("compile")
    else:
        rec.skip_part("compile", "CPU dry run: inductor takes ~20 s here (tests/test_compile.py checks --compile on "
                                 "the CPU; --cpu-compile runs it here)")
    why = liger_unavailable(build_tiny_llama(16, 0))
    if why:
        rec.skip_part("liger", why)
    else:
        out.append("liger")
    return out


def run(ctx, rec) -> None:
    from metarm_fast.batch import Batcher
    from metarm_fast.model import RewardModel, load_model
    from metarm_fast.trainer import RewardTrainer

    names = variants(ctx, rec)
    if not names:
        raise Skip("; ".join(f"{k}: {v}" for k, v in rec.skipped.items()))
    warmup, steps = min(ctx.warmup, 2), min(ctx.steps, 3)  # three trainers in one section's time
    n = warmup + steps
    base = recommended_config(ctx.model_dir(), ctx.workload, n + 1, ctx.run_dir("speed"))
    rec.tolerance("ERR_FACTOR", ERR_FACTOR, "variant's reward error vs fp32 <= factor x eager bf16's + floor "
                                            "(bench.gpu_check.attention's rule)")
    eager = RewardTrainer(base, log=ctx.log)
    micro, groups = eager.step_inputs(0)
    # The truth: the same weights in fp32, padded, SDPA (no FlexAttention compile of its own). Rewards
    # come out in the same order in every layout. Train mode throughout: transformers recompiles
    # FlexAttention whenever the training flag changes.
    truth_cfg = dataclasses.replace(eager.cfg, precision="fp32", packing="none", attn_implementation="sdpa",
                                    activation_checkpointing=False)
    truth_model = RewardModel(load_model(truth_cfg, eager.tokenizer)).to(ctx.device).train()
    padded = Batcher("none", eager.tokenizer.pad_token_id, device=ctx.device)
    with torch.no_grad():
        truth = {"pairs": truth_model(padded.pairs(micro[0])).double().cpu(),
                 "meta": truth_model(padded.groups(groups)).double().cpu()}
    del truth_model
    floor = FLOOR_ULPS * 2.0**-23
    errors, first, times = {}, {}, {}
    # One variant at a time, each from the folder's weights, eager first and liger last: Liger patches
    # transformers' Llama RoPE for the whole process, so a model measured after it would use it too.
    for name in ["eager"] + names:
        tr = eager if name == "eager" else RewardTrainer(
            dataclasses.replace(base, output_dir=ctx.run_dir(name), **{name: True}), log=ctx.log)
        batches = {"pairs": tr.batcher.pairs(micro[0]), "meta": tr.batcher.groups(groups)}
        t0 = time.perf_counter()
        with torch.no_grad():
            r = {k: tr.model(b).double().cpu() for k, b in batches.items()}
        errors[name] = {k: float((r[k] - truth[k]).abs().max() / truth[k].abs().max()) for k in r}
        errors[name]["first_forward_s"] = time.perf_counter() - t0
        rec.measure(reward_errors=errors)
        if name != "eager":
            for k in batches:
                limit = ERR_FACTOR * errors["eager"][k] + floor
                rec.check(f"{name} {k} rewards: error vs fp32 within {ERR_FACTOR:g}x eager's", errors[name][k] <= limit,
                          f"{errors[name][k]:.3g}", f"{limit:.3g}", f"eager bf16: {errors['eager'][k]:.3g}")
        times[name] = []
        for s in range(n):
            m_in = tr.step_inputs(s)
            sync(ctx)
            t0 = time.perf_counter()
            m = tr.train_step(*m_in)
            sync(ctx)
            if s == 0:
                first[name] = {"loss": m.get("loss"), "J": m.get("J"), "seconds": time.perf_counter() - t0}
            elif s >= warmup:
                times[name].append(time.perf_counter() - t0)
            if not rec.check(f"{name} step {s}: finite, not skipped", "skipped" not in m and m["loss"] == m["loss"],
                             m.get("skipped", m.get("loss"))):
                break
        if name != "eager" and name in first and "eager" in first:
            for k in ("loss", "J"):
                diff = abs(first[name][k] - first["eager"][k]) / max(abs(first["eager"][k]), 1e-12)
                bound = 2 * (ERR_FACTOR * max(errors["eager"][b] for b in batches) + floor)
                rec.check(f"{name}: first MetaRM step's {k} vs eager's", diff <= bound, f"{diff:.3g}", f"{bound:.3g}",
                          "bound: twice the rewards' allowed error")
        med = {k: statistics.median(v) for k, v in times.items() if v}
        rec.measure(first_step=first, step_s=med,
                    speedup_over_eager={k: med["eager"] / v for k, v in med.items() if k != "eager" and "eager" in med},
                    _headline=["speedup_over_eager"])
        del tr, m
        eager = None
        gc.collect()
        if ctx.cuda:
            torch.cuda.empty_cache()


def sync(ctx) -> None:
    if ctx.cuda:
        torch.cuda.synchronize()
