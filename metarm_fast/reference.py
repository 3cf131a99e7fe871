"""Algorithm 1 of the MetaRM paper written plainly, with a full copy of the model.

This is what the paper's authors describe (back up the weights, perturb, back-propagate, copy back),
kept as the yardstick for the in-place meta step: the tests check that both give the same parameters
and optimizer states, and the benchmarks measure what the copy costs in time and memory.
"""
from __future__ import annotations

import copy

import torch

from metarm_fast.kernels import bt_loss, difference_loss


def copy_based_meta_grads(model, batcher, micro_batches, meta_groups, *, eta: float, center_coef: float = 0.0) -> dict:
    """Steps 1-4 of Algorithm 1 through a deep copy of ``model``: theta' and grad L(theta').

    ``model`` itself is not touched; ``batcher`` (a ``metarm_fast.batch.Batcher``) lays out the pairs
    and groups. Returns theta' (``theta_prime``, one tensor per trainable parameter), the gradients
    (``grads``), the loss and J."""
    shadow = copy.deepcopy(model)  # the full extra copy the in-place step avoids
    for p in shadow.parameters():
        p.grad = None
    for m in shadow.modules():  # the plain algorithm: dense gradients (the trainer may make its embedding's sparse)
        if isinstance(m, torch.nn.Embedding):
            m.sparse = False
    meta = batcher.groups(meta_groups)
    j = difference_loss(shadow(meta), meta.offsets, impl="torch")
    trainable = [p for p in shadow.parameters() if p.requires_grad]  # (LoRA: the adapters and the head)
    grads_j = torch.autograd.grad(j, trainable)
    with torch.no_grad():
        for p, g in zip(trainable, grads_j):
            p.add_(g, alpha=eta)  # theta' = theta + eta * grad J
    del grads_j
    theta_prime = [p.detach().clone() for p in shadow.parameters() if p.requires_grad]
    total = sum(len(m) for m in micro_batches)
    loss_sum = 0.0
    for items in micro_batches:
        batch = batcher.pairs(items)
        r = shadow(batch)
        n = len(items)
        loss = bt_loss(r[:n], r[n:], margin=batch.margin, center_coef=center_coef, impl="torch")
        (loss * (n / total)).backward()
        loss_sum += loss.item() * n
    grads = [p.grad for p in shadow.parameters() if p.requires_grad]
    return {"theta_prime": theta_prime, "grads": grads, "loss": loss_sum / total, "J": j.item(), "pairs": total}


def copy_based_meta_step(model, weights, optimizer, batcher, micro_batches, meta_groups, *, eta: float,
                         center_coef: float = 0.0, scheduler=None, max_grad_norm: float = 0.0) -> dict:
    """One MetaRM step through a deep copy of ``model``, then the usual optimizer step on ``weights``
    (a ``metarm_fast.weights.Weights``), advancing ``scheduler`` when one is given."""
    out = copy_based_meta_grads(model, batcher, micro_batches, meta_groups, eta=eta, center_coef=center_coef)
    with torch.no_grad():
        for p, g in zip(weights.params, out["grads"]):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
    grad_norm = weights.step(optimizer, scheduler, max_grad_norm)
    return {"loss": out["loss"], "J": out["J"], "grad_norm": grad_norm, "pairs": out["pairs"]}
