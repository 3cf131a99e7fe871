"""Building a run's parts from its config: the parallel rules, the model (LoRA, Liger, compile,
FSDP2/DDP), the optimizer and the learning-rate schedule."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from metarm_fast.config import TrainConfig
from metarm_fast.lora import apply_lora
from metarm_fast.model import RewardModel, load_model
from metarm_fast.parallel import apply_ddp, apply_fsdp


def check_parallel(cfg: TrainConfig, world: int) -> None:
    """Refuse the settings a world of ``world`` ranks cannot run, before anything slow."""
    if cfg.parallel == "fsdp" and world == 1:
        raise ValueError("--parallel fsdp needs several ranks: start with torchrun --nproc_per_node=N")
    if world > 1 and cfg.parallel in ("auto", "fsdp") and cfg.optimizer == "adamw8bit":
        raise ValueError("--optimizer adamw8bit cannot step FSDP2's sharded (DTensor) parameters: bitsandbytes' "
                         "8-bit optimizers do not support DTensor (bitsandbytes issues 89 and 1633). Use "
                         "--optimizer adamw with FSDP2, or --parallel ddp with adamw8bit")
    if cfg.parallel == "none" and world > 1:
        raise ValueError(f"--parallel none, but torchrun started {world} ranks; use --parallel ddp or auto")
    if world > 1:
        if cfg.batch_size < world or (cfg.method == "metarm" and cfg.meta_batch_size < world):
            raise ValueError(f"--batch-size {cfg.batch_size} and --meta-batch-size {cfg.meta_batch_size} are global "
                             f"numbers per step, split across the {world} ranks: each must be at least {world}")
        if cfg.second_order:
            raise ValueError("--second-order is single-process only (its Hessian-vector product is not "
                             "reduced across ranks); drop it or run one process")
    if world > 1 and cfg.parallel in ("auto", "fsdp") and cfg.lora_r:
        raise ValueError("--lora-r with FSDP2 is not supported yet; use --parallel ddp (the frozen base "
                         "weights are then replicated, the adapters small)")


def uses_fsdp(cfg: TrainConfig, world: int) -> bool:
    return world > 1 and cfg.parallel in ("auto", "fsdp")


@dataclass
class BuiltModel:
    rm: RewardModel  # the module itself (LoRA: with peft's adapters injected)
    model: torch.nn.Module  # what the steps call: rm, or its DDP/FSDP2 wrapping
    peft: object | None  # the peft model, for the LoRA export
    fsdp: bool


def build_model(cfg: TrainConfig, tokenizer, dist) -> BuiltModel:
    fsdp = uses_fsdp(cfg, dist.world_size)
    # FSDP2 holds fp32 shards (the masters) and computes in bf16 through its mixed precision.
    load_cfg = dataclasses.replace(cfg, precision="fp32") if fsdp and cfg.precision == "bf16-master" else cfg
    hf = load_model(load_cfg, tokenizer)
    peft = apply_lora(hf, cfg.lora_r, cfg.lora_alpha or 2.0 * cfg.lora_r, cfg.lora_dropout, cfg.lora_target) \
        if cfg.lora_r else None
    rm = RewardModel(hf).to(dist.device)
    if cfg.liger:
        from metarm_fast.liger import apply_liger_

        apply_liger_(rm.hf)
    if cfg.compile:
        from metarm_fast.compile import compile_blocks_

        compile_blocks_(rm.hf)
    if fsdp:
        model = apply_fsdp(rm, dist, bf16_compute=cfg.precision == "bf16-master")
    elif dist.distributed:
        model = apply_ddp(rm, dist)
    else:
        model = rm
    return BuiltModel(rm, model, peft, fsdp)


def adamw_impl(sharded: bool) -> dict:
    """torch AdamW's implementation: fused (one kernel per tensor: a single pass over the weight, its
    gradient and both moments, no temporaries) wherever torch has it, else the single-tensor loop.

    The single-tensor loop makes ~10 passes over each tensor with a temporary the size of the largest
    one (profiled on the bench's tiny Llama, 10.2M parameters of which 7.8M are the embedding: 63.5 ms
    of a 521 ms MetaRM step on 2 CPU cores; fused: 4.6 ms; docs/performance.md). foreach is not used:
    it holds temporaries the size of all the weights at once. FSDP2's sharded DTensor parameters keep
    the single-tensor loop (the path every torch version steps them with)."""
    return {"foreach": False} if sharded else {"fused": True}


def make_optimizer(cfg: TrainConfig, opt_params, sharded: bool):
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(opt_params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(opt_params, lr=cfg.lr, weight_decay=cfg.weight_decay, **adamw_impl(sharded))


def count_steps(cfg: TrainConfig, n_pairs: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_epoch = math.ceil(n_pairs / (cfg.batch_size * cfg.grad_accum))
    return max(1, math.ceil(per_epoch * cfg.epochs))


def make_scheduler(cfg: TrainConfig, optimizer, total_steps: int):
    """Linear warm-up over warmup_ratio of the steps, then cosine, linear or constant."""

    def factor(step: int) -> float:
        warm = int(cfg.warmup_ratio * total_steps)
        if step < warm:
            return (step + 1) / warm
        if cfg.lr_schedule == "constant":
            return 1.0
        frac = (step - warm) / max(1, total_steps - warm)
        if cfg.lr_schedule == "linear":
            return max(0.0, 1.0 - frac)
        return 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
