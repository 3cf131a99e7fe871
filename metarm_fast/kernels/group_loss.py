r"""Preference loss over groups of k >= 1 scored responses per prompt, fused forward+backward.

Layout as in difference_loss: the rewards of G prompts' responses lie in one 1-D tensor r of N
entries; prompt g owns r[o_g : o_{g+1}] (offsets o, int64, o_0 = 0, o_G = N, strictly increasing).
scores s (N,) are the labels, higher = better (a record's scores, or its negated ranks); only their
order matters, plus their differences when a margin is asked for. Scores are compared in fp32.

kind="bt" (Bradley-Terry over every ordered pair of a group). P_g = {(i, j) : s_i > s_j}: ties
give no pair. With the margin m_ij = mu * (s_i - s_j) (mu = margin_scale >= 0) and
d_ij = r_i - r_j - m_ij,

    L_g = (1/|P_g|) * sum_{(i,j) in P_g} softplus(-d_ij)          (softplus(-d) = -log sigmoid(d))

kind="pl" (Plackett-Luce, listwise, ties allowed). For each i with at least one strictly worse
item, its denominator set D_i = {i} u {j : s_j < s_i} (tied items are never in each other's) and

    T_g = {i : some s_j < s_i},   lse_i = log sum_{j in D_i} exp(r_j),
    L_g = (1/|T_g|) * sum_{i in T_g} (lse_i - r_i)

(for a strict ranking, sum_i (lse_i - r_i) is the negative log-likelihood of the ranking under PL).

Both kinds: a group "counts" when it has a pair (|P_g| > 0, equivalently |T_g| > 0: its scores
are not all equal). With V the set of groups that count,

    L = (1/|V|) * sum_{g in V} L_g,        L = 0 (gradient 0) when V is empty,

so every record weighs one unit, however many responses it has; groups with no pair (k = 1, or
all tied) contribute nothing and are not in the denominator.

Backward, for a response a of group g in V (0 for groups outside V):

  bt: d softplus(-d)/dd = -sigmoid(-d), dd_ij/dr_i = 1, dd_ij/dr_j = -1, so

    dL/dr_a = 1/(|V| |P_g|) * ( - sum_{j : s_a > s_j} sigmoid(-d_aj)  +  sum_{i : s_i > s_a} sigmoid(-d_ia) ).

  From row a's side, d_ia = -d_ai (with the margin too), so the kernel computes every term from
  e_aj = r_a - r_j - mu (s_a - s_j): -sigmoid(-e_aj) where s_a > s_j, +sigmoid(e_aj) where s_a < s_j.
  The margin is a constant: no gradient flows to the scores.

  pl: d lse_i/dr_j = p_ij = exp(r_j - lse_i) for j in D_i (softmax over D_i), so

    dL/dr_a = 1/(|V| |T_g|) * ( [a in T_g] (p_aa - 1)  +  sum_{i : s_i > s_a} p_ia ),

  using that s_i > s_a puts a in D_i and i in T_g.

Stability: softplus(-d) = max(-d, 0) + log1p(exp(-|d|)) and sigmoid(+-d) from t = exp(-|d|) in
(0, 1] (as in bt_loss); lse_i = M_i + log S_i by a running maximum M_i and a rescaled sum S_i
(online logsumexp; r_i itself is in D_i, so M_i is finite and S_i >= 1), the term as
(M_i - r_i) + log S_i (two terms >= 0) and p_ia = exp(r_a - M_i) / S_i, as softmax does (going
through exp(r_a - lse_i) would carry lse's rounding, an ulp of |lse|, into every p). Rewards of
+-1e4 give finite values and grads.

Kernels: one program per group, tiles of BLOCK_K x BLOCK_K score/reward pairs (BLOCK_K = the
next power of two >= the largest group, between 16 and 64), so k is not limited by the block:
a group of k > 64 is walked in ceil(k/64)^2 tiles, like difference_loss (no size cap and no silent
switch to another path). All arithmetic is fp32 (inputs are cast right after loading, whatever
their dtype). bt: one kernel; a first walk counts |P_g| (score comparisons only), the second
writes dL/dr * |V| and L_g. pl: two kernels, because the gradient of a row needs the lse of the
other rows: the first writes M_i and S_i (an fp32 scratch of 2N) and L_g, the second the gradients
(a kernel boundary orders those reads after the writes; no in-kernel barrier is relied on). Each
group also writes a 0/1 "counts" flag. The loss and |V| are reduced from the per-group buffers by
``_partial_sum`` (fixed order, no atomics; bitwise repeatable); the backward scales the saved
per-element gradient by grad_output / max(|V|, 1).
"""
from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from ._dispatch import resolve_impl
from ._partial_sum import sum_partials
from ._triton import tl, triton

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KINDS = ("bt", "pl")
MAX_BLOCK_K = 64  # a 64 x 64 fp32 tile per step, as in difference_loss; larger groups take more tiles


# ----------------------------------------------------------------------------------------------
# Reference (pure torch)
# ----------------------------------------------------------------------------------------------
def group_loss_reference(
    r: torch.Tensor,
    scores: torch.Tensor,
    offsets: torch.Tensor,
    *,
    kind: str = "bt",
    margin_scale: float = 0.0,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """L of the module docstring in plain torch ops; autograd supplies dL/dr.

    Groups of equal size are batched into (G_k, k, k) pair matrices, one small batch of ops per
    distinct k. ``-logsigmoid`` and ``logsumexp`` are torch's stable forms. Scores are rounded to
    fp32 first, as the kernel compares them, then carried in ``compute_dtype`` (float64 gives the
    high-precision reference the tests measure against).
    """
    bounds = offsets.tolist()
    starts = torch.tensor(bounds[:-1], dtype=torch.int64)
    sizes = torch.tensor(bounds[1:], dtype=torch.int64) - starts
    rr = r.to(compute_dtype)
    s = scores.detach().to(torch.float32).to(compute_dtype)
    total = rr[:0].sum()  # 0 attached to r's graph: a batch without pairs still backprops (zeros)
    n_valid = torch.zeros((), dtype=compute_dtype, device=r.device)
    for k in sorted(set(sizes.tolist())):
        if k == 1:
            continue  # no pair
        idx = (starts[sizes == k][:, None] + torch.arange(k)).to(r.device)  # (G_k, k)
        R, S = rr[idx], s[idx]
        better = S[:, :, None] > S[:, None, :]  # [g, i, j]: i strictly better than j
        if kind == "bt":
            d = R[:, :, None] - R[:, None, :]
            if margin_scale:
                d = d - margin_scale * (S[:, :, None] - S[:, None, :])
            per_group = torch.where(better, -torch.nn.functional.logsigmoid(d), 0.0).sum((1, 2))
            count = better.sum((1, 2))
        else:
            in_denominator = better | torch.eye(k, dtype=torch.bool, device=r.device)  # D_i = {i} u worse
            lse = torch.logsumexp(R[:, None, :].expand(-1, k, -1).masked_fill(~in_denominator, -math.inf), dim=2)
            has_term = better.any(2)
            per_group = torch.where(has_term, lse - R, 0.0).sum(1)
            count = has_term.sum(1)
        valid = count > 0
        total = total + torch.where(valid, per_group / count.clamp_min(1), 0.0).sum()
        n_valid = n_valid + valid.sum()
    return total / n_valid.clamp_min(1)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _log1p_unit(t):
    """log(1 + t) for t in (0, 1] (as in bt_loss: no log1p in tl.math under the interpreter)."""
    u = 1.0 + t
    exact = u == 1.0
    return tl.where(exact, t, tl.log(u) * (t / tl.where(exact, 1.0, u - 1.0)))


@triton.jit
def _group_bt_kernel(
    R_ptr, R_stride,
    S_ptr,
    OFFSETS_ptr,
    DR_ptr,
    PARTIAL_ptr,
    VALID_ptr,
    margin_scale,
    HAS_MARGIN: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    start = tl.load(OFFSETS_ptr + g)
    end = tl.load(OFFSETS_ptr + g + 1)
    k = end - start

    # Walk 1: |P_g|, from the scores alone.
    pair_counts = tl.zeros([BLOCK_K], dtype=tl.float32)
    for i0 in range(0, k, BLOCK_K):
        i_idx = i0 + tl.arange(0, BLOCK_K)
        i_ok = i_idx < k
        s_i = tl.load(S_ptr + start + i_idx, mask=i_ok, other=0.0)
        for j0 in range(0, k, BLOCK_K):
            j_idx = j0 + tl.arange(0, BLOCK_K)
            j_ok = j_idx < k
            s_j = tl.load(S_ptr + start + j_idx, mask=j_ok, other=0.0)
            better = i_ok[:, None] & j_ok[None, :] & (s_i[:, None] > s_j[None, :])
            pair_counts += tl.sum(better.to(tl.float32), axis=1)
    n_pairs = tl.sum(pair_counts, axis=0)
    inv_pairs = 1.0 / tl.maximum(n_pairs, 1.0)

    # Walk 2: softplus terms of the rows' better-than pairs, and each row's gradient.
    losses = tl.zeros([BLOCK_K], dtype=tl.float32)
    for i0 in range(0, k, BLOCK_K):
        i_idx = i0 + tl.arange(0, BLOCK_K)
        i_ok = i_idx < k
        # .to(float32) right after the load: the interpreter computes wrongly on bf16 values.
        r_i = tl.load(R_ptr + (start + i_idx) * R_stride, mask=i_ok, other=0.0).to(tl.float32)
        s_i = tl.load(S_ptr + start + i_idx, mask=i_ok, other=0.0)
        grad_i = tl.zeros([BLOCK_K], dtype=tl.float32)
        for j0 in range(0, k, BLOCK_K):
            j_idx = j0 + tl.arange(0, BLOCK_K)
            j_ok = j_idx < k
            r_j = tl.load(R_ptr + (start + j_idx) * R_stride, mask=j_ok, other=0.0).to(tl.float32)
            s_j = tl.load(S_ptr + start + j_idx, mask=j_ok, other=0.0)
            both = i_ok[:, None] & j_ok[None, :]
            better = both & (s_i[:, None] > s_j[None, :])
            worse = both & (s_i[:, None] < s_j[None, :])
            e = r_i[:, None] - r_j[None, :]
            if HAS_MARGIN:
                e = e - margin_scale * (s_i[:, None] - s_j[None, :])
            t = tl.exp(-tl.abs(e))  # in (0, 1]: no overflow for any gap
            softplus = tl.maximum(-e, 0.0) + _log1p_unit(t)  # softplus(-e)
            losses += tl.sum(tl.where(better, softplus, 0.0), axis=1)
            # w = sigmoid(z) with z = -e on a better pair, z = e on a worse one: 1/(1+t) for z >= 0,
            # t/(1+t) for z < 0 (no 1 - sigmoid). dL/dr_i gets -w from a better pair, +w from a worse.
            z_nonneg = tl.where(better, e <= 0.0, e >= 0.0)
            w = tl.where(z_nonneg, 1.0, t) / (1.0 + t)
            grad_i += tl.sum(tl.where(better, -w, tl.where(worse, w, 0.0)), axis=1)
        tl.store(DR_ptr + start + i_idx, grad_i * inv_pairs, mask=i_ok)
    tl.store(PARTIAL_ptr + g, tl.sum(losses, axis=0) * inv_pairs)
    tl.store(VALID_ptr + g, tl.where(n_pairs > 0.0, 1.0, 0.0))


@triton.jit
def _group_pl_lse_kernel(
    R_ptr, R_stride,
    S_ptr,
    OFFSETS_ptr,
    MAX_ptr,
    SUM_ptr,
    PARTIAL_ptr,
    VALID_ptr,
    BLOCK_K: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    start = tl.load(OFFSETS_ptr + g)
    end = tl.load(OFFSETS_ptr + g + 1)
    k = end - start

    # Walk 1: the group's lowest score (i has a term iff s_i > min s).
    lows = tl.full([BLOCK_K], float("inf"), dtype=tl.float32)
    for i0 in range(0, k, BLOCK_K):
        i_idx = i0 + tl.arange(0, BLOCK_K)
        s_i = tl.load(S_ptr + start + i_idx, mask=i_idx < k, other=float("inf"))
        lows = tl.minimum(lows, s_i)
    s_min = tl.min(lows, axis=0)

    # Walk 2: lse_i over D_i = {i} u {j : s_j < s_i}, online (running maximum, rescaled sum).
    terms = tl.zeros([BLOCK_K], dtype=tl.float32)
    counts = tl.zeros([BLOCK_K], dtype=tl.float32)
    for i0 in range(0, k, BLOCK_K):
        i_idx = i0 + tl.arange(0, BLOCK_K)
        i_ok = i_idx < k
        r_i = tl.load(R_ptr + (start + i_idx) * R_stride, mask=i_ok, other=0.0).to(tl.float32)
        s_i = tl.load(S_ptr + start + i_idx, mask=i_ok, other=0.0)
        run_max = r_i  # i itself is in D_i: the maximum is finite from the start
        run_sum = tl.full([BLOCK_K], 1.0, dtype=tl.float32)  # exp(r_i - run_max)
        for j0 in range(0, k, BLOCK_K):
            j_idx = j0 + tl.arange(0, BLOCK_K)
            j_ok = j_idx < k
            r_j = tl.load(R_ptr + (start + j_idx) * R_stride, mask=j_ok, other=0.0).to(tl.float32)
            s_j = tl.load(S_ptr + start + j_idx, mask=j_ok, other=0.0)
            worse = i_ok[:, None] & j_ok[None, :] & (s_j[None, :] < s_i[:, None])
            new_max = tl.maximum(run_max, tl.max(tl.where(worse, r_j[None, :], -float("inf")), axis=1))
            # exp of a non-positive argument where selected; the unselected lanes get exp(-inf) = 0.
            x = tl.where(worse, r_j[None, :] - new_max[:, None], -float("inf"))
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(x), axis=1)
            run_max = new_max
        tl.store(MAX_ptr + start + i_idx, run_max, mask=i_ok)
        tl.store(SUM_ptr + start + i_idx, run_sum, mask=i_ok)
        has_term = i_ok & (s_i > s_min)
        # lse_i - r_i = (max_i - r_i) + log(sum_i): two terms >= 0, no cancellation.
        terms += tl.where(has_term, (run_max - r_i) + tl.log(run_sum), 0.0)
        counts += has_term.to(tl.float32)
    n_terms = tl.sum(counts, axis=0)
    tl.store(PARTIAL_ptr + g, tl.sum(terms, axis=0) / tl.maximum(n_terms, 1.0))
    tl.store(VALID_ptr + g, tl.where(n_terms > 0.0, 1.0, 0.0))


@triton.jit
def _group_pl_grad_kernel(
    R_ptr, R_stride,
    S_ptr,
    OFFSETS_ptr,
    MAX_ptr,
    SUM_ptr,
    DR_ptr,
    BLOCK_K: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    start = tl.load(OFFSETS_ptr + g)
    end = tl.load(OFFSETS_ptr + g + 1)
    k = end - start

    lows = tl.full([BLOCK_K], float("inf"), dtype=tl.float32)
    for i0 in range(0, k, BLOCK_K):
        i_idx = i0 + tl.arange(0, BLOCK_K)
        s_i = tl.load(S_ptr + start + i_idx, mask=i_idx < k, other=float("inf"))
        lows = tl.minimum(lows, s_i)
    s_min = tl.min(lows, axis=0)
    counts = tl.zeros([BLOCK_K], dtype=tl.float32)
    for i0 in range(0, k, BLOCK_K):
        i_idx = i0 + tl.arange(0, BLOCK_K)
        s_i = tl.load(S_ptr + start + i_idx, mask=i_idx < k, other=float("-inf"))
        counts += (s_i > s_min).to(tl.float32)
    inv_terms = 1.0 / tl.maximum(tl.sum(counts, axis=0), 1.0)

    for a0 in range(0, k, BLOCK_K):
        a_idx = a0 + tl.arange(0, BLOCK_K)
        a_ok = a_idx < k
        r_a = tl.load(R_ptr + (start + a_idx) * R_stride, mask=a_ok, other=0.0).to(tl.float32)
        s_a = tl.load(S_ptr + start + a_idx, mask=a_ok, other=0.0)
        max_a = tl.load(MAX_ptr + start + a_idx, mask=a_ok, other=0.0)
        sum_a = tl.load(SUM_ptr + start + a_idx, mask=a_ok, other=1.0)
        has_term = a_ok & (s_a > s_min)
        grad_a = tl.where(has_term, tl.exp(r_a - max_a) / sum_a - 1.0, 0.0)  # p_aa - 1
        for i0 in range(0, k, BLOCK_K):
            i_idx = i0 + tl.arange(0, BLOCK_K)
            i_ok = i_idx < k
            s_i = tl.load(S_ptr + start + i_idx, mask=i_ok, other=0.0)
            max_i = tl.load(MAX_ptr + start + i_idx, mask=i_ok, other=0.0)
            sum_i = tl.load(SUM_ptr + start + i_idx, mask=i_ok, other=1.0)
            above = a_ok[:, None] & i_ok[None, :] & (s_i[None, :] > s_a[:, None])  # a is in D_i
            x = tl.where(above, r_a[:, None] - max_i[None, :], -float("inf"))  # <= 0 where selected
            grad_a += tl.sum(tl.exp(x) / sum_i[None, :], axis=1)  # p_ia = exp(r_a - max_i) / sum_i
        tl.store(DR_ptr + start + a_idx, grad_a * inv_terms, mask=a_ok)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------
def check_group_inputs(r, scores, offsets, kind, margin_scale) -> int:
    """Raise a TypeError/ValueError naming the problem; return the largest group size k.

    Reads the G+1 offsets and whether the scores are finite on the host (small device-to-host
    copies): the checks need them, and the launcher needs the largest k to pick a tile size.
    """
    if kind not in KINDS:
        raise ValueError(f"group_loss: kind must be one of {KINDS}, got {kind!r}")
    if isinstance(margin_scale, bool) or not isinstance(margin_scale, (int, float)):
        raise TypeError(f"group_loss: margin_scale must be a float, got {type(margin_scale).__name__}")
    if not (math.isfinite(margin_scale) and margin_scale >= 0.0):
        raise ValueError(f"group_loss: margin_scale must be finite and >= 0, got {margin_scale}")
    if kind == "pl" and margin_scale != 0.0:
        raise ValueError(f"group_loss: margin_scale applies to kind='bt' only, got {margin_scale} with kind='pl'")
    for name, t in (("r", r), ("scores", scores), ("offsets", offsets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"group_loss: {name} must be a torch.Tensor, got {type(t).__name__}")
    if r.dim() != 1:
        raise ValueError(f"group_loss: r must be 1-D (N,), grouped by prompt, got shape {tuple(r.shape)}")
    if r.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"group_loss: r dtype must be one of {SUPPORTED_DTYPES}, got {r.dtype}")
    n = r.numel()
    if n == 0:
        raise ValueError("group_loss: empty batch (no rewards)")
    if scores.shape != r.shape:
        raise ValueError(f"group_loss: scores must have the shape of r ({n},), got {tuple(scores.shape)}")
    if scores.dtype == torch.bool or scores.is_complex():
        raise ValueError(f"group_loss: scores must be real numbers, got {scores.dtype}")
    if scores.device != r.device:
        raise ValueError(f"group_loss: scores are on {scores.device} but r on {r.device}")
    if offsets.dtype != torch.int64:
        raise ValueError(f"group_loss: offsets must be int64, got {offsets.dtype}")
    if offsets.dim() != 1 or offsets.numel() < 2:
        raise ValueError(f"group_loss: offsets must be 1-D with G+1 >= 2 entries, got shape {tuple(offsets.shape)}")
    if offsets.device != r.device:
        raise ValueError(f"group_loss: offsets are on {offsets.device} but r on {r.device}")
    bounds = offsets.tolist()
    if bounds[0] != 0:
        raise ValueError(f"group_loss: offsets[0] must be 0, got {bounds[0]}")
    if bounds[-1] != n:
        raise ValueError(f"group_loss: offsets[-1] must equal len(r) = {n}, got {bounds[-1]}")
    sizes = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    for g, k in enumerate(sizes):
        if k < 1:
            raise ValueError(
                f"group_loss: offsets must be strictly increasing (every prompt has k >= 1 responses), "
                f"but offsets[{g}] = {bounds[g]} and offsets[{g + 1}] = {bounds[g + 1]}"
            )
    if scores.is_floating_point() and not bool(torch.isfinite(scores).all()):
        raise ValueError("group_loss: scores must be finite (a NaN would silently drop its pairs)")
    return max(sizes)


def group_loss_fwd_bwd(r, scores, offsets, kind="bt", margin_scale=0.0):
    """Launch the kernels. Returns (L: 0-dim fp32, dL/dr * |V|: (N,) fp32, 1/max(|V|, 1): 0-dim fp32)."""
    max_k = check_group_inputs(r, scores, offsets, kind, margin_scale)
    n_groups = offsets.numel() - 1
    device = r.device
    block_k = min(MAX_BLOCK_K, max(16, triton.next_power_of_2(max_k)))
    offsets = offsets.contiguous()
    s = scores.detach().to(torch.float32).contiguous()
    grad = torch.empty(r.numel(), dtype=torch.float32, device=device)
    buffers = torch.empty((2, n_groups), dtype=torch.float32, device=device)  # [L_g; counts flag]
    partials, valid = buffers[0], buffers[1]
    if kind == "bt":
        _group_bt_kernel[(n_groups,)](
            r, r.stride(0), s, offsets, grad, partials, valid, float(margin_scale),
            HAS_MARGIN=margin_scale != 0.0, BLOCK_K=block_k,
        )
    else:
        run_max, run_sum = torch.empty((2, r.numel()), dtype=torch.float32, device=device)  # lse = max + log(sum)
        _group_pl_lse_kernel[(n_groups,)](r, r.stride(0), s, offsets, run_max, run_sum, partials, valid,
                                          BLOCK_K=block_k)
        _group_pl_grad_kernel[(n_groups,)](r, r.stride(0), s, offsets, run_max, run_sum, grad, BLOCK_K=block_k)
    inv_valid = 1.0 / sum_partials(valid, 1.0).clamp_min(1.0)
    return sum_partials(partials, 1.0) * inv_valid, grad, inv_valid


class GroupLossFunction(torch.autograd.Function):
    """Autograd wrapper: the forward kernels already computed dL/dr (up to 1/|V|); backward scales it."""

    @staticmethod
    def forward(ctx, r, scores, offsets, kind, margin_scale):
        loss, grad, inv_valid = group_loss_fwd_bwd(r, scores, offsets, kind, margin_scale)
        ctx.save_for_backward(grad, inv_valid)
        ctx.dtype = r.dtype
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        grad, inv_valid = ctx.saved_tensors
        return (grad * (grad_out * inv_valid)).to(ctx.dtype), None, None, None, None


def group_loss(
    r: torch.Tensor,
    scores: torch.Tensor,
    offsets: torch.Tensor,
    *,
    kind: str = "bt",
    margin_scale: float = 0.0,
    impl: str = "auto",
) -> torch.Tensor:
    """Mean over the groups that have a pair of their pairwise BT (``kind="bt"``) or listwise
    Plackett-Luce (``kind="pl"``) loss; see the module docstring. Minimise it.

    r: 1-D (N,) rewards, fp32/fp16/bf16, grouped by prompt (any stride). scores: (N,) real labels,
    higher = better (compared in fp32; ties give no pair). offsets: int64 (G+1,), 0 = offsets[0] <
    ... < offsets[G] = N. All on one device. margin_scale >= 0 (bt only): the pair (i, j) must win
    by margin_scale * (scores_i - scores_j). Returns a 0-dim fp32 tensor, differentiable in r
    (gradient in r's dtype); 0 with a zero gradient when no group has a pair.
    ``impl``: "auto" | "torch" | "triton"; see ``metarm_fast.kernels._dispatch``.
    """
    path = resolve_impl("group_loss", impl, (r, scores, offsets), kernel=_group_bt_kernel)
    if path == "torch":
        check_group_inputs(r, scores, offsets, kind, margin_scale)
        return group_loss_reference(r, scores, offsets, kind=kind, margin_scale=margin_scale)
    return GroupLossFunction.apply(r, scores, offsets, kind, margin_scale)  # the launcher checks the inputs
