"""Does MetaRM help? A gold-reward RLHF experiment on the synthetic task, over seeds.

    python -m bench.shift [--seeds 0,1,2,3,4,5,6,7] [--out bench/results/shift] [--threads N] [--quick]
                          [--meta-directions sgd,adam,optimizer-step]

The synthetic task (``metarm_fast.synthetic``) knows the true reward, so both questions can be
answered exactly: does the meta step of MetaRM (Dou et al., "MetaRM", AAAI 2025) make a reward model
better on the distribution of the policy it faces, and does a policy optimised against it reach a
higher true score?

Design. Seven reward models per seed: vanilla (Bradley-Terry only; eta = 0 is bitwise vanilla,
tested elsewhere, so vanilla stands for it) and MetaRM at eta = lr (the paper's choice) and
eta = 10 lr, each with three meta directions (``--meta-direction`` of the trainer): the paper's
d = grad J (sgd), grad J preconditioned by AdamW's own second moments (adam), and one step of the
run's AdamW on -J (optimizer-step, the DeepSpeed reading of the authors' code). Each runs its own
chain of rounds r = 0, 1, 2 (Algorithm 1):

1. The current policy P_r (P_0: the base policy) supplies the round's meta set (prompts with k
   unlabelled responses), a labelled evaluation set (pairs of its responses, the true score
   deciding) and a held-out group set for the reward gaps. Every chain draws these with the same
   random streams, so at round 0 all three see the same samples.
2. The reward model RM_r trains on the same labelled base-policy pairs every round. Round 0 starts
   from a fresh tiny Llama; round r > 0 continues from RM_{r-1}'s weights for fewer steps (a fresh
   optimizer and schedule), MetaRM with P_r's meta set. This is the paper's procedure: the reward
   model keeps its preference data and is adapted to each new policy's distribution through the
   meta set; continuing keeps what earlier rounds learnt, and vanilla continues for the same number
   of steps, so both get the same Bradley-Terry updates and differ only by the meta step.
3. Against RM_r, two optimisers (``bench.shift_optimise``): best-of-n over base samples
   (n = 1, 2, 4, ..., KL = log n - (n - 1)/n), and a policy-gradient policy pi_r with a KL penalty to
   the base (a softmax over the 64 words with a per-word logit and a weight on the task's in-prompt
   feature, ``metarm_fast.synthetic_policy``; its KL and true score are exact, not sampled). Each
   round's policy gradient starts from the base: with a KL penalty to the base its optimum does not
   depend on the start, and the curve of true score against KL then starts at 0 every round.
4. pi_r is P_{r+1}: the next round's meta set and evaluation pairs come from the policy-gradient
   policy (the one trained like the paper's PPO policy, not best-of-n, which is no policy of its own).

A gold reference per seed optimises the true score itself with the same optimisers (the ceiling).

What the meta step did, per MetaRM chain and round, from the trainer's own diagnostic
(``--meta-diagnostic-every 8``, which leaves the training bitwise unchanged): the median over the
run's diagnostic steps of ||grad L(theta') - grad L(theta)|| / ||grad L(theta)|| and of the cosine
between the two, the median realised/intended perturbation ratio, and the largest per-weight move
over eta seen in the run.

Measured per seed, chain and round: accuracy of RM_r on P_r's labelled pairs (``acc_current``, the
distribution it was adapted to) and on pi_r's (``acc_optimised``, the policy optimised against it);
the mean reward gap |r_i - r_j| over responses of the same prompt on P_r's held-out groups
(``gap_current``) and on one common set (the eta = lr chain's P_r groups, scored by every model:
``gap_common``); pi_r's true score and KL; best-of-16's true score; the curves.

Statistics (``bench.shift_stats``): for every number the mean over seeds with a 95% percentile
bootstrap interval (10,000 resamples of the seeds with replacement, fixed RNG seed 0), and the paired
difference MetaRM - vanilla per seed, bootstrapped the same way. A difference whose interval holds 0
is no detected effect. The seed sets the task (word qualities), the data, the model initialisation,
the data order and all policy sampling.

Output in --out: shift.json (every seed's numbers, the summary, the settings, the environment, the
command and its wall time) and shift.png (``bench.shift_plot``); the table is printed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch

from bench.shift_optimise import RewardScorer, best_of_n_curve, mean_group_gap, policy_gradient, true_reward
from bench.shift_plot import save_figure
from bench.shift_stats import RESAMPLES, readings_table, summarise, table
from metarm_fast.config import META_DIRECTIONS, TINY_MODEL, TrainConfig
from metarm_fast.synthetic import SyntheticTask
from metarm_fast.synthetic_policy import WordPolicy, policy_groups, policy_pairs, prompt_mask, sample_prompts
from metarm_fast.threads import set_threads
from metarm_fast.train_data import encode_pairs
from metarm_fast.trainer import RewardTrainer


@dataclasses.dataclass
class Settings:
    rounds: int = 3
    lr: float = 1e-3  # the tiny model's default learning rate; eta is given as a multiple of it
    eta_multiples: tuple = (1.0, 10.0)
    meta_directions: tuple = META_DIRECTIONS  # --meta-directions: the MetaRM chains' d, each at every eta
    meta_diagnostic_every: int = 8  # the trainer's diagnostic, on MetaRM chains (0: off)
    train_pairs: int = 2048  # labelled base-policy pairs, the same every round
    rm_steps_first: int = 256  # round 0: 2 epochs of 16 pairs a step
    rm_steps_next: int = 128  # each later round
    batch_size: int = 16
    meta_batch_size: int = 8
    meta_prompts: int = 512
    meta_k: int = 4
    max_length: int = 32  # prompts <= 10 words + responses <= 10 words + specials: nothing is cut
    eval_prompts: int = 512  # labelled pairs of each policy (fewer when the policy ties)
    gap_prompts: int = 256
    gap_k: int = 4
    pg_steps: int = 200
    pg_prompts: int = 32  # prompts per policy-gradient step, pg_k responses each
    pg_k: int = 4
    pg_lr: float = 0.05
    # Set once from a development run of the gold reward and one vanilla model, before any MetaRM
    # result was seen: small enough that the policy moves several nats from the base.
    kl_coef: float = 0.03
    pg_record_every: int = 10
    curve_prompts: int = 256  # the exact score and KL are averaged over these prompts
    bon_prompts: int = 128
    bon_n: int = 64  # base samples per prompt; best-of-n for every power of 2 up to it
    bon_table_n: int = 16


QUICK = dict(rounds=2, eta_multiples=(1.0,), meta_directions=("sgd",), meta_diagnostic_every=2, train_pairs=128,
             rm_steps_first=8, rm_steps_next=4, batch_size=8, meta_batch_size=4, meta_prompts=32,
             eval_prompts=32, gap_prompts=16, pg_steps=10, pg_prompts=8, pg_record_every=5, curve_prompts=32,
             bon_prompts=8, bon_n=16)
METRICS = ["acc_current", "acc_optimised", "gap_current", "gap_common", "pg_true", "pg_kl", "bon_true"]
BASELINE = "vanilla"
# What the meta step did (MetaRM chains only), from the trainer's metrics.jsonl: (key, header).
META_METRICS = [("meta_rel_change", "grad L rel. change (median)"), ("meta_cosine", "grad L cosine (median)"),
                ("meta_realised", "realised/intended (median)"), ("meta_max_move", "max move / eta (largest)")]


def headers(s: Settings) -> list[str]:
    return ["acc. current policy", "acc. optimised policy", "reward gap (own samples)", "reward gap (common samples)",
            "PG true score", "PG KL", f"best-of-{s.bon_table_n} true score"]


def methods_of(s: Settings) -> list[tuple[str, str, float | None, str]]:
    """(name, trainer method, eta, meta direction) per chain; the sgd chains keep their plain names."""
    out = [(BASELINE, "vanilla", None, "sgd")]
    for d in s.meta_directions:
        for m in s.eta_multiples:
            out.append((f"metarm eta={m:g}lr" if d == "sgd" else f"metarm {d} eta={m:g}lr", "metarm", m * s.lr, d))
    return out


def write_jsonl(path: str, records: list[dict]) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def train_reward_model(s: Settings, seed: int, rnd: int, method: str, eta, init: str | None, pairs_path: str,
                       meta_groups, folder: str, threads: int, direction: str = "sgd") -> RewardTrainer:
    """One round's reward model through the trainer's public path: data as JSONL files, the
    previous round's exported checkpoint as the model to continue from."""
    os.makedirs(folder, exist_ok=True)
    meta_path = None
    if method == "metarm":
        meta_path = write_jsonl(os.path.join(folder, "meta.jsonl"),
                                [{"prompt": g.prompt, "responses": list(g.responses)} for g in meta_groups])
    # packing="none": the padded layout the published run used (prompt sharing, the default for decoders,
    # gives the same rewards to float rounding, which a whole run amplifies past bitwise repetition).
    cfg = TrainConfig(method=method, model=init or TINY_MODEL, lr=s.lr, eta=eta, meta_direction=direction,
                      train_data=pairs_path, packing="none",
                      meta_data=meta_path, data_format="explicit", max_length=s.max_length,
                      max_steps=s.rm_steps_first if init is None else s.rm_steps_next, batch_size=s.batch_size,
                      meta_batch_size=s.meta_batch_size, seed=seed + 1000 * rnd,
                      output_dir=os.path.join(folder, "run"), overwrite=True, progress=False, save_every=0,
                      keep_last=1, threads=threads,
                      meta_diagnostic_every=s.meta_diagnostic_every if method == "metarm" else 0)
    trainer = RewardTrainer(cfg, log=lambda *a, **k: None)
    trainer.train()
    return trainer


def meta_readings(run_dir: str) -> dict:
    """What the meta step did in one training run, from its metrics.jsonl (see META_METRICS)."""
    rel, cos, ratio, move = [], [], [], []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "meta_realised_ratio" in r:
                ratio.append(r["meta_realised_ratio"])
            if "meta_grad_rel_change" in r:
                rel.append(r["meta_grad_rel_change"])
                cos.append(r["meta_grad_cosine"])
            if "meta_max_move_over_eta" in r:
                move.append(r["meta_max_move_over_eta"])
    if not rel:
        raise RuntimeError(f"{run_dir}: no diagnostic step was logged (meta_diagnostic_every > the run's steps?)")
    return {"meta_rel_change": statistics.median(rel), "meta_cosine": statistics.median(cos),
            "meta_realised": statistics.median(ratio), "meta_max_move": max(move)}


def run_seed(s: Settings, seed: int, work: str, threads: int, log) -> tuple[dict, dict, dict]:
    """One whole experiment: returns (rows[chain][round], gold, last round's common-sample gaps)."""
    task = SyntheticTask(seed)
    pairs_path = write_jsonl(os.path.join(work, f"pairs-{seed}.jsonl"),
                             [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
                              for p in task.pairs("train", n=s.train_pairs)])
    rng = random.Random(seed * 7919 + 17)
    curve_prompts = sample_prompts(rng, s.curve_prompts)
    bon_prompts = sample_prompts(rng, s.bon_prompts)
    bon_responses, _ = WordPolicy().sample(bon_prompts, s.bon_n, torch.Generator().manual_seed(seed * 7919 + 18))
    bon_true = true_reward(task)(bon_prompts, bon_responses)
    ns = [2 ** i for i in range(s.bon_n.bit_length()) if 2 ** i <= s.bon_n]

    def optimise(reward_fn, bon_rewards, stream: int):
        scale = float(bon_rewards.std())  # the reward's spread on base samples (see shift_optimise)
        policy, curve = policy_gradient(reward_fn, scale, task, curve_prompts, steps=s.pg_steps,
                                        prompts_per_step=s.pg_prompts, k=s.pg_k, kl_coef=s.kl_coef, lr=s.pg_lr,
                                        seed=stream, record_every=s.pg_record_every)
        return policy, curve, best_of_n_curve(bon_rewards, bon_true, ns)

    _, gold_curve, gold_bon = optimise(true_reward(task), bon_true, seed * 7919 + 19)
    gold = {"pg_curve": gold_curve, "best_of_n": gold_bon}

    chains = methods_of(s)
    reference = chains[1][0]  # the eta = lr chain supplies the common samples
    current = {name: WordPolicy() for name, _, _, _ in chains}
    init = {name: None for name, _, _, _ in chains}
    rows = {name: [] for name, _, _, _ in chains}
    common_gaps = {}
    for rnd in range(s.rounds):
        trainers, samples = {}, {}
        for name, method, eta, direction in chains:
            t0 = time.perf_counter()
            # The same streams for every chain: same prompts, and the same samples where the policies agree.
            prng, gen = random.Random(seed * 7919 + 100 + rnd), torch.Generator().manual_seed(seed * 7919 + 200 + rnd)
            pol = current[name]
            meta = policy_groups(pol, sample_prompts(prng, s.meta_prompts), s.meta_k, gen, source=f"round {rnd} meta")
            evals = policy_pairs(task, pol, sample_prompts(prng, s.eval_prompts), gen, source=f"round {rnd} eval")
            gaps = policy_groups(pol, sample_prompts(prng, s.gap_prompts), s.gap_k, gen, source=f"round {rnd} gaps")
            folder = os.path.join(work, f"seed{seed}", name.replace(" ", "_"), f"round{rnd}")
            trainers[name] = train_reward_model(s, seed, rnd, method, eta, init[name], pairs_path, meta, folder, threads,
                                                direction)
            samples[name] = (evals, gaps)
            log(f"  seed {seed} round {rnd} {name}: reward model trained in {time.perf_counter() - t0:.1f} s")
        ref_gaps = samples[reference][1]
        for name, method, eta, direction in chains:
            t0 = time.perf_counter()
            trainer, scorer = trainers[name], RewardScorer(trainers[name])
            evals, gaps = samples[name]
            common = mean_group_gap(scorer([g.prompt for g in ref_gaps], [list(g.responses) for g in ref_gaps]))
            own = mean_group_gap(scorer([g.prompt for g in gaps], [list(g.responses) for g in gaps]))
            policy, curve, bon = optimise(scorer, scorer(bon_prompts, bon_responses), seed * 7919 + 300 + rnd)
            opt_pairs = policy_pairs(task, policy, sample_prompts(random.Random(seed * 7919 + 400 + rnd), s.eval_prompts),
                                     torch.Generator().manual_seed(seed * 7919 + 500 + rnd), source=f"round {rnd} optimised")
            with torch.no_grad():
                current_true = float(current[name].expected_score(task, prompt_mask(curve_prompts)).mean())
            rows[name].append({
                "acc_current": trainer.evaluate(encode_pairs(trainer.encoder, evals))["accuracy"],
                # A policy that ties on every prompt gives no pairs: chance, and pairs_optimised says 0.
                "acc_optimised": trainer.evaluate(encode_pairs(trainer.encoder, opt_pairs))["accuracy"] if opt_pairs else 0.5,
                "gap_current": float(own.mean()),
                "gap_common": float(common.mean()),
                "pg_true": curve[-1]["true"],
                "pg_kl": curve[-1]["kl"],
                "bon_true": next(b["true"] for b in bon if b["n"] == s.bon_table_n),
                "current_policy_true": current_true,
                "pairs_current": len(evals),
                "pairs_optimised": len(opt_pairs),
                "pg_curve": curve,
                "best_of_n": bon,
                **(meta_readings(trainer.cfg.output_dir) if method == "metarm" and s.meta_diagnostic_every else {}),
            })
            if rnd == s.rounds - 1:
                common_gaps[name] = [round(float(x), 5) for x in common]
            current[name], init[name] = policy, trainer.cfg.output_dir
            log(f"  seed {seed} round {rnd} {name}: acc {rows[name][-1]['acc_current']:.3f}, "
                f"PG true {curve[-1]['true']:.3f} at KL {curve[-1]['kl']:.2f} ({time.perf_counter() - t0:.1f} s)")
        del trainers
    return rows, gold, common_gaps


def git_commit() -> str | None:
    """The commit the run started from, with "+changes" when the working tree differed from it."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=here).stdout.strip()
    except OSError:
        return None
    return (head + ("+changes" if dirty else "")) or None


def environment(threads: int, argv: list[str], commit: str | None) -> dict:
    return {"torch": torch.__version__, "python": sys.version.split()[0], "platform": platform.platform(),
            "cpu_cores": os.cpu_count(), "threads": threads, "commit": commit,
            "command": "python -m bench.shift" + ("" if not argv else " " + " ".join(argv))}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default=None, help="comma-separated; default 0,1,2,3,4,5,6,7 (--quick: 0,1)")
    ap.add_argument("--out", default=None, help="default bench/results/shift (--quick: runs/shift-quick)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch; 0: torch's default")
    ap.add_argument("--quick", action="store_true", help="a seconds-long run of every part (checks, not numbers)")
    ap.add_argument("--meta-directions", default=None,
                    help="comma-separated meta directions of the MetaRM chains (sgd, adam, optimizer-step); "
                         "default all three (--quick: sgd)")
    argv = sys.argv[1:] if argv is None else list(argv)
    a = ap.parse_args(argv)
    s = Settings(**(QUICK if a.quick else {}))
    if a.meta_directions:
        s = dataclasses.replace(s, meta_directions=tuple(x.strip() for x in a.meta_directions.split(",") if x.strip()))
    seeds = [int(x) for x in (a.seeds or ("0,1" if a.quick else "0,1,2,3,4,5,6,7")).split(",")]
    out = a.out or ("runs/shift-quick" if a.quick else "bench/results/shift")
    os.makedirs(out, exist_ok=True)
    threads = set_threads(a.threads)
    # 45 trainings would each repeat the busy-machine warning and transformers' load/save bars.
    warnings.filterwarnings("ignore", message="the machine is busy")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    start, commit = time.perf_counter(), git_commit()
    per_seed, gold, hist = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-shift-") as work:
        for seed in seeds:
            t0 = time.perf_counter()
            per_seed[seed], gold[seed], gaps = run_seed(s, seed, work, threads, log=print)
            for name, g in gaps.items():
                hist.setdefault(name, []).extend(g)
            print(f"seed {seed} done in {time.perf_counter() - t0:.1f} s", flush=True)
    methods = [name for name, _, _, _ in methods_of(s)]
    summary = summarise(per_seed, methods, s.rounds, METRICS, BASELINE)
    results = {
        "settings": dataclasses.asdict(s), "seeds": seeds, "methods": methods, "metrics": METRICS,
        "bootstrap": {"resamples": RESAMPLES, "interval": "95% percentile, seeds resampled with replacement"},
        "per_seed": per_seed, "gold": gold, "summary": summary,
        "gap_histogram": {"samples_from": f"{methods[1]} chain's current", "round": s.rounds - 1, "gaps": hist},
    }
    text = table(summary, methods, s.rounds, METRICS, headers(s), BASELINE)
    results["table"] = text
    if s.meta_diagnostic_every:
        meta_chains = [m for m in methods if m != BASELINE]
        results["meta_summary"], results["meta_table"] = readings_table(
            per_seed, meta_chains, s.rounds, [k for k, _ in META_METRICS], [h for _, h in META_METRICS])
    save_figure(results, os.path.join(out, "shift.png"))
    results["environment"] = environment(threads, argv, commit)
    results["environment"]["wall_s"] = round(time.perf_counter() - start, 1)
    with open(os.path.join(out, "shift.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"{len(seeds)} seeds ({','.join(map(str, seeds))}); mean [95% bootstrap CI over seeds]; * : the paired "
          f"difference's interval excludes 0")
    print(text)
    if "meta_table" in results:
        print("\nWhat the meta step did (the trainer's --meta-diagnostic-every; mean [95% CI] over seeds):")
        print(results["meta_table"])
    print(f"wall time {results['environment']['wall_s']} s; wrote {out}/shift.json and {out}/shift.png")
    return results


if __name__ == "__main__":
    main()
