"""Section ``step``: the recommended one-GPU MetaRM step, measured.

The trainer's own ``train_step`` (bf16 compute with fp32 masters, 8-bit AdamW, activation
checkpointing, prompt sharing; the paper's lr and eta, 5e-6) on the Llama-shaped model and the
fixed-length synthetic batches (bench.gpu_check.model). Reported:

- step time (CUDA events around the step) and MFU: FLOPs per step (bench.flops: 6 N tokens +
  attention; the recomputation of checkpointing is not model FLOPs) over the datasheet's dense bf16
  peak (bench.peak.datasheet_peak);
- the meta machinery's share of the step: the perturbation and the restore, each between CUDA
  events recorded inside the step (bench.gpu_check.timing.TimedMeta), against the whole step;
- the realised perturbation at the paper's eta: ``meta_frac_changed`` and ``meta_realised_ratio``
  of every timed step, and the trainer's warning when rounding lost or dominated the perturbation;
- peak memory (``torch.cuda.max_memory_allocated`` through metarm_fast.memory.step_peak_bytes) of a
  vanilla, a MetaRM and a copy-based MetaRM step (metarm_fast.reference.copy_based_meta_step) on
  the same batch, each against bench.plan's prediction for this model and these batches.

Checks: every step finite and not skipped, and the weights back bit for bit after the meta step's
restore (one step with a snapshot). The rest are measurements.
"""
from __future__ import annotations

import statistics
import warnings

import torch

from bench.gpu_check.model import recommended_config
from bench.gpu_check.timing import Clock, TimedMeta

GB = 1e9


def run(ctx, rec) -> None:
    from bench.flops import attention_pairs, flop_params, step_flops
    from bench.peak import datasheet_peak
    from metarm_fast.memory import standing_bytes, step_peak_bytes
    from metarm_fast.reference import copy_based_meta_step
    from metarm_fast.trainer import RewardTrainer

    n_steps = ctx.warmup + ctx.steps + 4  # + the restore check + the three peaks
    cfg = recommended_config(ctx.model_dir(), ctx.workload, n_steps, ctx.run_dir("step"))
    tr = RewardTrainer(cfg, log=ctx.log)
    hf = tr.rm.hf
    rec.measure(attention=hf.config._attn_implementation, packing=cfg.packing, precision=cfg.precision,
                optimizer=cfg.optimizer, activation_checkpointing=cfg.activation_checkpointing, eta=cfg.eta,
                params=sum(p.numel() for p in tr.weights.params))
    clock = Clock(ctx.cuda)
    tr.meta = TimedMeta(tr.meta, clock)
    nflop = flop_params(hf)
    per_step, caught = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for s in range(ctx.warmup + ctx.steps):
            micro, groups = tr.step_inputs(s)
            clock.reset()
            clock.mark("start")
            m = tr.train_step(micro, groups)
            clock.mark("end")
            if not rec.check(f"step {s}: finite, not skipped", "skipped" not in m and m["loss"] == m["loss"],
                             m.get("skipped", m.get("loss"))):
                return
            if s < ctx.warmup:
                continue
            step_s = clock.seconds("start", "end")
            perturb_s = clock.seconds("perturb_start", "perturbed")
            restore_s = clock.seconds("l_done", "restored")
            pairs = [[p.chosen, p.rejected] for mb in micro for p in mb]
            attended = attention_pairs(pairs, cfg.packing) + attention_pairs(groups, cfg.packing)
            per_step.append({"step": s, "step_s": step_s, "perturb_s": perturb_s, "restore_s": restore_s,
                             "machinery_share": (perturb_s + restore_s) / step_s, "tokens": m["tokens"],
                             "flops": step_flops(nflop, m["tokens"], attended, hf.config),
                             "loss": m["loss"], "J": m["J"], "meta_frac_changed": m["meta_frac_changed"],
                             "meta_realised_ratio": m["meta_realised_ratio"],
                             "host_perturb_ms": m["meta_perturb_ms"], "host_restore_ms": m["meta_restore_ms"]})
            rec.measure(steps=per_step)
    rounded = [str(w.message) for w in caught
               if "lost to rounding" in str(w.message) or "most of the perturbation is rounding" in str(w.message)]
    med = lambda k: statistics.median(x[k] for x in per_step)  # noqa: E731
    peak, source = datasheet_peak(torch.cuda.get_device_name(ctx.device), cfg.precision) if ctx.cuda else \
        (None, "no CUDA: no datasheet peak (the CPU's MFU is bench.throughput's, against a measured GEMM)")
    rec.measure(step_s=med("step_s"), tokens_per_step=med("tokens"), flops_per_step=med("flops"),
                tokens_per_s=med("tokens") / med("step_s"), pairs_per_s=ctx.workload.batch / med("step_s"),
                mfu=med("flops") / med("step_s") / peak if peak else None, peak_flops=peak, peak_flops_source=source,
                machinery_share=med("machinery_share"), perturb_s=med("perturb_s"), restore_s=med("restore_s"),
                meta_frac_changed=[x["meta_frac_changed"] for x in per_step],
                meta_realised_ratio=[x["meta_realised_ratio"] for x in per_step],
                rounding_warning=rounded[0] if rounded else None)

    # The restore, bit for bit, inside a real step (not timed: it holds a copy of the weights).
    s = ctx.warmup + ctx.steps
    tr.meta.snapshot = True
    m = tr.train_step(*tr.step_inputs(s))
    tr.meta.snapshot = False
    rec.check("the weights are back bit for bit after the meta step's restore", tr.meta.restored_bitwise is True,
              tr.meta.restored_bitwise)

    # Peak memory of three steps on one batch, against the plan.
    micro, groups = tr.step_inputs(s + 1)
    tr.meta = tr.meta._meta
    measured = {
        "vanilla": step_peak_bytes(tr.weights, tr.optimizer, lambda: tr.train_step(micro)),
        "metarm": step_peak_bytes(tr.weights, tr.optimizer, lambda: tr.train_step(micro, groups)),
    }

    def copy_step():
        tr.weights.zero_grads()
        copy_based_meta_step(tr.model, tr.weights, tr.optimizer, tr.batcher, micro, groups, eta=cfg.eta,
                             max_grad_norm=cfg.max_grad_norm)

    measured["copy_based"] = step_peak_bytes(tr.weights, tr.optimizer, copy_step)
    predicted = plan_peaks(ctx.shape, tr, micro, groups, cfg)
    memory = {k: {"measured_GB": measured[k] / GB, "predicted_GB": predicted[k] / GB,
                  "error": predicted[k] / measured[k] - 1} for k in measured}
    memory["standing"] = {"measured_GB": standing_bytes(tr.weights, tr.optimizer) / GB,
                          "predicted_GB": predicted["standing"] / GB}
    rec.measure(memory=memory, memory_source="torch.cuda.max_memory_allocated" if ctx.cuda else
                "metarm_fast.memory.AllocationTracker (CPU accounting)",
                copy_based_minus_metarm_GB=(measured["copy_based"] - measured["metarm"]) / GB,
                _headline=["step_s", "mfu", "machinery_share"])
    mfu = rec.measurements["mfu"]
    ctx.log(f"  step {med('step_s'):.3g} s, MFU {'n/a' if mfu is None else f'{mfu:.3f}'}, machinery "
            f"{med('machinery_share'):.3g} of the step; peaks GB " +
            ", ".join(f"{k} {v['measured_GB']:.3g} (plan {v['predicted_GB']:.3g})" for k, v in memory.items()))


def plan_peaks(shape, tr, micro, groups, cfg) -> dict:
    """bench.plan's peak bytes for these very batches: standing items (bf16 weights, fp32 masters, bf16
    gradients, the optimizer's states) + the largest pass's activations, or the optimizer step's."""
    from bench.flops import attention_pairs
    from bench.plan import Geometry, activation_bytes, optimizer_step_items, standing_items

    counted = sum(p.numel() for p in tr.weights.params)
    if counted != shape.counted_params():
        raise AssertionError(f"the plan's shape counts {shape.counted_params()} parameters, the model has {counted}")
    pairs = [[p.chosen, p.rejected] for mb in micro for p in mb]
    geos = {}
    for name, batch, gs in (("pairs", tr.batcher.pairs(micro[0]), pairs), ("meta", tr.batcher.groups(groups), groups)):
        geos[name] = Geometry(tokens=batch.num_tokens, rewards=batch.num_sequences, qk=attention_pairs(gs, cfg.packing))
    standing = sum(standing_items(shape, cfg.optimizer, copy_backup=False).values())
    opt = standing + sum(optimizer_step_items(shape, cfg.optimizer, "per-tensor").values())
    ckpt = cfg.activation_checkpointing

    def peak(passes, extra=0.0):
        return max(standing + extra + max(activation_bytes(shape, geos[p], 2, ckpt).total for p in passes), opt + extra)

    copy = sum(standing_items(shape, cfg.optimizer, copy_backup=True).values()) - standing
    return {"vanilla": peak(["pairs"]), "metarm": peak(["meta", "pairs"]),
            "copy_based": peak(["meta", "pairs"], extra=copy), "standing": standing}
