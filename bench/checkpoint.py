"""What a resume checkpoint costs: seconds to write and read, bytes on disk, extra memory while writing.

    python -m bench.checkpoint [--tokenizer DIR] [--hidden 256 --layers 4] [--precision fp32|bf16-master]
                               [--optimizer adamw|adamw8bit] [--repeats 5] [--write-gbps 2.0]

Measured on the tiny Llama the throughput bench uses (pass the MiniLM tokenizer for its 30522-token
vocabulary), after two optimizer steps so that every optimizer state exists. Extra memory is the
bytes of the tensors the save creates (``metarm_fast.memory.AllocationTracker``): DCP writes the
weights and states from where they are, so it should be near 0. Then the 7B plan: the same bytes
per parameter for Llama-2-7B, written at ``--write-gbps`` (an assumption about the user's disk,
printed as such, not a measurement).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from metarm_fast import checkpoint as ckpt
from metarm_fast.config import TrainConfig
from metarm_fast.memory import AllocationTracker
from metarm_fast.trainer import RewardTrainer

LLAMA2_7B_PARAMS = 6.74e9


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16-master"))
    ap.add_argument("--optimizer", default="adamw", choices=("adamw", "adamw8bit"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--write-gbps", type=float, default=2.0, help="assumed disk write speed for the 7B plan")
    a = ap.parse_args(argv)

    work = tempfile.mkdtemp(prefix="bench-ckpt-")
    cfg = TrainConfig(method="metarm", tokenizer=a.tokenizer, tiny_hidden=a.hidden, tiny_layers=a.layers,
                      precision=a.precision, optimizer=a.optimizer, max_records=64, max_length=64, batch_size=4,
                      meta_batch_size=4, progress=False, output_dir=os.path.join(work, "run"))
    tr = RewardTrainer(cfg, log=lambda *x: None)
    for s in range(2):
        tr.train_step(*tr.step_inputs(s))
    root = os.path.join(work, "checkpoints")
    writes, reads = [], []
    for i in range(a.repeats):
        t0 = time.perf_counter()
        path = ckpt.save_checkpoint(root, i + 1, tr.checkpointer.state_dict(), keep_last=1)
        writes.append(time.perf_counter() - t0)
    with AllocationTracker() as track:
        ckpt.save_checkpoint(root, a.repeats + 1, tr.checkpointer.state_dict(), keep_last=1)
    path = ckpt.latest_checkpoint(root)
    disk = _dir_bytes(path)
    for _ in range(a.repeats):
        fresh = RewardTrainer(cfg, log=lambda *x: None)
        t0 = time.perf_counter()
        fresh.checkpointer.load(path)
        reads.append(time.perf_counter() - t0)
    n = sum(p.numel() for p in tr.weights.params)
    per_param = disk / n
    write_s = statistics.median(writes)
    result = {
        "model": f"tiny Llama hidden {a.hidden}, {a.layers} layers, vocab {len(tr.tokenizer)}",
        "params": n, "precision": a.precision, "optimizer": a.optimizer,
        "disk_MB": round(disk / 2**20, 2), "bytes_per_param": round(per_param, 3),
        "write_s_median": round(write_s, 4), "write_s_range": [round(min(writes), 4), round(max(writes), 4)],
        "read_s_median": round(statistics.median(reads), 4),
        "write_MB_per_s": round(disk / 2**20 / write_s, 1),
        "extra_memory_MB_while_writing": round(track.peak_bytes / 2**20, 3),
        "plan_7b": {
            "disk_GB": round(per_param * LLAMA2_7B_PARAMS / 1e9, 1),
            "write_s_at_assumed_speed": round(per_param * LLAMA2_7B_PARAMS / (a.write_gbps * 1e9), 1),
            "assumed_write_GBps": a.write_gbps,
        },
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
