r"""Pairwise Bradley-Terry loss with an optional margin and reward centering, fused forward+backward.

Forward, over n pairs with rewards c_i (chosen) and r_i (rejected), margins m_i (0 when absent)
and a centering coefficient \gamma >= 0:

    x_i  = c_i - r_i - m_i
    L    = (1/n) * sum_i softplus(-x_i)  +  \gamma * (1/n) * sum_i (c_i + r_i)^2

softplus(-x) = -log sigmoid(x) is evaluated as  max(-x, 0) + log1p(exp(-|x|)),  which never
overflows: exp(-|x|) lies in (0, 1], so a gap of +-1e4 gives a loss of 1e4 or 0 and finite grads.

Backward (d softplus(-x)/dx = -sigmoid(-x); dx/dc = 1, dx/dr = -1):

    dL/dc_i = ( -sigmoid(-x_i) + 2 \gamma (c_i + r_i) ) / n
    dL/dr_i = ( +sigmoid(-x_i) + 2 \gamma (c_i + r_i) ) / n

sigmoid(-x) is formed from t = exp(-|x|) as t/(1+t) for x >= 0 and 1/(1+t) for x < 0, again with
no overflow. The margin is a constant: no gradient flows to it.

Fusion: the forward kernel reads each pair once, writes dL/dc and dL/dr (fp32) next to its share
of the loss, so the backward is a scale by the incoming gradient and a cast to the input dtype.
All arithmetic is fp32 whatever the input dtype (fp32, fp16 or bf16). The loss is reduced without
atomics: each program writes its partial sum into a buffer, and one program adds the partials in a
fixed order (``_partial_sum``, shared with difference_loss), so repeated runs give the same bits.
"""
from __future__ import annotations

import math
from typing import Union

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._dispatch import resolve_impl
from ._partial_sum import sum_partials
from ._triton import tl, triton

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_BLOCK_SIZE = 1024


# ----------------------------------------------------------------------------------------------
# Reference (pure torch). Serves the CPU path, the tests and the benchmark.
# ----------------------------------------------------------------------------------------------
def bt_loss_reference(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: Union[torch.Tensor, float, None] = None,
    center_coef: float = 0.0,
    *,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The loss of the module docstring in plain torch ops; autograd supplies the gradients.

    ``compute_dtype=torch.float64`` gives the high-precision reference the tests measure against.
    ``-logsigmoid`` is torch's stable softplus(-x): finite value and gradient for any gap, and
    the exact -sigmoid(-x) gradient at x == 0 (a hand-written max/abs form would not give it).
    """
    c = chosen.to(compute_dtype)
    r = rejected.to(compute_dtype)
    x = c - r
    if isinstance(margin, torch.Tensor):
        x = x - margin.detach().to(compute_dtype)
    elif margin is not None:
        x = x - float(margin)
    loss = -F.logsigmoid(x).mean()
    if center_coef != 0.0:
        loss = loss + center_coef * (c + r).square().mean()
    return loss


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _log1p_unit(t):
    """log(1 + t) for t in (0, 1], accurate when t is tiny.

    tl.math has no log1p and libdevice is unavailable under the interpreter. log(u)*t/(u-1) with
    u = 1 + t cancels the rounding error of u (Goldberg, 1991); u == 1 means t is below half an
    ulp of 1, where log1p(t) == t to fp32 precision.
    """
    u = 1.0 + t
    exact = u == 1.0
    # Both sides of a where are evaluated: keep the unused one free of 0/0.
    return tl.where(exact, t, tl.log(u) * (t / tl.where(exact, 1.0, u - 1.0)))


@triton.jit
def _bt_loss_fwd_bwd_kernel(
    C_ptr, C_stride,
    R_ptr, R_stride,
    M_ptr, M_stride,
    margin_value,
    center_coef,
    inv_n,
    DC_ptr, DR_ptr,
    PARTIAL_ptr,
    n,
    HAS_MARGIN_TENSOR: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    # int64 before multiplying by strides: pid * BLOCK_SIZE * stride can pass 2^31.
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n
    # .to(float32) right after the load: the interpreter computes wrongly on bf16 values.
    c = tl.load(C_ptr + offs * C_stride, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(R_ptr + offs * R_stride, mask=mask, other=0.0).to(tl.float32)
    if HAS_MARGIN_TENSOR:
        m = tl.load(M_ptr + offs * M_stride, mask=mask, other=0.0).to(tl.float32)
        x = c - r - m
    else:
        x = c - r - margin_value

    t = tl.exp(-tl.abs(x))  # in (0, 1]: cannot overflow, whatever the gap
    loss = tl.maximum(-x, 0.0) + _log1p_unit(t)
    sig_neg_x = tl.where(x >= 0.0, t / (1.0 + t), 1.0 / (1.0 + t))  # sigmoid(-x)

    s = c + r
    loss += center_coef * s * s
    center_grad = 2.0 * center_coef * s
    tl.store(DC_ptr + offs, (center_grad - sig_neg_x) * inv_n, mask=mask)
    tl.store(DR_ptr + offs, (center_grad + sig_neg_x) * inv_n, mask=mask)
    # One partial per program; added up in a fixed order by _partial_sum (no atomics).
    tl.store(PARTIAL_ptr + pid, tl.sum(tl.where(mask, loss, 0.0), axis=0))


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------
def check_bt_inputs(chosen, rejected, margin, center_coef) -> None:
    """Raise a TypeError/ValueError naming the argument when the inputs cannot be used."""
    for name, t in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"bt_loss: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"bt_loss: {name} must be 1-D (n,), got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"bt_loss: {name} dtype must be one of {SUPPORTED_DTYPES}, got {t.dtype}")
    if chosen.numel() == 0:
        raise ValueError("bt_loss: empty batch (n == 0); there is no mean over zero pairs")
    if chosen.shape != rejected.shape:
        raise ValueError(
            f"bt_loss: chosen and rejected must have the same length, got {chosen.numel()} and {rejected.numel()}"
        )
    if chosen.dtype != rejected.dtype:
        raise ValueError(f"bt_loss: chosen is {chosen.dtype} but rejected is {rejected.dtype}; use one dtype")
    if chosen.device != rejected.device:
        raise ValueError(f"bt_loss: chosen is on {chosen.device} but rejected is on {rejected.device}")
    if isinstance(margin, torch.Tensor):
        if margin.shape != chosen.shape:
            raise ValueError(
                f"bt_loss: margin must be a float or a 1-D tensor of n={chosen.numel()} entries, "
                f"got shape {tuple(margin.shape)}"
            )
        if not margin.is_floating_point():
            raise ValueError(f"bt_loss: margin must be a floating-point tensor, got {margin.dtype}")
        if margin.device != chosen.device:
            raise ValueError(f"bt_loss: margin is on {margin.device} but the rewards are on {chosen.device}")
    elif margin is not None:
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise TypeError(f"bt_loss: margin must be None, a float or a tensor, got {type(margin).__name__}")
        if not math.isfinite(margin):
            raise ValueError(f"bt_loss: margin must be finite, got {margin}")
    if isinstance(center_coef, bool) or not isinstance(center_coef, (int, float)):
        raise TypeError(f"bt_loss: center_coef must be a float, got {type(center_coef).__name__}")
    if not (math.isfinite(center_coef) and center_coef >= 0.0):
        raise ValueError(f"bt_loss: center_coef must be finite and >= 0, got {center_coef}")


def bt_loss_fwd_bwd(chosen, rejected, margin, center_coef):
    """Launch the fused kernel. Returns (loss: 0-dim fp32, dL/dchosen: (n,) fp32, dL/drejected)."""
    check_bt_inputs(chosen, rejected, margin, center_coef)
    n = chosen.numel()
    device = chosen.device
    block = min(MAX_BLOCK_SIZE, max(16, triton.next_power_of_2(n)))
    num_programs = triton.cdiv(n, block)
    dc = torch.empty(n, dtype=torch.float32, device=device)
    dr = torch.empty(n, dtype=torch.float32, device=device)
    partials = torch.empty(num_programs, dtype=torch.float32, device=device)
    has_margin_tensor = isinstance(margin, torch.Tensor)
    # With no margin tensor, chosen stands in as a never-read pointer (HAS_MARGIN_TENSOR=False).
    m_arg = margin if has_margin_tensor else chosen
    _bt_loss_fwd_bwd_kernel[(num_programs,)](
        chosen, chosen.stride(0),
        rejected, rejected.stride(0),
        m_arg, m_arg.stride(0),
        0.0 if (margin is None or has_margin_tensor) else float(margin),
        float(center_coef),
        1.0 / n,
        dc, dr,
        partials,
        n,
        HAS_MARGIN_TENSOR=has_margin_tensor,
        BLOCK_SIZE=block,
    )
    return sum_partials(partials, 1.0 / n), dc, dr


class BTLossFunction(torch.autograd.Function):
    """Autograd wrapper: the forward kernel already computed the gradients; backward scales them."""

    @staticmethod
    def forward(ctx, chosen, rejected, margin, center_coef):
        loss, dc, dr = bt_loss_fwd_bwd(chosen, rejected, margin, center_coef)
        ctx.save_for_backward(dc, dr)
        ctx.dtypes = (chosen.dtype, rejected.dtype)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        dc, dr = ctx.saved_tensors
        grad_c = grad_r = None
        if ctx.needs_input_grad[0]:
            grad_c = (dc * grad_loss).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            grad_r = (dr * grad_loss).to(ctx.dtypes[1])
        return grad_c, grad_r, None, None


def bt_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: Union[torch.Tensor, float, None] = None,
    center_coef: float = 0.0,
    impl: str = "auto",
) -> torch.Tensor:
    """Mean Bradley-Terry loss over n pairs, plus ``center_coef * mean((chosen + rejected)^2)``.

    chosen, rejected: 1-D (n,), one dtype in {fp32, fp16, bf16}, one device; any stride.
    margin: None, a float, or a 1-D (n,) float tensor (treated as a constant).
    Returns a 0-dim fp32 tensor, differentiable in chosen and rejected (grads in their dtype).
    ``impl``: "auto" | "torch" | "triton"; see ``metarm_fast.kernels._dispatch``.
    """
    if resolve_impl("bt_loss", impl, (chosen, rejected, margin), kernel=_bt_loss_fwd_bwd_kernel) == "torch":
        check_bt_inputs(chosen, rejected, margin, center_coef)
        return bt_loss_reference(chosen, rejected, margin, center_coef)
    return BTLossFunction.apply(chosen, rejected, margin, center_coef)  # the launcher checks the inputs
