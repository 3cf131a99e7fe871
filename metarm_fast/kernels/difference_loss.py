r"""MetaRM difference loss J (to be maximised), fused forward+backward, groups of any size.

The rewards of m prompts' sampled responses lie in one 1-D tensor r of N entries; prompt g owns
r[o_g : o_{g+1}] (offsets o, int64, o_0 = 0, o_m = N, strictly increasing), k_g = o_{g+1} - o_g.

Forward (Dou et al. 2024, eq. for J, reduced by the mean over prompts):

    J_g = 2/k_g^2 * sum_{i<j} sigmoid(|r_i - r_j|)  =  1/k_g^2 * sum_{i != j} sigmoid(|r_i - r_j|)
    J   = (1/m) * sum_g J_g

A prompt with k_g = 1 has no pair: J_g = 0, and it still counts in the mean over the m prompts.
Note the 2/k^2 of the paper (not 2/(k(k-1))): J_g lies in [(k-1)/(2k), (k-1)/k).

Backward. With d_ij = r_i - r_j and sigmoid'(a) = sigmoid(a)(1 - sigmoid(a)), each unordered pair
{a, j} appears twice in the sum over i != j, once with each sign of d, so

    dJ/dr_a = (1/m) * 2/k_g^2 * sum_{j != a} sigmoid'(|d_aj|) * sign(d_aj),   sign(0) = 0,

i.e. a tie contributes no gradient (the paper's choice for the kink of |.|). sigmoid'(a) for
a >= 0 is computed as t/(1+t)^2 with t = exp(-a): no overflow, and no cancellation in 1 - sigmoid.

Kernel: one program per prompt. It walks its group in BLOCK_K x BLOCK_K tiles of pairwise
differences, so k is not limited by the block size. It writes dJ/dr (fp32) for its rows and its
J_g into a per-prompt buffer; one more program sums that buffer in a fixed order (no atomics;
``_partial_sum``, shared with bt_loss), so the result is bitwise repeatable. Arithmetic is fp32
for every input dtype.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ._dispatch import resolve_impl
from ._partial_sum import sum_partials
from ._triton import tl, triton

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_BLOCK_K = 64  # a 64 x 64 fp32 tile per step: 16 KiB of registers per program, plenty of work


# ----------------------------------------------------------------------------------------------
# Reference (pure torch)
# ----------------------------------------------------------------------------------------------
def difference_loss_reference(
    rewards: torch.Tensor, offsets: torch.Tensor, *, compute_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """J of the module docstring in plain torch ops; autograd supplies dJ/dr.

    Groups of equal size are batched into one (m_k, k) matrix, so the cost is one small batch of
    ops per distinct k, with no padding. torch's abs has gradient 0 at 0, which is the tie rule.
    """
    bounds = offsets.tolist()
    starts = torch.tensor(bounds[:-1], dtype=torch.int64)
    sizes = torch.tensor(bounds[1:], dtype=torch.int64) - starts
    m = len(bounds) - 1
    r = rewards.to(compute_dtype)
    total = r[:0].sum()  # 0, but attached to r's graph: all-singleton batches still backprop (zeros)
    for k in sorted(set(sizes.tolist())):
        if k == 1:
            continue  # no pair
        idx = (starts[sizes == k][:, None] + torch.arange(k)).to(r.device)  # (m_k, k)
        group = r[idx]  # (m_k, k)
        iu = torch.triu_indices(k, k, offset=1, device=r.device)  # pairs i < j
        gaps = group[:, iu[0]] - group[:, iu[1]]  # (m_k, k(k-1)/2)
        total = total + (2.0 / (k * k)) * torch.sigmoid(gaps.abs()).sum()
    return total / m


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _difference_loss_fwd_bwd_kernel(
    R_ptr, R_stride,
    OFFSETS_ptr,
    DR_ptr,
    PARTIAL_ptr,
    inv_m,
    BLOCK_K: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    start = tl.load(OFFSETS_ptr + g)
    end = tl.load(OFFSETS_ptr + g + 1)
    k = end - start
    kf = k.to(tl.float32)
    grad_scale = 2.0 * inv_m / (kf * kf)

    row_sums = tl.zeros([BLOCK_K], dtype=tl.float32)  # sum over j != i of sigmoid(|d_ij|), per i
    for i0 in range(0, k, BLOCK_K):
        i_idx = i0 + tl.arange(0, BLOCK_K)
        i_ok = i_idx < k
        r_i = tl.load(R_ptr + (start + i_idx) * R_stride, mask=i_ok, other=0.0).to(tl.float32)
        grad_i = tl.zeros([BLOCK_K], dtype=tl.float32)
        for j0 in range(0, k, BLOCK_K):
            j_idx = j0 + tl.arange(0, BLOCK_K)
            j_ok = j_idx < k
            r_j = tl.load(R_ptr + (start + j_idx) * R_stride, mask=j_ok, other=0.0).to(tl.float32)
            d = r_i[:, None] - r_j[None, :]  # (BLOCK_K, BLOCK_K)
            t = tl.exp(-tl.abs(d))  # in (0, 1]
            sig = 1.0 / (1.0 + t)  # sigmoid(|d|)
            dsig = t * sig * sig  # sigmoid'(|d|) = t / (1 + t)^2
            sign = tl.where(d > 0.0, 1.0, tl.where(d < 0.0, -1.0, 0.0))  # sign(0) = 0: ties
            # The diagonal (i == j, d == 0, sigmoid 0.5) is not a pair.
            pair = i_ok[:, None] & j_ok[None, :] & (i_idx[:, None] != j_idx[None, :])
            row_sums += tl.sum(tl.where(pair, sig, 0.0), axis=1)
            grad_i += tl.sum(tl.where(pair, dsig * sign, 0.0), axis=1)
        tl.store(DR_ptr + start + i_idx, grad_i * grad_scale, mask=i_ok)
    tl.store(PARTIAL_ptr + g, tl.sum(row_sums, axis=0) / (kf * kf))


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------
def check_difference_inputs(rewards, offsets) -> int:
    """Raise a TypeError/ValueError naming the problem; return the largest group size k.

    Reads the m+1 offsets on the host (one small device-to-host copy): the checks need their
    values, and the launcher needs the largest k to pick a tile size.
    """
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"difference_loss: rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if not isinstance(offsets, torch.Tensor):
        raise TypeError(f"difference_loss: offsets must be a torch.Tensor, got {type(offsets).__name__}")
    if rewards.dim() != 1:
        raise ValueError(
            f"difference_loss: rewards must be 1-D (N,), grouped by prompt, got shape {tuple(rewards.shape)}"
        )
    if rewards.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"difference_loss: rewards dtype must be one of {SUPPORTED_DTYPES}, got {rewards.dtype}")
    n = rewards.numel()
    if n == 0:
        raise ValueError("difference_loss: empty batch (no rewards)")
    if offsets.dtype != torch.int64:
        raise ValueError(f"difference_loss: offsets must be int64, got {offsets.dtype}")
    if offsets.dim() != 1 or offsets.numel() < 2:
        raise ValueError(
            f"difference_loss: offsets must be 1-D with m+1 >= 2 entries, got shape {tuple(offsets.shape)}"
        )
    if offsets.device != rewards.device:
        raise ValueError(f"difference_loss: offsets are on {offsets.device} but rewards on {rewards.device}")
    bounds = offsets.tolist()
    if bounds[0] != 0:
        raise ValueError(f"difference_loss: offsets[0] must be 0, got {bounds[0]}")
    if bounds[-1] != n:
        raise ValueError(
            f"difference_loss: offsets[-1] must equal len(rewards) = {n}, got {bounds[-1]}"
        )
    sizes = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    for g, k in enumerate(sizes):
        if k < 1:
            raise ValueError(
                f"difference_loss: offsets must be strictly increasing (every prompt has k >= 1 "
                f"responses), but offsets[{g}] = {bounds[g]} and offsets[{g + 1}] = {bounds[g + 1]}"
            )
    return max(sizes)


def difference_loss_fwd_bwd(rewards, offsets):
    """Launch the fused kernel. Returns (J: 0-dim fp32, dJ/drewards: (N,) fp32)."""
    max_k = check_difference_inputs(rewards, offsets)
    m = offsets.numel() - 1
    device = rewards.device
    block_k = min(MAX_BLOCK_K, max(16, triton.next_power_of_2(max_k)))
    offsets = offsets.contiguous()
    grad = torch.empty(rewards.numel(), dtype=torch.float32, device=device)
    partials = torch.empty(m, dtype=torch.float32, device=device)
    _difference_loss_fwd_bwd_kernel[(m,)](
        rewards, rewards.stride(0), offsets, grad, partials, 1.0 / m, BLOCK_K=block_k
    )
    return sum_partials(partials, 1.0 / m), grad


class DifferenceLossFunction(torch.autograd.Function):
    """Autograd wrapper: the forward kernel already computed dJ/dr; backward scales it."""

    @staticmethod
    def forward(ctx, rewards, offsets):
        out, grad = difference_loss_fwd_bwd(rewards, offsets)
        ctx.save_for_backward(grad)
        ctx.dtype = rewards.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return (grad * grad_out).to(ctx.dtype), None


def difference_loss(rewards: torch.Tensor, offsets: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """MetaRM's J, the mean over prompts of 2/k^2 * sum_{i<j} sigmoid(|r_i - r_j|). Maximise it.

    rewards: 1-D (N,) fp32/fp16/bf16, grouped by prompt. offsets: int64 (m+1,), 0 = offsets[0] <
    offsets[1] < ... < offsets[m] = N, on the rewards' device. Returns a 0-dim fp32 tensor,
    differentiable in rewards (gradient in their dtype). ``impl``: "auto" | "torch" | "triton".
    """
    path = resolve_impl("difference_loss", impl, (rewards, offsets), kernel=_difference_loss_fwd_bwd_kernel)
    if path == "torch":
        check_difference_inputs(rewards, offsets)
        return difference_loss_reference(rewards, offsets)
    return DifferenceLossFunction.apply(rewards, offsets)  # the launcher checks the inputs
