"""Hessian-vector products by double backward, for the two places that need second-order terms:
MetaRM's exact meta-gradient (``--second-order``: eta * H_J @ grad L) and the measurement of the meta
step's first-order effect on the update (H_L @ u, ``bench.meta_effect``).

torch's autograd gives them directly (a backward that keeps its graph, then a backward of that); the
only thing to arrange is that every op on the way is twice differentiable: SDPA's fused CPU and GPU
kernels are not, its math backend is, and the fused loss kernels' backward is not (callers pass the
torch references).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def _math_attention():
    """SDPA's fused CPU/GPU kernels have no double backward; the math backend has."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


def hessian_vector_products(loss_fn, params, vecs) -> list[list]:
    """[H @ v for v in vecs], H the Hessian of ``loss_fn()`` at the current weights (``params``), by
    double backward: one forward and one backward that keeps its graph, then one more backward per
    vector. An entry is None for a parameter the loss does not reach; a sparse entry (an embedding's)
    comes back dense. ``loss_fn`` must build its loss from twice-differentiable ops (torch
    references, not the fused kernels); attention runs on SDPA's math backend for the duration."""
    out = []
    with torch.enable_grad(), _math_attention():
        loss = loss_fn()
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        used = [i for i, g in enumerate(grads) if g is not None]
        for n, vec in enumerate(vecs):
            hv = torch.autograd.grad([grads[i] for i in used], [params[i] for i in used],
                                     grad_outputs=[vec[i] for i in used], allow_unused=True,
                                     retain_graph=n < len(vecs) - 1)
            row = [None] * len(params)
            for i, h in zip(used, hv):
                row[i] = None if h is None else (h.to_dense() if h.is_sparse else h).detach()
            out.append(row)
    return out


def second_order_correction_(params, j_fn, eta: float) -> None:
    """grad += eta * H_J(theta) @ grad, with the grads holding grad L(theta') and params at theta.

    For the sgd direction only: d(theta')/d(theta) = I + eta * H_J, so this makes the update exact.
    ``j_fn`` must build J from ops that are twice differentiable (the torch J, not the fused kernel)."""
    vec = [p.grad.detach().clone() for p in params]  # one gradient-sized temporary
    for p, h in zip(params, hessian_vector_products(j_fn, params, [vec])[0]):
        if h is not None:
            p.grad.add_(h, alpha=eta)
