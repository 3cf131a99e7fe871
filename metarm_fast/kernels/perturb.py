"""perturb_ / restore_: the meta step's in-place theta + eta * d and its bit-exact undo.

The rule is stated in ``perturb_spec``; ``perturb_torch`` and ``perturb_triton`` are its two
paths, and the ops below choose one (see ``_dispatch``). perturb_ hands back a ``Perturbation``
(``perturbation``): the stats, and the restore of that very call, on the path that perturbed.
No autograd.Function: these are in-place updates under no_grad, not differentiable.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._dispatch import resolve_impl
from .perturb_spec import _all_tensors
from .perturb_torch import perturb_torch_, restore_torch_
from .perturb_triton import _perturb_kernel, _restore_kernel, perturb_triton_, restore_triton_
from .perturbation import Perturbation


def perturb_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    eta: float,
    *,
    masters: Optional[list[torch.Tensor]] = None,
    exp_avg_sq: Optional[list[Optional[torch.Tensor]]] = None,
    eps: float = 1e-8,
    bias_correction2: float = 1.0,
    impl: str = "auto",
) -> Perturbation:
    """theta <- theta + eta * d in place, restorable bit for bit.

    Without ``masters`` (case A) the grads buffers are overwritten with exactly what was added
    (0 where nothing was); keep them for the restore. With ``masters`` (case B) only the compute
    copy ``params`` is written. Returns a Perturbation: ``.stats`` says how much of the step reached
    the weights (PerturbStats); ``.restore()`` undoes the call, ``.restore_plan()`` undoes it one
    tensor at a time. ``restore_(params, grads or None, masters=...)`` undoes it too.
    """
    path = resolve_impl("perturb_", impl, _all_tensors(params, grads, masters, exp_avg_sq), kernel=_perturb_kernel)
    kwargs = dict(masters=masters, exp_avg_sq=exp_avg_sq, eps=eps, bias_correction2=bias_correction2)
    if path == "torch":
        return perturb_torch_(params, grads, eta, **kwargs)
    return perturb_triton_(params, grads, eta, **kwargs)


def restore_(
    params: list[torch.Tensor],
    deltas: Optional[list[torch.Tensor]],
    *,
    masters: Optional[list[torch.Tensor]] = None,
    impl: str = "auto",
) -> None:
    """Undo :func:`perturb_`: p <- p - z where z != 0 (case A), or p <- round(master) (case B).

    ``deltas`` are the grads buffers as perturb_ left them (it never stores -0.0 there, which the
    torch path relies on; see ``perturb_torch._restore_block_``)."""
    path = resolve_impl("restore_", impl, _all_tensors(params, deltas, masters), kernel=_restore_kernel)
    if path == "torch":
        restore_torch_(params, deltas, masters=masters)
    else:
        restore_triton_(params, deltas, masters=masters)
