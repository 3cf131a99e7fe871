"""The real-data arm of the MetaRM experiment: a pretrained reward model on HH-RLHF, its meta set
from another distribution than its training pairs, over seeds.

    python -m bench.hh_shift --data ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz --tokenizer $MINILM \\
        [--seeds 0,1,2] [--max-length 128] [--out bench/results/hh_shift]

The shift is the conversation's length. The reward model (all-MiniLM-L6-v2, `--tokenizer` is its
folder, which also holds its weights) trains on the single-turn conversations, with 100 of them
held out. The multi-turn conversations are the other distribution: half are the meta set (each
prompt with its two responses as one unlabelled k=2 group, labels dropped), and the other half are
labelled pairs for the shifted accuracy. The split is fixed; each seed changes the head's
initialisation and the data order. For each seed, vanilla and MetaRM (eta = lr, as in the paper)
run through `metarm-fast train`, and each result is measured:
- the accuracy on the held-out single-turn pairs (`metarm-fast eval`);
- the accuracy on the multi-turn pairs;
- the mean reward gap on the meta set's groups, which the trainer measures at the end.
The printout has the means with 95% bootstrap intervals over seeds, and the paired MetaRM - vanilla
differences. The JSON in --out holds every seed's numbers and the environment.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from bench.hh_records import split_hh
from bench.shift import git_commit
from bench.shift_stats import bootstrap_mean, excludes_zero, fmt

TURN_H = "\n\nHuman:"
SINGLE_HELD_OUT = 100
METRICS = [("single_acc", "single-turn acc (held out)"), ("multi_acc", "multi-turn acc (shifted)"),
           ("meta_gap", "meta-set reward gap")]


def split_records(path: str) -> dict[str, list[dict]]:
    """Single-turn and multi-turn pairs with a shared prompt and two non-empty responses."""
    out: dict[str, list[dict]] = {"single": [], "multi": []}
    for _, prompt, chosen, rejected in split_hh(path):
        kind = "single" if prompt.count(TURN_H) == 1 else "multi"
        out[kind].append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def write_files(recs: dict[str, list[dict]], folder: str) -> dict[str, str]:
    single, multi = recs["single"], recs["multi"]
    half = len(multi) // 2
    rows = {
        "train": single[SINGLE_HELD_OUT:],
        "single_eval": single[:SINGLE_HELD_OUT],
        "meta": [{"prompt": m["prompt"], "responses": [m["chosen"], m["rejected"]]} for m in multi[:half]],
        "multi_eval": multi[half:],
    }
    paths = {}
    for name, items in rows.items():
        paths[name] = os.path.join(folder, f"{name}.jsonl")
        with open(paths[name], "w") as f:
            f.writelines(json.dumps(x) + "\n" for x in items)
    return paths


def cli(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "metarm_fast.cli", *args], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"metarm-fast {args[0]} failed:\n{r.stderr[-3000:]}")
    return r.stdout


def run_one(a, paths: dict[str, str], method: str, seed: int, out: str) -> dict:
    cli("train", "--method", method, "--model", a.tokenizer, "--train-data", paths["train"], "--eval-data",
        paths["multi_eval"], "--meta-data", paths["meta"], "--meta-batch-size", str(a.batch), "--batch-size",
        str(a.batch), "--max-length", str(a.max_length), "--lr", str(a.lr), "--seed", str(seed), "--output-dir", out,
        "--overwrite", "--no-progress", "--save-every", "0")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        final = [json.loads(line)["final"] for line in f if '"final"' in line][-1]
    single = json.loads(cli("eval", "--model", out, "--data", paths["single_eval"]).strip().splitlines()[-1])
    return {"single_acc": single["accuracy"], "multi_acc": final["eval"]["accuracy"],
            "meta_gap": final["meta_gaps"]["mean"], "meta_gap_initial": final["meta_gaps_initial"]["mean"],
            "train_time_s": final["train_time_s"]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="HH-RLHF jsonl(.gz)")
    ap.add_argument("--tokenizer", required=True, help="the all-MiniLM-L6-v2 folder (its weights and tokenizer)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--out", default=None, help="folder for results.json")
    a = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="hh-shift-")
    recs = split_records(a.data)
    paths = write_files(recs, work)
    print(f"single-turn pairs: {len(recs['single']) - SINGLE_HELD_OUT} train, {SINGLE_HELD_OUT} held out; "
          f"multi-turn: {len(recs['multi']) // 2} meta groups, {len(recs['multi']) - len(recs['multi']) // 2} "
          "labelled pairs", flush=True)
    seeds = [int(s) for s in a.seeds.split(",")]
    per_seed: dict[str, dict[int, dict]] = {"vanilla": {}, "metarm": {}}
    for seed in seeds:
        for method in per_seed:
            r = run_one(a, paths, method, seed, os.path.join(work, f"{method}-{seed}"))
            per_seed[method][seed] = r
            print(f"seed {seed} {method:<8} " + ", ".join(f"{k} {v:.4f}" for k, v in r.items()), flush=True)
    summary = {}
    print(f"\nover {len(seeds)} seeds: mean [95% bootstrap interval]")
    print(f"{'':<28} {'vanilla':<24} {'MetaRM':<24} {'MetaRM - vanilla':<26}")
    for key, label in METRICS:
        van = [per_seed["vanilla"][s][key] for s in seeds]
        met = [per_seed["metarm"][s][key] for s in seeds]
        diff = bootstrap_mean([m - v for m, v in zip(met, van)])
        summary[key] = {"vanilla": bootstrap_mean(van), "metarm": bootstrap_mean(met), "diff": diff,
                        "diff_excludes_zero": excludes_zero(diff)}
        print(f"{label:<28} {fmt(summary[key]['vanilla']):<24} {fmt(summary[key]['metarm']):<24} "
              f"{fmt(diff, signed=True):<26}{' (excludes 0)' if excludes_zero(diff) else ''}")
    result = {"per_seed": per_seed, "summary": summary,
              "environment": {"command": "python -m bench.hh_shift" + ("" if argv is None else " " + " ".join(argv)),
                              "argv": sys.argv[1:] if argv is None else argv, "commit": git_commit(),
                              "cpu_cores": os.cpu_count()}}
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "results.json"), "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
