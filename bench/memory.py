"""Peak memory of one step: vanilla vs the in-place MetaRM step vs a copy-based MetaRM step.

    python -m bench.memory [--hidden 256 --layers 4 --batch 8 --precision fp32 --lora-r 0 --out results.json]

On the CPU the peak comes from allocation accounting (metarm_fast.memory.AllocationTracker: the bytes
of weights, gradient buffers and optimizer states, plus every tensor the step creates while it
lives); on a GPU from torch.cuda.max_memory_allocated. The meta batch is the preference batch's own
prompts with their two responses as one unlabelled group, so both steps see batches of one size.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile

import torch

from metarm_fast.config import TrainConfig
from metarm_fast.memory import compare_step_peaks
from metarm_fast.trainer import RewardTrainer


def environment() -> dict:
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    return {"device": dev, "torch": torch.__version__, "transformers": transformers.__version__, "commit": commit}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8, help="preference pairs per step")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "bf16-master"))
    ap.add_argument("--optimizer", default="adamw", choices=("adamw", "adamw8bit"))
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--packing", default="none", choices=("none", "pack", "share-prompt"))
    ap.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0: every weight trained)")
    ap.add_argument("--out", help="write the result as JSON here")
    a = ap.parse_args(argv)

    cfg = TrainConfig(
        method="metarm", packing=a.packing, tiny_hidden=a.hidden, tiny_layers=a.layers, batch_size=a.batch, max_records=256,
        max_length=128, precision=a.precision, optimizer=a.optimizer, eta=1e-3, progress=False,
        activation_checkpointing=a.activation_checkpointing, output_dir=tempfile.mkdtemp(), lora_r=a.lora_r,
    )
    tr = RewardTrainer(cfg)
    micro, _ = tr.step_inputs(0)
    groups = [[it.chosen, it.rejected] for it in micro[0]]  # the meta batch: the pairs' own prompts, 2 per group
    peaks = compare_step_peaks(tr.weights, tr.optimizer, tr.batcher, micro, groups, eta=tr.cfg.eta,
                               vanilla_step=lambda: tr.train_step(micro), meta_step=lambda: tr.train_step(micro, groups))
    param_bytes, vanilla, meta, copy_based = (peaks[k] for k in ("param_bytes", "vanilla", "metarm", "copy_based"))
    mb = 1 / 2**20
    result = {
        "params": sum(p.numel() for p in tr.weights.params),  # trainable ones (LoRA: adapters and head)
        "all_params": sum(p.numel() for p in tr.rm.parameters()),
        "param_MB": round(param_bytes * mb, 3),
        "vanilla_peak_MB": round(vanilla * mb, 3),
        "metarm_peak_MB": round(meta * mb, 3),
        "copy_based_peak_MB": round(copy_based * mb, 3),
        "metarm_minus_vanilla_over_param_bytes": round((meta - vanilla) / param_bytes, 4),
        "copy_minus_vanilla_over_param_bytes": round((copy_based - vanilla) / param_bytes, 4),
        "config": {k: v for k, v in vars(a).items() if k != "out"},
        "environment": environment(),
    }
    print(json.dumps(result, indent=2))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
