"""LoRA reward models through peft (`--lora-r R`, the optional extra `pip install -e .[lora]`).

peft injects the low-rank adapters into the Hugging Face model in place, so ``RewardModel`` keeps
reading rewards from the same module tree; the reward head (``score`` for decoders, ``classifier``
for encoders) is trained in full (peft's ``modules_to_save``). Only the adapters and the head
require gradients, so the trainer's parameter list -- and with it the meta step's perturbation,
its restore, the gradient clipping and the optimizer -- covers exactly the trainable weights; the
frozen base weights are never touched.

The export writes both forms: the merged model (base weights + scale * B @ A, a plain
``*ForSequenceClassification`` checkpoint, what `metarm-fast eval` and PPO trainers load) in the
output folder, and the adapter alone under ``adapter/`` (peft's format, with the head).
The merge runs on a copy, so the model being trained is left as it was.
"""
from __future__ import annotations

import copy
import importlib.util

from torch import nn

ADAPTER_DIR = "adapter"

__all__ = ["ADAPTER_DIR", "apply_lora", "head_name", "merged_copy"]


def head_name(model: nn.Module) -> str:
    for name in ("score", "classifier"):
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise ValueError(f"{type(model).__name__}: no reward head (`score` or `classifier`) to train alongside LoRA")


def apply_lora(model: nn.Module, r: int, alpha: float, dropout: float, target: str):
    """Adapters of rank ``r`` on ``target`` ("all-linear" or comma-separated module names); returns
    the peft model (for saving). ``model`` itself is modified in place."""
    if importlib.util.find_spec("peft") is None:
        raise ValueError("--lora-r needs peft: pip install 'metarm-fast[lora]'")
    from peft import LoraConfig, get_peft_model

    head = head_name(model)
    targets = target if target == "all-linear" else [t.strip() for t in target.split(",") if t.strip()]
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, modules_to_save=[head],
                     exclude_modules=[head], bias="none")
    try:
        return get_peft_model(model, cfg)
    except ValueError as e:
        raise ValueError(f"--lora-target {target}: {str(e).splitlines()[0][:300]}") from None


def merged_copy(peft_model) -> nn.Module:
    """The plain model with the adapters merged into its weights, on a copy (one more model in memory)."""
    return copy.deepcopy(peft_model).merge_and_unload()
