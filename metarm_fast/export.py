"""The trained reward model as a Hugging Face checkpoint, apart from the resume checkpoints."""
from __future__ import annotations

import os
import shutil

from metarm_fast.lora import ADAPTER_DIR, merged_copy


def export_model(out_dir: str, hf, tokenizer, *, state_dict: dict | None = None, peft=None,
                 summary: dict | None = None) -> None:
    """Weights, tokenizer and the reward mean/std into ``out_dir``.

    ``state_dict``: the weights to save when they are not ``hf``'s own (the fp32 masters, FSDP2's
    gathered weights); ``peft``: the LoRA model, saved merged with its adapter beside it. Written into
    a temporary folder, then each file moved into place, so a crash while writing never leaves a
    half-written weights file under the final name."""
    tmp = os.path.join(out_dir, ".export.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    stats = (summary or {}).get("eval") or (summary or {}).get("train_rewards")
    if stats:
        # PPO trainers normalise rewards with these.
        hf.config.reward_mean = stats["reward_mean"]
        hf.config.reward_std = stats["reward_std"]
        hf.config.reward_stats_from = "eval pairs" if "eval" in summary else "training pairs (no eval set)"
    if peft is not None:
        merged = merged_copy(peft)  # a copy: its config holds the reward statistics set above
        merged.save_pretrained(tmp)
        peft.save_pretrained(os.path.join(tmp, ADAPTER_DIR))
        del merged
    else:
        hf.save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    for name in sorted(os.listdir(tmp)):
        dest = os.path.join(out_dir, name)
        if os.path.isdir(dest):  # the adapter folder of an earlier export
            shutil.rmtree(dest)
        os.replace(os.path.join(tmp, name), dest)
    os.rmdir(tmp)
