"""Algorithm 1 of the MetaRM paper written plainly, with a full copy of the model.

This is what the paper's authors describe (back up the weights, perturb, back-propagate, copy back),
kept as the yardstick for the in-place meta step: the tests check that both give the same parameters
and optimizer states, and the benchmarks measure what the copy costs in time and memory.
"""
from __future__ import annotations

import copy

import torch

from metarm_fast.kernels import bt_loss, difference_loss


def copy_based_meta_grads(trainer, micro_batches, meta_groups) -> dict:
    """Steps 1-4 of Algorithm 1 through a deep copy of ``trainer.model``: theta' and grad L(theta').

    The trainer's own model is not touched. Returns theta' (``theta_prime``, one tensor per parameter),
    the gradients (``grads``), the loss and J."""
    cfg = trainer.cfg
    shadow = copy.deepcopy(trainer.model)  # the full extra copy the in-place step avoids
    for p in shadow.parameters():
        p.grad = None
    for m in shadow.modules():  # the plain algorithm: dense gradients (the trainer may make its embedding's sparse)
        if isinstance(m, torch.nn.Embedding):
            m.sparse = False
    meta = trainer.meta_batch(meta_groups)
    j = difference_loss(shadow(meta), meta.offsets, impl="torch")
    trainable = [p for p in shadow.parameters() if p.requires_grad]  # (LoRA: the adapters and the head)
    grads_j = torch.autograd.grad(j, trainable)
    with torch.no_grad():
        for p, g in zip(trainable, grads_j):
            p.add_(g, alpha=cfg.eta)  # theta' = theta + eta * grad J
    del grads_j
    theta_prime = [p.detach().clone() for p in shadow.parameters() if p.requires_grad]
    total = sum(len(m) for m in micro_batches)
    loss_sum = 0.0
    for items in micro_batches:
        batch = trainer.pair_batch(items)
        r = shadow(batch)
        n = len(items)
        loss = bt_loss(r[:n], r[n:], margin=batch.margin, center_coef=cfg.center_coef, impl="torch")
        (loss * (n / total)).backward()
        loss_sum += loss.item() * n
    grads = [p.grad for p in shadow.parameters() if p.requires_grad]
    return {"theta_prime": theta_prime, "grads": grads, "loss": loss_sum / total, "J": j.item(), "pairs": total}


def copy_based_meta_step(trainer, micro_batches, meta_groups) -> dict:
    """One MetaRM step on ``trainer`` through a deep copy of its model; then its usual optimizer step."""
    out = copy_based_meta_grads(trainer, micro_batches, meta_groups)
    with torch.no_grad():
        for p, g in zip(trainer.params, out["grads"]):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
    grad_norm = trainer.optimizer_step()
    return {"loss": out["loss"], "J": out["J"], "grad_norm": grad_norm, "pairs": out["pairs"]}
