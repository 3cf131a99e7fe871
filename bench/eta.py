"""The meta step size eta on the embedded synthetic task, over seeds: accuracy on the base policy's
pairs, on the better (shifted) policy's pairs, and the mean reward gap on the meta set.

    python -m bench.eta [--etas 0,1e-3,1e-2,1e-1] [--seeds 0,1,2,3,4] [--runs DIR]
                        [--meta-direction sgd|adam|optimizer-step]

Each (eta, seed) is one `metarm-fast train --method metarm --meta-direction D --eta E --seed S` run
(the seed sets the model's initialisation, the data and the data order), in its own folder under
--runs (named by direction, eta and seed); a folder that already holds a finished run is read, not
run again. eta = 0 is bitwise vanilla training, for every direction (tested).
Prints mean, sample standard deviation, min and max over the seeds, and the paired difference
against eta = 0 (same seed).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from metarm_fast.config import META_DIRECTIONS


def final_summary(out: str) -> dict | None:
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if "final" in rec:
                return rec["final"]
    return None


def _fmt(xs) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.3f} +- {sd:.3f} [{min(xs):.3f}, {max(xs):.3f}]"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--etas", default="0,1e-3,1e-2,1e-1")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--runs", default="runs/eta")
    ap.add_argument("--meta-direction", default="sgd", choices=META_DIRECTIONS,
                    help="the meta step's direction (the trainer's --meta-direction)")
    ap.add_argument("--extra", default="", help="more flags for every run, e.g. '--max-steps 50'")
    a = ap.parse_args(argv)
    etas, seeds = a.etas.split(","), [int(s) for s in a.seeds.split(",")]
    table = {}
    for e in etas:
        for s in seeds:
            # sgd keeps the folder names of earlier runs
            out = os.path.join(a.runs, f"{e}-{s}" if a.meta_direction == "sgd" else f"{a.meta_direction}-{e}-{s}")
            if final_summary(out) is None:
                cmd = [sys.executable, "-m", "metarm_fast.cli", "train", "--method", "metarm",
                       "--meta-direction", a.meta_direction, "--eta", e, "--seed", str(s), "--output-dir", out, "--no-progress", "--overwrite",
                       "--packing", "none",  # the padded layout of the published table (auto: share-prompt)
                       *a.extra.split()]
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            f = final_summary(out)
            table[(e, s)] = (f["eval"]["accuracy"], f["eval_shifted"]["accuracy"], f["meta_gaps"]["mean"])
    names = ("eval acc.", "shifted acc.", "meta gap mean")
    print(f"--meta-direction {a.meta_direction}, {len(seeds)} seeds ({a.seeds}); mean +- sd [min, max]; "
          f"paired differences against eta = {etas[0]}")
    result = {}
    for e in etas:
        cols = [[table[(e, s)][i] for s in seeds] for i in range(3)]
        diffs = [[table[(e, s)][i] - table[(etas[0], s)][i] for s in seeds] for i in range(3)]
        result[e] = {"values": cols, "paired_diff": diffs}
        print(f"eta {e:>6}: " + "; ".join(f"{n} {_fmt(c)}" for n, c in zip(names, cols)))
        if e != etas[0]:
            print(" " * 13 + "diff: " + "; ".join(f"{n} {_fmt(d)}" for n, d in zip(names, diffs)))
    return result


if __name__ == "__main__":
    main()
