"""The oracle of perturb_ / restore_: the rule of ``metarm_fast.kernels.perturb_spec`` transcribed
plainly, one tensor at a time, one line per line of that docstring, with no fast path.

A test yardstick, not a path to train with: both real paths (torch and Triton) are held to it bit
for bit in test_perturb.py. It shares the argument checks and the case B refusal with the paths,
so a bad call fails the same way whatever runs it.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from metarm_fast.kernels.perturb_spec import (
    _BITS_VIEW,
    PerturbStats,
    _check_perturb_args,
    _check_restore_args,
    _raise_mismatch,
)


def _oracle_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_BITS_VIEW[t.dtype])


def _oracle_direction(g: torch.Tensor, v: Optional[torch.Tensor], eps32, bc32) -> torch.Tensor:
    """d in fp32. The sqrt is taken in fp64 and rounded once to fp32: that is the correctly rounded
    fp32 sqrt (fp64 carries at least 2 * 24 + 2 bits), which torch's own fp32 sqrt on the CPU is not."""
    if v is None:
        return g
    root = (v / bc32).double().sqrt().float()
    return g / (torch.maximum(root, g.abs()) + eps32)


def perturb_oracle_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    eta: float,
    *,
    masters: Optional[Sequence[torch.Tensor]] = None,
    exp_avg_sq: Optional[Sequence[Optional[torch.Tensor]]] = None,
    eps: float = 1e-8,
    bias_correction2: float = 1.0,
) -> PerturbStats:
    """perturb_ as perturb_spec's docstring states it.

    Every intermediate is a whole tensor and every line is a line of the rule; nothing is skipped,
    fused or reordered. The scalars are rounded to fp32 first, as the kernel receives them. The
    squares are summed with math.fsum (correctly rounded), so the real paths' sums may differ from
    these only by their own rounding. In place, like perturb_; raises like perturb_ on a case B
    mismatch after perturbing the other elements."""
    _check_perturb_args(params, grads, eta, masters, exp_avg_sq, eps, bias_correction2)
    eta32, eps32, bc32 = (torch.tensor(x, dtype=torch.float32) for x in (eta, eps, bias_correction2))
    numel = changed = nonfinite = 0
    intended_terms: list[float] = []
    realised_terms: list[float] = []
    mismatches = []
    with torch.no_grad():
        for i, (param, grad) in enumerate(zip(params, grads)):
            v = exp_avg_sq[i] if exp_avg_sq is not None else None
            p = param.float().clone()  # exact widening; a copy, so the writes below cannot reach it
            g = grad.float().clone()
            e = eta32 * _oracle_direction(g, v, eps32, bc32)
            e_finite = torch.isfinite(e)
            if masters is None:  # case A
                s = (p + e).to(param.dtype).float()
                z = (s - p).to(grad.dtype)
                p1 = (p + z.float()).to(param.dtype)
                back = (p1.float() - z.float()).to(param.dtype)
                ok = (z.float() != 0) & torch.isfinite(p1) & (p1.float() != p)
                ok = ok & (_oracle_bits(back) == _oracle_bits(param))
                new = p1
            else:  # case B
                w = masters[i]
                check = _oracle_bits(param) == _oracle_bits(w.to(param.dtype))
                check = check | (torch.isnan(param) & torch.isnan(w))
                new = (w + e).to(param.dtype)
                ok = e_finite & torch.isfinite(new) & (new.float() != p) & check
                if not bool(check.all()):
                    mismatches.append((i, int((~check).sum())))
            numel += param.numel()
            changed += int(ok.sum())
            nonfinite += int((~e_finite).sum())
            e64 = e[e_finite].double()
            intended_terms += (e64 * e64).tolist()
            # p_after - p_before is 0 where nothing moved (and inf - inf would be NaN): the moved ones.
            delta = new.double()[ok] - p.double()[ok]
            realised_terms += (delta * delta).tolist()
            if masters is None:
                grad.copy_(torch.where(ok, z, torch.zeros_like(z)))
            param.copy_(torch.where(ok, new, param))
    stats = PerturbStats(numel, changed, math.fsum(intended_terms), math.fsum(realised_terms), nonfinite)
    if mismatches:
        _raise_mismatch(mismatches)
    return stats


def restore_oracle_(
    params: Sequence[torch.Tensor],
    deltas: Optional[Sequence[torch.Tensor]],
    *,
    masters: Optional[Sequence[torch.Tensor]] = None,
) -> None:
    """restore_ as perturb_spec's docstring states it: case A p <- (z != 0) ? round(p - z) : p, case B p <- round(w)."""
    _check_restore_args(params, deltas, masters)
    with torch.no_grad():
        for i, param in enumerate(params):
            if masters is not None:
                param.copy_(masters[i].to(param.dtype))
                continue
            z = deltas[i].float()
            back = (param.float() - z).to(param.dtype)
            param.copy_(torch.where(z != 0, back, param))
