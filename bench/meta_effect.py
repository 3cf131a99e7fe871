"""What the meta step does to the update, before any GPU hour is spent: the change it makes to grad L,
and how much of that change the first-order term explains.

    python -m bench.meta_effect [--tasks synthetic,hh] [--data $DATA --model $MINILM] [--seeds 0,1,2]
                                [--directions sgd,adam,optimizer-step] [--eta-multiples 1,10]
                                [--precisions fp32,bf16-master] [--out bench/results/meta_effect] [--quick]

MetaRM's update is grad L at theta' = theta + u, the meta step's move u (eta * grad J for sgd). To
first order,

    grad L(theta + u) = grad L(theta) + H_L(theta) u + O(|u|^2),

so what the meta step adds to a vanilla update is, to first order, the Hessian of L applied to the
move. At the paper's eta = lr and the sgd direction, |u| = lr * |grad J|: the term is lr * H_L grad J,
and its size against grad L says whether the meta step can matter at all.

Design. For each task, seed and precision, a vanilla run of the trainer (``RewardTrainer``, through
its public step) is probed at three points of its training (after the first step, so AdamW has
second moments; half-way; at 90%: at the very end the cosine schedule's rate is 0, and the
optimizer-step direction, which follows the schedule, would not move). At each point, on ``--batches`` batches of that step's pairs
and meta groups, for each direction and eta:
- the actual change: grad L at theta and at the theta' the meta step itself makes (``MetaStep``,
  the trainer's own transaction, whose restore is bitwise), as the trainer's
  ``--meta-diagnostic-every`` reads it: rel_change = ||grad L(theta') - grad L(theta)|| / ||grad L(theta)||
  and the cosine between the two gradients;
- the first-order term (fp32 only): t = H_L(theta) u, u the move read off the weights the L pass
  saw, by double backward (``hessian_vector_products``): first_order = ||t|| / ||grad L(theta)||, and
  how well it predicts the change, cos(t, change) and residual = ||change - t|| / ||change||;
- the largest per-weight move over eta, max |u| / eta, and the realised/intended perturbation norm.
The probes run with dropout off (the model in eval mode; MiniLM's is 0.1), so that the passes at
theta and theta' differ by the weights alone (the trainer's diagnostic replays the masks instead).
The optimizer-step direction changes AdamW's state; each probe puts the state back, so the probes
never alter the run. Tasks: ``synthetic``, the trainer's default (tiny Llama, synthetic preference
pairs, its synthetic meta set, lr 1e-3, 200 steps of 16 pairs); ``hh``, all-MiniLM-L6-v2 on the
HH-RLHF slice of ``bench.hh_shift`` (single-turn pairs to train, multi-turn prompts as k = 2 meta
groups; lr 2e-5, 100 steps of 8 pairs, 128 tokens).

Statistics: per seed, the median over its probes (points x batches); then the mean over seeds and
a 95% percentile bootstrap interval over seeds (``bench.shift_stats``). Output: the table, and
--out/meta_effect.json with every probe.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from bench.shift import environment as shift_environment
from bench.shift import git_commit
from bench.shift_stats import bootstrap_mean, fmt
from metarm_fast.config import META_DIRECTIONS, TrainConfig
from metarm_fast.kernels import bt_loss_reference
from metarm_fast.meta_step import MetaStep
from metarm_fast.second_order import hessian_vector_products
from metarm_fast.steps import dot_products, gradient_readings, j_pass, l_pass
from metarm_fast.threads import set_threads
from metarm_fast.trainer import RewardTrainer

READINGS = [("rel_change", "grad L rel. change"), ("cosine", "cosine"), ("first_order", "first-order term (rel.)"),
            ("first_order_cos", "cos(term, change)"), ("residual", "residual (rel.)"), ("max_move", "max move / eta"),
            ("realised", "realised / intended")]
TASK_ORDER = ["synthetic", "hh"]


@dataclasses.dataclass
class Task:
    name: str
    steps: int  # vanilla training steps; probed after step 1, at steps // 2 and at the end
    config: dict  # TrainConfig fields


def tasks(a, work: str) -> list[Task]:
    out = []
    for name in a.tasks.split(","):
        if name == "synthetic":
            out.append(Task("synthetic", 8 if a.quick else 200,
                            dict(max_records=256 if a.quick else None, batch_size=16, meta_batch_size=8)))
        elif name == "hh":
            if not (a.data and a.model):
                raise SystemExit("bench.meta_effect: the hh task needs --data (HH-RLHF jsonl.gz) and --model (MiniLM folder)")
            from bench.hh_shift import split_records, write_files

            paths = write_files(split_records(a.data), work)
            out.append(Task("hh", 6 if a.quick else 100,
                            dict(model=a.model, train_data=paths["train"], meta_data=paths["meta"], lr=2e-5,
                                 max_length=64 if a.quick else 128, batch_size=8, meta_batch_size=8)))
        else:
            raise SystemExit(f"bench.meta_effect: unknown task {name!r} (synthetic, hh)")
    return out


def _grads(params):
    return [p.grad.detach().clone() for p in params]


def probe(tr: RewardTrainer, micro, groups, combos, first_order: bool) -> list[dict]:
    """The probes of one batch at the current weights, one per (direction, eta) in ``combos``: the
    change the meta step makes to grad L, and its first-order prediction. grad L(theta), grad J and
    the Hessian's graph are computed once for all of them. The weights and the optimizer's state are
    as before on return."""
    params = tr.weights.params
    pairs, meta_batch = [tr.batcher.pairs(m) for m in micro], tr.batcher.groups(groups)
    tr.weights.zero_grads()
    l_pass(tr.model, pairs)
    g0 = _grads(params)
    tr.weights.zero_grads()
    j_pass(tr.model, meta_batch)
    g_j = _grads(params)
    theta = [p.detach().clone() for p in params]
    rows, moves = [], []
    for direction, eta in combos:
        state = copy.deepcopy(tr.optimizer.state_dict())
        meta = MetaStep(tr.weights, eta=eta, direction=direction, optimizer=tr.optimizer,
                        max_grad_norm=tr.cfg.max_grad_norm)
        with torch.no_grad():
            for p, g in zip(params, g_j):
                p.grad.copy_(g)
        with meta.perturbed(measure_move=True) as stats:
            u = [p.detach().float() - t.float() for p, t in zip(params, theta)]  # the move the L pass sees
            l_pass(tr.model, pairs)
        g1 = _grads(params)
        tr.optimizer.load_state_dict(state)  # the optimizer-step direction stepped AdamW on -J
        assert all(torch.equal(p, t) for p, t in zip(params, theta)), "the meta step did not restore theta"
        read = gradient_readings(g1, g0)  # what the trainer's --meta-diagnostic-every logs
        rows.append({"rel_change": read["meta_grad_rel_change"], "cosine": read["meta_grad_cosine"],
                     "max_move": stats.max_move / eta, "realised": stats.ratio,
                     "_change": [b.float() - a.float() for a, b in zip(g0, g1)], "_gg": dot_products(g0, g0)[1]})
        moves.append(u)
    if first_order:
        assert len(pairs) == 1

        def loss():
            r = tr.model(pairs[0])
            n = r.shape[0] // 2
            return bt_loss_reference(r[:n].float(), r[n:].float(), margin=pairs[0].margin)

        for row, hu in zip(rows, hessian_vector_products(loss, params, moves)):
            change, gg = row["_change"], row["_gg"]
            t = [torch.zeros_like(c) if h is None else h.float() for h, c in zip(hu, change)]
            tc, tt, cc, rr = dot_products(t, change)
            row.update(first_order=(tt / gg) ** 0.5, first_order_cos=tc / max((tt * cc) ** 0.5, 1e-300),
                       residual=(rr / max(cc, 1e-300)) ** 0.5)
    tr.weights.zero_grads()
    return [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]


def run(task: Task, seed: int, precision: str, a, work: str, threads: int, log) -> list[dict]:
    cfg = TrainConfig(method="metarm", seed=seed, precision=precision, max_steps=task.steps, progress=False,
                      output_dir=os.path.join(work, f"{task.name}-{precision}-{seed}"), overwrite=True, save_every=0,
                      threads=threads, warmup_ratio=0.05, **task.config)
    tr = RewardTrainer(cfg, log=lambda *x, **k: None)
    points = sorted({1, task.steps // 2, task.steps - task.steps // 10})
    rows = []
    while tr.step < task.steps:
        tr.train_step(tr.step_inputs(tr.step)[0])  # vanilla: the pairs of the step, no meta groups
        if tr.step not in points:
            continue
        t0 = time.perf_counter()
        tr.model.eval()  # dropout off for the probes (MiniLM has 0.1): the change is the meta step's alone
        combos = [(d, float(m)) for d in a.directions.split(",") for m in a.eta_multiples.split(",")]
        for b in range(a.batches):
            micro, groups = tr.step_inputs(tr.step + b)  # the batches the run would take next
            found = probe(tr, micro, groups, [(d, m * tr.cfg.lr) for d, m in combos], first_order=precision == "fp32")
            for (direction, mult), r in zip(combos, found):
                rows.append({"task": task.name, "seed": seed, "precision": precision, "step": tr.step, "batch": b,
                             "direction": direction, "eta_multiple": mult, **r})
        tr.model.train()
        log(f"  {task.name} {precision} seed {seed} step {tr.step}: probed in {time.perf_counter() - t0:.1f} s")
    return rows


def summarise(rows: list[dict]) -> tuple[list[dict], str]:
    """Per (task, precision, direction, eta): each reading's per-seed median, then mean [95% CI] over seeds."""
    keys = sorted({(r["task"], r["precision"], r["direction"], r["eta_multiple"]) for r in rows},
                  key=lambda k: (TASK_ORDER.index(k[0]), k[1] != "fp32", META_DIRECTIONS.index(k[2]), k[3]))
    summary, lines = [], ["| task | precision | direction | eta | " + " | ".join(h for _, h in READINGS) + " |",
                          "| --- | --- | --- | --- |" + " --- |" * len(READINGS)]
    for k in keys:
        sel = [r for r in rows if (r["task"], r["precision"], r["direction"], r["eta_multiple"]) == k]
        seeds = sorted({r["seed"] for r in sel})
        entry = {"task": k[0], "precision": k[1], "direction": k[2], "eta_multiple": k[3]}
        cells = []
        for name, _ in READINGS:
            per_seed = [statistics.median(r[name] for r in sel if r["seed"] == s) for s in seeds if name in sel[0]]
            if per_seed:
                entry[name] = bootstrap_mean(per_seed)
                cells.append(fmt(entry[name], digits=4) if abs(entry[name]["mean"]) >= 1e-3 else
                             f"{entry[name]['mean']:.2e} [{entry[name]['lo']:.2e}, {entry[name]['hi']:.2e}]")
            else:
                cells.append("-")
        summary.append(entry)
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]:g} lr | " + " | ".join(cells) + " |")
    return summary, "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="synthetic,hh")
    ap.add_argument("--data", default=None, help="HH-RLHF jsonl(.gz), for the hh task")
    ap.add_argument("--model", default=None, help="the all-MiniLM-L6-v2 folder, for the hh task")
    ap.add_argument("--seeds", default=None, help="default 0,1,2 (--quick: 0)")
    ap.add_argument("--directions", default=",".join(META_DIRECTIONS))
    ap.add_argument("--eta-multiples", default="1,10", help="eta as multiples of the task's lr")
    ap.add_argument("--precisions", default="fp32,bf16-master")
    ap.add_argument("--batches", type=int, default=2, help="probe batches at each probed step")
    ap.add_argument("--out", default=None, help="default bench/results/meta_effect (--quick: runs/meta-effect-quick)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch; 0: torch's default")
    ap.add_argument("--quick", action="store_true", help="a seconds-long run of every part (checks, not numbers)")
    argv = sys.argv[1:] if argv is None else list(argv)
    a = ap.parse_args(argv)
    seeds = [int(x) for x in (a.seeds or ("0" if a.quick else "0,1,2")).split(",")]
    out = a.out or ("runs/meta-effect-quick" if a.quick else "bench/results/meta_effect")
    os.makedirs(out, exist_ok=True)
    threads = set_threads(a.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    start, commit, rows = time.perf_counter(), git_commit(), []
    with tempfile.TemporaryDirectory(prefix="bench-meta-effect-") as work:
        for task in tasks(a, work):
            for precision in a.precisions.split(","):
                for seed in seeds:
                    rows += run(task, seed, precision, a, work, threads, log=lambda m: print(m, flush=True))
    summary, text = summarise(rows)
    env = shift_environment(threads, argv, commit)
    env["command"] = "python -m bench.meta_effect" + ("" if not argv else " " + " ".join(argv))
    env["wall_s"] = round(time.perf_counter() - start, 1)
    result = {"seeds": seeds, "readings": [k for k, _ in READINGS], "summary": summary, "table": text,
              "probes": rows, "environment": env}
    with open(os.path.join(out, "meta_effect.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"{len(seeds)} seeds ({','.join(map(str, seeds))}); per seed the median over its probes; "
          "mean [95% bootstrap CI over seeds]")
    print(text)
    print(f"wall time {env['wall_s']} s; wrote {out}/meta_effect.json")
    return result


if __name__ == "__main__":
    main()
