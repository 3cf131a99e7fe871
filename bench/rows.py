"""A runner's timed steps as one row of bench.throughput's results, in derived units.

  pairs/s          = pairs per step / step time (the meta pass adds no labelled pairs); a k-response
                     record counts its ordered pairs of different scores (the training signal)
  tokens computed  = input tokens the model was actually run on in the step (the runner's hook on the
                     input embedding: whatever layout the batch really took), all passes
  tokens padded    = tokens the step's batches would hold padded to their longest sequence, per pass:
                     the yardstick that makes layouts comparable
  FLOPs, MFU       = bench.flops
Each per-step quantity is given as its median and spread over the timed steps (``summary``).
"""
from __future__ import annotations

import random
import statistics

from bench.flops import mfu, step_flops
from bench.runners import MetaRunner, PartsRunner, Runner, signal_pairs


def summary(values) -> dict:
    """Median and spread of a list of numbers (min, max, interquartile range)."""
    v = sorted(float(x) for x in values)
    if not v:
        return {"n": 0}
    q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [v[0]] * 3
    return {"n": len(v), "median": statistics.median(v), "min": v[0], "max": v[-1], "p25": q[0], "p75": q[2]}


def make_row(r: Runner, nflop: int, peak_fl: float | None, config) -> dict:
    """``nflop``: the N of 6*N*tokens (bench.flops.flop_params); ``peak_fl``: the peak FLOP/s MFU is
    against (None: no MFU); ``config``: the model's config (its attention shape)."""
    steps = r.steps
    per_step = [sum(signal_pairs(it) for mb in r.batches[i] for it in mb) for i in steps]
    pairs = per_step[0] if len(set(per_step)) == 1 else statistics.mean(per_step)
    computed = r.computed
    padded = [r.padded_tokens(i) for i in steps]
    real = [r.real_tokens(i) for i in steps]
    flops = [step_flops(nflop, n, r.attention_pairs(i), config) for n, i in zip(computed, steps)]
    row = {
        "method": r.name,
        "packing": r.packing,
        "steps": len(steps),
        "pairs_per_step": pairs,
        "step_s": summary(r.times),
        "step_times_s": [round(t, 6) for t in r.times],
        "step_index": list(steps),
        "pairs_per_s": summary(n / t for n, t in zip(per_step, r.times)),
        "tokens_computed_per_step": statistics.mean(computed),
        "tokens_padded_per_step": statistics.mean(padded),
        "tokens_real_per_step": statistics.mean(real),
        "tokens_computed_per_s": summary(n / t for n, t in zip(computed, r.times)),
        "tokens_padded_per_s": summary(n / t for n, t in zip(padded, r.times)),
        "tokens_computed_over_expected": sum(computed) / max(1, sum(r.expected_tokens(i) for i in steps)),
        "flops_per_step": statistics.mean(flops),
        "achieved_flops_per_s": summary(f / t for f, t in zip(flops, r.times)),
        "mfu": summary(mfu(f, t, peak_fl) for f, t in zip(flops, r.times)) if peak_fl else None,
        "peak_bytes": r.peak_bytes,
        "peak_MB": round(r.peak_bytes / 2**20, 2) if r.peak_bytes else None,
        "attn_implementation": r.model.config._attn_implementation,
    }
    if isinstance(r, PartsRunner):
        row.update({f"{k}_s": summary(v) for k, v in r.parts.items()})
    if isinstance(r, MetaRunner):
        m = r.machinery
        row.update({f"{k}_s": summary(v) for k, v in m.items()})
        row["machinery_share"] = summary((a + b) / t for a, b, t in zip(m["perturb"], m["restore"], r.times))
    row.update(r.extra)
    return row



def paired_ratio(a: list[float], b: list[float], resamples: int = 10_000, seed: int = 0) -> dict:
    """a_i / b_i over paired repeats (the same batch i, timed alternately): median, min, max, IQR, and a
    95% percentile-bootstrap interval of the median (``resamples`` draws of the n pairs, seeded; 0: none)."""
    if len(a) != len(b):
        raise ValueError(f"paired_ratio: {len(a)} against {len(b)} values")
    ratios = [x / y for x, y in zip(a, b)]
    out = summary(ratios)
    if ratios and resamples:
        rng = random.Random(seed)
        meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
        out["ci95"] = [meds[int(0.025 * (resamples - 1))], meds[int(0.975 * (resamples - 1))]]
    out["values"] = [round(x, 6) for x in ratios]
    return out
