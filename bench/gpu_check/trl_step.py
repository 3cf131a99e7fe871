"""Section ``trl``: TRL's RewardTrainer step against ours on the same model and batches (a measurement).

bench.throughput's own runners and report, on the GPU: ``VanillaRunner`` and ``MetaRunner``
(bench/runners.py: the trainer's ``train_step``; the meta batch is the step's own prompts with their
two responses, as bench.throughput times it) in the recommended setting (bench.gpu_check.model:
bf16 compute with fp32 masters, 8-bit AdamW, activation checkpointing, prompt sharing), and
``TrlRunner`` (bench/trl_runner.py: TRL's collator, optimizer and scheduler, bf16, the same
activation checkpointing; padded, as TRL has no padding-free reward training), all from the same
weights over the same batches, round-robin (bench.throughput.time_round_robin). The ratios are
bench.targets' "vanilla / TRL pairs/s" and "MetaRM / TRL pairs/s", as bench.throughput prints them
on the CPU. Skipped when trl is not installed (``pip install -e .[bench]``).
"""
from __future__ import annotations

import argparse
import importlib.util

import torch

from bench.gpu_check.model import recommended_config
from bench.gpu_check.report import Skip

ROW_KEYS = ("method", "packing", "steps", "pairs_per_step", "step_s", "pairs_per_s", "tokens_computed_per_step",
            "tokens_padded_per_step", "mfu", "peak_MB", "attn_implementation", "trl", "optimizer", "optim",
            "activation_checkpointing")


def run(ctx, rec) -> None:
    if importlib.util.find_spec("trl") is None:
        raise Skip("trl is not installed (pip install -e .[bench])")
    import dataclasses

    from bench.flops import flop_params
    from bench.peak import datasheet_peak
    from bench.rows import make_row
    from bench.runners import MetaRunner, VanillaRunner, layout_tokens
    from bench.targets import ratios
    from bench.throughput import measure_peaks, time_round_robin
    from bench.trl_runner import TrlRunner

    n = ctx.warmup + ctx.steps
    cfg = recommended_config(ctx.model_dir(), ctx.workload, n + 1, ctx.run_dir("trl"), method="vanilla", meta_data=None)
    first = VanillaRunner(cfg, cfg.packing, None, None)
    batches = [first.tr.step_inputs(s)[0] for s in range(first.tr.total_steps)]
    first.batches = batches
    init_state = {k: v.detach().clone() for k, v in first.tr.rm.hf.state_dict().items()}
    runners = [first, MetaRunner(cfg, cfg.packing, batches, init_state)]
    # transformers refuses bf16 without a GPU (unless told use_cpu): on a CPU dry run TRL runs fp32.
    trl_cfg = dataclasses.replace(first.tr.cfg, packing="none", precision=cfg.precision if ctx.cuda else "fp32")
    if not ctx.cuda:
        rec.skip_part("TRL in bf16", "no CUDA: transformers' Trainer refuses bf16 on the CPU; TRL runs fp32 here")
    runners.append(TrlRunner(trl_cfg, batches, init_state, first.tr.tokenizer, ctx.run_dir("trl-workdir")))
    del init_state

    skipped = []
    live = time_round_robin(argparse.Namespace(warmup=ctx.warmup, steps=ctx.steps, repeat=1), runners,
                            lambda label, packing, why: skipped.append(f"{label}: {why}"))
    if skipped:
        rec.measure(runner_failures=skipped)
    rec.check("every runner ran every step", len(live) == len(runners), [r.label for r in live])
    longest = max(range(ctx.warmup, n), key=lambda i: layout_tokens(batches[i], "none"))
    measure_peaks(live, longest)
    hf = first.tr.rm.hf
    peak, source = datasheet_peak(torch.cuda.get_device_name(ctx.device), cfg.precision) if ctx.cuda else \
        (None, "no CUDA: no datasheet peak")
    rows = [make_row(r, flop_params(hf), peak, hf.config) for r in live if r.times]
    found = ratios(rows, {}, hf.config.hidden_size)
    by = {t["target"]: t for t in found if "TRL" in t["target"]}
    rec.measure(rows=[{k: r[k] for k in ROW_KEYS if k in r} for r in rows], peak_flops_source=source,
                vanilla_over_trl=by.get("vanilla / TRL pairs/s", {}).get("value"),
                metarm_over_trl=by.get("MetaRM / TRL pairs/s", {}).get("value"),
                targets=[t for t in found if "TRL" in t["target"]], _headline=["vanilla_over_trl", "metarm_over_trl"])
