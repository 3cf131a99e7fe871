"""Where a training step's time goes: torch.profiler over `RewardTrainer.train_step`, by category.

    python -m bench.profile --data ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz --tokenizer $MINILM \\
        [--hidden 256] [--layers 4] [--batch 8] [--packing share-prompt] [--steps 3] [--warmup 2] [--compile]

The trainer is built as the CLI builds it (the throughput bench's settings), the step is the one
the CLI's loop runs, and MetaRM's meta batch is each step's own prompts with their two responses as
one group (as in bench.throughput). Each aten op's *self* time (its own work, its children not
counted) goes to one category by its name; ops under ``Optimizer.step`` go to "optimizer" whatever
they are. "python + dispatch" is the step's wall time that no op accounts for: the interpreter,
transformers' module code, autograd's bookkeeping between ops. The meta machinery (perturb and
restore) is the trainer's own timing of it (``meta_perturb_ms``, ``meta_restore_ms``), since its ops
are elementwise ops like any other.
"""
from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict

import torch

# First match wins: an op's name (lower case) containing one of these fragments.
CATEGORIES = (
    ("attention", ("scaled_dot_product", "_flash_attention", "flex_attention", "_efficient_attention")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm")),
    ("embedding / gather", ("embedding", "index", "gather", "scatter", "take")),
    ("copies / layout", ("aten::copy_", "aten::cat", "aten::contiguous", "aten::clone", "aten::_to_copy",
                         "aten::transpose", "aten::view", "aten::reshape", "aten::slice", "aten::select",
                         "aten::expand", "aten::permute", "aten::t", "aten::unsqueeze", "aten::squeeze",
                         "aten::as_strided", "aten::empty", "aten::zeros", "aten::fill_", "aten::zero_",
                         "aten::split", "aten::chunk", "aten::stack", "aten::narrow", "aten::detach",
                         "aten::ones", "aten::resize_", "aten::_unsafe_view", "aten::alias")),
)


def categorise(name: str) -> str:
    n = name.lower()
    for cat, frags in CATEGORIES:
        if any(n.startswith(f) or f in n for f in frags):
            return cat
    if n.startswith("aten::"):
        return "elementwise (norm, rope, silu, loss)"
    return "other"


def breakdown(prof, wall_s: float) -> dict[str, float]:
    """Seconds by category over the profiled steps (self times; optimizer ops attributed as a whole)."""
    out: dict[str, float] = defaultdict(float)
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CPU:
            continue
        parent, in_opt = evt, False
        while parent is not None:
            if parent.name.startswith("Optimizer.step") or parent.name.startswith("Optimizer.zero_grad"):
                in_opt = True
                break
            parent = parent.cpu_parent
        if not evt.name.startswith("aten::") and not in_opt:
            continue  # record_function ranges and autograd nodes: their time is their children's + overhead
        if in_opt and not evt.name.startswith("aten::"):
            continue
        out["optimizer" if in_opt else categorise(evt.name)] += evt.self_cpu_time_total / 1e6
    out["python + dispatch"] = max(0.0, wall_s - sum(out.values()))
    return dict(out)


def main(argv=None) -> dict:
    from bench.throughput import build_config  # the throughput bench's trainer settings
    from metarm_fast.trainer import RewardTrainer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="synthetic")
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--attn", default="auto")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--packing", default="share-prompt")
    ap.add_argument("--methods", default="vanilla,metarm")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=512, help="as TrainConfig.max_length, the CLI default")
    ap.add_argument("--max-records", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile", action="store_true", help="torch.compile the reward model (TrainConfig.compile)")
    ap.add_argument("--top", type=int, default=12, help="also print the top ops by self time")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    a.repeat = 1  # build_config sizes the schedule by (warmup + steps) * repeat
    results = {}
    for method in a.methods.split(","):
        cfg = build_config(a, a.packing)  # reads a.compile too
        tr = RewardTrainer(cfg, log=lambda *x, **k: None)

        def step(s):
            micro, _ = tr.step_inputs(s)
            groups = [[p.chosen, p.rejected] for mb in micro for p in mb] if method == "metarm" else None
            m = tr.train_step(micro, groups)
            return m

        for s in range(a.warmup):
            step(s)
        ms = []
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for s in range(a.warmup, a.warmup + a.steps):
                ms.append(step(s))
            wall = time.perf_counter() - t0
        b = breakdown(prof, wall)
        machinery = sum(m.get("meta_perturb_ms", 0) + m.get("meta_restore_ms", 0) for m in ms) / 1e3
        print(f"\n{method} [{a.packing}], hidden {a.hidden}, {a.layers} layers, batch {a.batch}"
              f"{', compiled' if a.compile else ''}: {wall / a.steps * 1e3:.1f} ms per step (profiled, "
              f"{a.steps} steps, profiler overhead included)")
        for cat, sec in sorted(b.items(), key=lambda kv: -kv[1]):
            print(f"  {cat:<38} {sec / a.steps * 1e3:8.1f} ms  {sec / wall * 100:5.1f}%")
        if method == "metarm":
            print(f"  (of which meta perturb + restore, trainer-timed: {machinery / a.steps * 1e3:.1f} ms, "
                  f"{machinery / wall * 100:.1f}%)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.top, max_name_column_width=50))
        results[method] = {"wall_s": wall, "steps": a.steps, "breakdown_s": b, "machinery_s": machinery}
    return results


if __name__ == "__main__":
    main()
