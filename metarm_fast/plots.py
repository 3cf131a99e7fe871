"""The two figures a run writes at its end (matplotlib, headless).

- ``meta_reward_gaps.png``: the reward gaps |r(x, s_i) - r(x, s_j)| between the responses of each
  meta-set prompt, for the trained model and for a baseline on the very same samples (the model
  before training, scored at step 0), in two panels on one gap axis. The count axis is logarithmic:
  the gaps pile up near 0 and the tail, which is what MetaRM is meant to widen, would otherwise be
  invisible. Dashed lines mark the means, dotted lines the medians.
- ``training_curves.png``: training loss and accuracy per logged step (and a running mean over
  about 5% of the run), with the eval accuracy of ``--eval-every`` where there is one.
"""
from __future__ import annotations

import json

import torch

GAP_HISTOGRAM = "meta_reward_gaps.png"
TRAINING_CURVES = "training_curves.png"

__all__ = ["GAP_HISTOGRAM", "TRAINING_CURVES", "save_gap_histogram", "save_training_curves", "read_curves"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_gap_histogram(gaps: torch.Tensor, path: str, baseline: torch.Tensor | None = None,
                       label: str = "trained", baseline_label: str = "before training") -> str:
    """One panel per series, stacked on a shared gap axis, so the model before training and after it
    are seen apart (overlaid, the baseline's spike near 0 hid under the trained model's first bin)."""
    plt = _pyplot()
    series = [(label, gaps.double(), "#3a6ea5")]
    if baseline is not None:
        series.insert(0, (baseline_label, baseline.double(), "#c0603a"))
    series = [(name, g, color) for name, g, color in series if g.numel()]  # an empty series has no mean
    top = max((float(g.max()) for _, g, _ in series), default=1.0)
    bins = torch.linspace(0.0, max(top, 1e-6), 41).tolist()
    fig, axes = plt.subplots(max(len(series), 1), 1, figsize=(5.5, 1.2 + 1.9 * max(len(series), 1)), sharex=True, sharey=True,
                             squeeze=False)
    for ax, (name, g, color) in zip(axes[:, 0], series):
        mean, median = float(g.mean()), float(g.median())
        ax.hist(g.numpy(), bins=bins, color=color, alpha=0.8)
        ax.axvline(mean, color="black", linestyle="--", linewidth=1)
        ax.axvline(median, color="black", linestyle=":", linewidth=1)
        ax.set_yscale("log")
        ax.set_ylabel("pairs (log)")
        ax.set_title(f"{name}: mean {mean:.3f}, median {median:.3f}, {g.numel()} pairs", fontsize=9)
    axes[-1, 0].set_xlabel("|r(x, s_i) - r(x, s_j)| on the meta set (-- mean, .. median)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def read_curves(metrics_path: str) -> dict[str, list[tuple[int, float]]]:
    """(step, value) series from metrics.jsonl: train loss, train accuracy, eval accuracy."""
    curves = {"loss": [], "accuracy": [], "eval_accuracy": []}
    with open(metrics_path) as f:
        for line in f:
            rec = json.loads(line)
            if "step" not in rec:
                continue
            for k in ("loss", "accuracy"):
                if k in rec:
                    curves[k].append((rec["step"], float(rec[k])))
            if "eval" in rec:
                curves["eval_accuracy"].append((rec["step"], float(rec["eval"]["accuracy"])))
    return curves


def _running_mean(ys: list[float], width: int) -> list[float]:
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= width:
            acc -= ys[i - width]
        out.append(acc / min(i + 1, width))
    return out


def save_training_curves(metrics_path: str, path: str) -> str:
    plt = _pyplot()
    c = read_curves(metrics_path)
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key, title in ((ax_l, "loss", "Bradley-Terry loss"), (ax_a, "accuracy", "accuracy")):
        if c[key]:
            xs, ys = zip(*c[key])
            ax.plot(xs, ys, color="#9bb7d4", linewidth=0.6, label=f"train {key} (per step)")
            ax.plot(xs, _running_mean(list(ys), max(1, len(ys) // 20)), color="#3a6ea5", label="running mean")
        ax.set_xlabel("optimizer step")
        ax.set_title(title)
    if c["eval_accuracy"]:
        xs, ys = zip(*c["eval_accuracy"])
        ax_a.plot(xs, ys, "o-", color="#c0603a", markersize=3, label="eval accuracy")
    for ax in (ax_l, ax_a):
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def gap_report(gaps: torch.Tensor, baseline_path: str, figure_path: str, label: str, *, write: bool) -> dict:
    """The summary's meta-gap entries: the gaps now, those before training (saved at ``baseline_path``
    by the run's start) and, when ``write``, the histogram of both at ``figure_path``."""
    out = {"meta_gaps": {"mean": float(gaps.mean()), "median": float(gaps.median()), "n": gaps.numel()}}
    if not write:
        return out
    import os

    before = torch.load(baseline_path) if os.path.exists(baseline_path) else None
    if before is not None:
        out["meta_gaps_initial"] = {"mean": float(before.mean()), "median": float(before.median())}
    out["meta_gap_histogram"] = save_gap_histogram(gaps, figure_path, baseline=before, label=label)
    return out
