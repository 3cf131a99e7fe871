"""Statistics over seeds for bench.shift: means with percentile bootstrap intervals, paired differences.

The unit of resampling is the seed (one seed = one whole experiment: task, data, initialisation,
data order, policy sampling), because seeds are what is independent. A 95% interval is the 2.5th and
97.5th percentiles of the mean over 10,000 resamples of the seeds with replacement, drawn by a
numpy Generator with a fixed seed, so a table recomputed from the same numbers is the same table.
A paired difference (MetaRM - vanilla) is taken per seed first, then bootstrapped the same way.
"""
from __future__ import annotations

import numpy as np

RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


def bootstrap_mean(values, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict:
    """{"mean", "lo", "hi", "n"}: the mean and its 95% percentile bootstrap interval over ``values``."""
    x = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": float(x.mean()), "lo": float(lo), "hi": float(hi), "n": int(len(x))}


def excludes_zero(ci: dict) -> bool:
    """The interval holds no 0 (never claimed from a single seed, whose interval is a point)."""
    return ci["n"] > 1 and (ci["lo"] > 0 or ci["hi"] < 0)


def fmt(ci: dict, digits: int = 3, signed: bool = False) -> str:
    s = "+" if signed else ""
    return f"{ci['mean']:{s}.{digits}f} [{ci['lo']:{s}.{digits}f}, {ci['hi']:{s}.{digits}f}]"


def summarise(per_seed: dict, methods: list[str], rounds: int, metrics: list[str], baseline: str) -> dict:
    """per_seed[seed][method][round][metric] -> {"by_method": {metric: {method: [ci per round]}},
    "paired": {metric: {method: [ci of (method - baseline) per round]}}}."""
    seeds = sorted(per_seed)
    by_method, paired = {}, {}
    for m in metrics:
        by_method[m] = {meth: [bootstrap_mean([per_seed[s][meth][r][m] for s in seeds]) for r in range(rounds)]
                        for meth in methods}
        paired[m] = {meth: [bootstrap_mean([per_seed[s][meth][r][m] - per_seed[s][baseline][r][m] for s in seeds])
                            for r in range(rounds)]
                     for meth in methods if meth != baseline}
    return {"by_method": by_method, "paired": paired}


def table(summary: dict, methods: list[str], rounds: int, metrics: list[str], headers: list[str],
          baseline: str) -> str:
    """A markdown table: a row per round and method, then a row per round and paired difference.
    A difference whose interval excludes 0 is marked with *."""
    lines = ["| round | method | " + " | ".join(headers) + " |", "| --- | --- |" + " --- |" * len(headers)]
    for r in range(rounds):
        for meth in methods:
            cells = [fmt(summary["by_method"][m][meth][r]) for m in metrics]
            lines.append(f"| {r} | {meth} | " + " | ".join(cells) + " |")
    for r in range(rounds):
        for meth in methods:
            if meth == baseline:
                continue
            cells = []
            for m in metrics:
                ci = summary["paired"][m][meth][r]
                cells.append(fmt(ci, signed=True) + (" *" if excludes_zero(ci) else ""))
            lines.append(f"| {r} | {meth} - {baseline} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def readings_table(per_seed: dict, methods: list[str], rounds: int, keys: list[str], headers: list[str]) -> tuple[dict, str]:
    """Means over seeds with their intervals, no baseline (readings only some methods have, e.g. what
    the meta step did): ({key: {method: [ci per round]}}, a markdown table, a row per round and method)."""
    seeds = sorted(per_seed)
    summary = {k: {meth: [bootstrap_mean([per_seed[s][meth][r][k] for s in seeds]) for r in range(rounds)]
                   for meth in methods} for k in keys}
    lines = ["| round | method | " + " | ".join(headers) + " |", "| --- | --- |" + " --- |" * len(headers)]
    for r in range(rounds):
        for meth in methods:
            lines.append(f"| {r} | {meth} | " + " | ".join(fmt(summary[k][meth][r], digits=4) for k in keys) + " |")
    return summary, "\n".join(lines)
