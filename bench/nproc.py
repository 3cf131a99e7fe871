"""Data-parallel throughput on this machine: N ranks (torchrun, gloo) against one process, through the
command line a user runs, each process with the same number of threads.

    python -m bench.throughput --nproc 2 [--data D --tokenizer T --batch 8 --steps 10 --threads 1 ...]

Each rank gets --batch pairs per step (the global batch is N x --batch), so a rank does the work of the
one process; pairs/s per rank over pairs/s of one process is the efficiency of the data-parallel
step (1.0: the reductions and agreement cost nothing). The MetaRM meta set is the data's own prompts,
each with its two responses as one group. Timing comes from the runs' metrics.jsonl (the trainer's
own clock around its steps), warm-up steps left out.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile


def _timed_rate(metrics_path: str, warmup: int) -> float:
    rows = [json.loads(x) for x in open(metrics_path) if '"final"' not in x]
    # pairs_per_s is cumulative (pairs done / train seconds): recover the time of the timed steps
    pairs = [sum(r["pairs"] for r in rows[: i + 1]) for i in range(len(rows))]
    t = [p / r["pairs_per_s"] for p, r in zip(pairs, rows)]
    return (pairs[-1] - pairs[warmup - 1]) / (t[-1] - t[warmup - 1])


def _meta_file(data: str, out: str, max_records) -> str:
    from metarm_fast.data import load_pairs

    pairs, _ = load_pairs(data, on_bad_record="skip", max_records=max_records)
    with open(out, "w") as f:
        for p in pairs:
            prompt = p.prompt if isinstance(p.prompt, str) else [dict(m) for m in p.prompt]
            f.write(json.dumps({"prompt": prompt, "responses": [p.chosen, p.rejected]}) + "\n")
    return out


def run(a, nproc: int) -> list[dict]:
    work = tempfile.mkdtemp(prefix="bench-nproc-")
    threads = a.threads or 1
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    common = ["train", "--model", a.model, "--tiny-hidden", str(a.hidden), "--tiny-layers", str(a.layers),
              "--train-data", a.data, "--on-bad-record", "skip", "--max-length", str(a.max_length),
              "--max-steps", str(a.warmup + a.steps), "--save-every", "0", "--no-progress", "--overwrite",
              "--seed", str(a.seed), "--threads", str(threads)]
    if a.tokenizer:
        common += ["--tokenizer", a.tokenizer]
    if a.max_records:
        common += ["--max-records", str(a.max_records)]
    meta = _meta_file(a.data, os.path.join(work, "meta.jsonl"), a.max_records) if a.data != "synthetic" else None
    rows = []
    for method in [m for m in a.methods.split(",") if m in ("vanilla", "metarm")]:
        for packing in a.packing.split(","):
            extra = ["--method", method, "--packing", packing]
            if method == "metarm" and meta:
                extra += ["--meta-data", meta]
            rates = {}
            for n in (1, nproc):
                out = os.path.join(work, f"{method}-{packing}-{n}")
                args = [*common, *extra, "--batch-size", str(a.batch * n), "--meta-batch-size", str(a.batch * n),
                        "--output-dir", out]
                if n == 1:
                    cmd = [sys.executable, "-m", "metarm_fast.cli", *args]
                else:
                    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                           "-m", "metarm_fast.cli", *args, "--parallel", a.parallel]
                r = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if r.returncode != 0:
                    raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
                rates[n] = _timed_rate(os.path.join(out, "metrics.jsonl"), a.warmup)
            row = {"method": method, "packing": packing, "nproc": nproc, "threads_per_process": threads,
                   "parallel": a.parallel, "pairs_per_s_1proc": rates[1], "pairs_per_s_all_ranks": rates[nproc],
                   "pairs_per_s_per_rank": rates[nproc] / nproc, "per_rank_over_1proc": rates[nproc] / nproc / rates[1]}
            rows.append(row)
            print(f"{method:<8} {packing:<13} 1 process {rates[1]:7.2f} pairs/s | {nproc} ranks ({a.parallel}) "
                  f"{rates[nproc]:7.2f} pairs/s, {rates[nproc] / nproc:7.2f} per rank | per rank / 1 process "
                  f"{row['per_rank_over_1proc']:.3f}", flush=True)
    return rows
