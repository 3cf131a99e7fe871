"""What the CLI's own loop achieves: `metarm-fast train` run as a user runs it, its steps timed from
its metrics.

    python -m bench.cli_rate --data ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz --tokenizer $MINILM \\
        [--pairs 200] [--steps 25] [--warmup 3] [--max-length 512] [--packing share-prompt] [-- extra flags]

Writes the first --pairs HH-RLHF pairs as the training file and their prompts, each with its two
responses as one unlabelled k=2 group, as the meta file; runs vanilla and MetaRM through the CLI
(tiny Llama, hidden 256, 4 layers, the MiniLM vocabulary: the throughput bench's model); and reads
each step's time back from metrics.jsonl, whose cumulative `pairs_per_s` is pairs done over the
loop's own timer (`step_inputs` + `train_step`, what RewardTrainer.train times). The first --warmup
steps are left out: the run's cumulative rate includes them, which is why a 5-step run reads slower.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile

HH_TURN = "\n\nAssistant:"


def write_inputs(src: str, n: int, folder: str) -> tuple[str, str]:
    pairs, meta = [], []
    with gzip.open(src, "rt") if src.endswith(".gz") else open(src) as f:
        for line in f:
            rec = json.loads(line)
            c, r = rec["chosen"], rec["rejected"]
            cut = c.rfind(HH_TURN) + len(HH_TURN)
            if cut < len(HH_TURN) or r[:cut] != c[:cut] or not c[cut:].strip() or not r[cut:].strip():
                continue  # no shared prompt to split off, or an empty response (the CLI refuses those)
            pairs.append(rec)
            meta.append({"prompt": c[:cut], "responses": [c[cut:], r[cut:]]})
            if len(pairs) == n:
                break
    p, m = os.path.join(folder, "pairs.jsonl"), os.path.join(folder, "meta.jsonl")
    for path, rows in ((p, pairs), (m, meta)):
        with open(path, "w") as f:
            f.writelines(json.dumps(x) + "\n" for x in rows)
    return p, m


def step_times(metrics_path: str) -> list[float]:
    """Per-step seconds from the cumulative pairs/s the loop writes (pairs done / its timer)."""
    out, prev_t = [], 0.0
    done = 0
    with open(metrics_path) as f:
        for line in f:
            rec = json.loads(line)
            if "step" not in rec:
                continue
            done += rec.get("pairs", 0)
            t = done / rec["pairs_per_s"]
            out.append(t - prev_t)
            prev_t = t
    return out


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
    ap.add_argument("extra", nargs="*", help="more `metarm-fast train` flags (after --)")
    a = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="cli-rate-")
    pairs, meta = write_inputs(a.data, a.pairs, work)
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
        times = step_times(os.path.join(out, "metrics.jsonl"))
        timed = times[a.warmup:]
        med = statistics.median(timed)
        results[method] = {"step_s_median": med, "min": min(timed), "max": max(timed), "steps": len(timed),
                           "pairs_per_s": a.batch / med, "cumulative_pairs_per_s": a.batch * len(times) / sum(times)}
        print(f"{method:<8} [{a.packing}] CLI step ms median {med * 1e3:.1f} [{min(timed) * 1e3:.1f}, "
              f"{max(timed) * 1e3:.1f}] over steps {a.warmup + 1}-{len(times)}: {a.batch / med:.1f} pairs/s; "
              f"cumulative over all {len(times)} steps (what the CLI prints): {results[method]['cumulative_pairs_per_s']:.1f} pairs/s")
    return results


if __name__ == "__main__":
    main()
