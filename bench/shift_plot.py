"""The figure of bench.shift: three panels from the results dictionary that bench.shift writes as JSON.

1. true score against KL to the base, in the last round: the policy-gradient policy recorded along
   its training (mean over seeds at each recorded step) and best-of-n (n = 1, 2, 4, ...), for each
   reward model and for the gold reward (the task's true score: the ceiling);
2. accuracy of each round's reward model on labelled pairs of the policy it then faces (the policy
   that supplied its meta set), mean and 95% bootstrap interval over seeds;
3. histograms of |r_i - r_j| over the responses of the same prompt, last round, every reward model
   scoring the same samples (pooled over seeds).
"""
from __future__ import annotations

import numpy as np

COLORS = ["#e08a1e", "#3a6ea5", "#c0504d", "#9bbb59", "#8064a2", "#4bacc6", "#7f7f7f"]  # gold is black


def mean_curve(curves: list[list[dict]], x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    """Point-wise means over seeds of curves recorded at the same steps (or n)."""
    return (np.mean([[p[x] for p in c] for c in curves], axis=0), np.mean([[p[y] for p in c] for c in curves], axis=0))


def save_figure(results: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, seeds = results["methods"], sorted(results["per_seed"])
    last = results["settings"]["rounds"] - 1
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))

    ax = axes[0]
    for color, meth in zip(COLORS, methods):
        rows = [results["per_seed"][s][meth][last] for s in seeds]
        ax.plot(*mean_curve([r["pg_curve"] for r in rows], "kl", "true"), color=color, label=f"{meth}: policy gradient")
        ax.plot(*mean_curve([r["best_of_n"] for r in rows], "kl", "true"), color=color, ls="--", marker="o", ms=3,
                label=f"{meth}: best-of-n")
    gold = [results["gold"][s] for s in seeds]
    ax.plot(*mean_curve([g["pg_curve"] for g in gold], "kl", "true"), color="black", lw=1, label="gold: policy gradient")
    ax.plot(*mean_curve([g["best_of_n"] for g in gold], "kl", "true"), color="black", lw=1, ls="--", marker="o", ms=3,
            label="gold: best-of-n")
    ax.set_xlabel("KL(policy || base), nats per response")
    ax.set_ylabel("true score (mean over seeds)")
    ax.set_title(f"Optimising against round-{last} reward models")
    ax.legend(fontsize=7)

    ax = axes[1]
    acc = results["summary"]["by_method"]["acc_current"]
    rounds = np.arange(results["settings"]["rounds"])
    width = 0.8 / len(methods)
    for i, (color, meth) in enumerate(zip(COLORS, methods)):
        cis = acc[meth]
        mean = np.array([c["mean"] for c in cis])
        err = np.array([[c["mean"] - c["lo"] for c in cis], [c["hi"] - c["mean"] for c in cis]])
        ax.bar(rounds + (i - (len(methods) - 1) / 2) * width, mean, width, yerr=err, color=color, capsize=3, label=meth)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xticks(rounds)
    ax.set_xlabel("round (round 0: base policy; round r: the round r-1 policy)")
    ax.set_ylabel("accuracy on the current policy's pairs")
    ax.set_title("Reward model accuracy on the shifted distribution (95% CI)")
    ax.set_ylim(0.3, 1.0)
    ax.legend(fontsize=7)

    ax = axes[2]
    hist = results["gap_histogram"]
    top = max(np.percentile(v, 99) for v in hist["gaps"].values())
    bins = np.linspace(0, top, 40)
    for color, meth in zip(COLORS, methods):
        ax.hist(hist["gaps"][meth], bins=bins, histtype="step", lw=1.5, color=color, label=meth)
    ax.set_xlabel("|r(x, y_i) - r(x, y_j)|")
    ax.set_yscale("log")  # most pairs sit near 0; the tail is where the models differ
    ax.set_ylabel("response pairs (all seeds, log scale)")
    ax.set_title(f"Reward gaps, round {last}, the same samples\n(from the {hist['samples_from']} policy)", fontsize=10)
    ax.legend(fontsize=7)

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
