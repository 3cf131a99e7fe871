"""What the CLI's own loop achieves: `metarm-fast train` run as a user runs it, its steps timed from
its metrics.

    python -m bench.cli_rate --data ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz --tokenizer $MINILM \\
        [--pairs 200] [--steps 25] [--warmup 3] [--max-length 512] [--packing share-prompt] [--against-bench N]
        [-- extra flags]

Writes the first --pairs HH-RLHF pairs as the training file and their prompts, each with its two
responses as one unlabelled k=2 group, as the meta file; runs vanilla and MetaRM through the CLI
(tiny Llama, hidden 256, 4 layers, the MiniLM vocabulary: the throughput bench's model); and reads
each step's `step_s` (the loop's own timer around `step_inputs` + `train_step`) and `tokens` (what
the model ran over, all passes) back from metrics.jsonl. The first --warmup steps are left out of the
medians; the run's cumulative `pairs_per_s`, what the CLI prints, includes them.

Tokens per second is the number to hold against `bench.throughput`'s `tok/s computed`: the CLI draws
its own batches (and, for MetaRM, meta groups from the meta file rather than each step's own
prompts), so its steps hold other numbers of tokens than the bench's. ``--against-bench N`` runs,
N times in turn, `bench.throughput` on the same data, model, batch and layout, then the CLI, and
prints each pair's CLI / bench ratios of step time and tokens per second with their spread.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from bench.hh_records import split_hh

def write_inputs(src: str, n: int, folder: str) -> tuple[str, str]:
    pairs, meta = [], []
    for rec, prompt, chosen, rejected in split_hh(src):
        pairs.append(rec)
        meta.append({"prompt": prompt, "responses": [chosen, rejected]})
        if len(pairs) == n:
            break
    p, m = os.path.join(folder, "pairs.jsonl"), os.path.join(folder, "meta.jsonl")
    for path, rows in ((p, pairs), (m, meta)):
        with open(path, "w") as f:
            f.writelines(json.dumps(x) + "\n" for x in rows)
    return p, m


def step_rows(metrics_path: str) -> list[dict]:
    with open(metrics_path) as f:
        return [r for r in map(json.loads, f) if "step" in r]


def cli_runs(a, pairs: str, meta: str, work: str) -> dict:
    results = {}
    for method in a.methods.split(","):
        out = os.path.join(work, method)
        cmd = [sys.executable, "-m", "metarm_fast.cli", "train", "--method", method, "--model", "tiny-llama",
               "--tokenizer", a.tokenizer, "--tiny-hidden", "256", "--tiny-layers", "4", "--train-data", pairs,
               "--batch-size", str(a.batch), "--max-length", str(a.max_length), "--packing", a.packing,
               "--max-steps", str(a.steps), "--output-dir", out, "--overwrite", "--no-progress", "--save-every", "0",
               *a.extra]
        if method == "metarm":
            cmd[cmd.index("--train-data"):cmd.index("--train-data")] = ["--meta-data", meta, "--meta-batch-size", str(a.batch)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        rows = step_rows(os.path.join(out, "metrics.jsonl"))
        timed = rows[a.warmup:]
        times = [r["step_s"] for r in timed]
        med = statistics.median(times)
        tok_s = statistics.median(r["tokens_per_s"] for r in timed)
        results[method] = {"step_s_median": med, "min": min(times), "max": max(times), "steps": len(timed),
                           "pairs_per_s": a.batch / med, "tokens_per_step": statistics.mean(r["tokens"] for r in timed),
                           "tokens_per_s_median": tok_s, "cumulative_pairs_per_s": rows[-1]["pairs_per_s"]}
        print(f"{method:<8} [{a.packing}] CLI step ms median {med * 1e3:.1f} [{min(times) * 1e3:.1f}, "
              f"{max(times) * 1e3:.1f}] over steps {a.warmup + 1}-{len(rows)}: {a.batch / med:.1f} pairs/s, "
              f"{results[method]['tokens_per_step']:,.0f} tokens/step, {tok_s:,.0f} tok/s computed (median); "
              f"cumulative over all {len(rows)} steps (what the CLI prints): {rows[-1]['pairs_per_s']:.1f} pairs/s",
              flush=True)
    return results


def bench_runs(a, work: str) -> dict:
    """bench.throughput on the same data, model, batch and layout (its own batches and meta groups)."""
    out = os.path.join(work, "bench.json")
    cmd = [sys.executable, "-m", "bench.throughput", "--data", a.data, "--tokenizer", a.tokenizer, "--batch",
           str(a.batch), "--steps", "12", "--max-length", str(a.max_length), "--packing", a.packing, "--methods",
           a.methods, "--out", out]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(out) as f:
        rows = json.load(f)["rows"]
    results = {}
    for r in rows:
        if r["method"] in a.methods.split(",") and r["packing"] == a.packing:
            results[r["method"]] = {"step_s_median": r["step_s"]["median"],
                                    "tokens_per_step": r["tokens_computed_per_step"],
                                    "tokens_per_s_median": r["tokens_computed_per_s"]["median"]}
            print(f"{r['method']:<8} [{a.packing}] bench step ms median {r['step_s']['median'] * 1e3:.1f}, "
                  f"{r['tokens_computed_per_step']:,.0f} tokens/step, "
                  f"{r['tokens_computed_per_s']['median']:,.0f} tok/s computed (median)", flush=True)
    return results


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--packing", default="share-prompt")
    ap.add_argument("--methods", default="vanilla,metarm")
    ap.add_argument("--against-bench", type=int, default=0, metavar="N",
                    help="N times in turn: bench.throughput at the same settings, then the CLI; paired ratios")
    ap.add_argument("extra", nargs="*", help="more `metarm-fast train` flags (after --)")
    a = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="cli-rate-")
    pairs, meta = write_inputs(a.data, a.pairs, work)
    if not a.against_bench:
        return cli_runs(a, pairs, meta, work)
    ratios = {m: {"step": [], "tokens_per_s": []} for m in a.methods.split(",")}
    for i in range(a.against_bench):
        print(f"-- pair {i + 1} of {a.against_bench}")
        bench, cli = bench_runs(a, work), cli_runs(a, pairs, meta, work)
        for m in ratios:
            ratios[m]["step"].append(cli[m]["step_s_median"] / bench[m]["step_s_median"])
            ratios[m]["tokens_per_s"].append(cli[m]["tokens_per_s_median"] / bench[m]["tokens_per_s_median"])
    for m, r in ratios.items():
        print(f"{m:<8} CLI / bench over {a.against_bench} pairs: step time median {statistics.median(r['step']):.3f} "
              f"[{min(r['step']):.3f}, {max(r['step']):.3f}], tok/s computed median "
              f"{statistics.median(r['tokens_per_s']):.3f} [{min(r['tokens_per_s']):.3f}, {max(r['tokens_per_s']):.3f}]")
    return ratios


if __name__ == "__main__":
    main()
