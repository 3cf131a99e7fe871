"""The Triton path of perturb_ / restore_ (the rule is in ``perturb_spec``): kernels and their host launchers.

Multi-tensor launches: the host builds, per group of tensors sharing (param dtype, grads dtype,
has exp_avg_sq), a table of the tensors' base addresses and sizes, and a table of chunks (tensor
index, first element). One launch covers the group; each program loads its tensor's addresses from
the tables and casts them to typed pointers. This works under the interpreter too (checked with
Triton 3.9). 16-bit tensors are handled as int16 bit patterns and widened/rounded with integer
bit operations: the interpreter widens bf16 subnormals wrongly and rounds fp32 -> bf16 by
truncation (measured: ~50% of random values off by one ulp), so relying on its bf16 conversions
would break both exactness and the agreement with torch. fp16 uses Triton's own conversions,
which match torch bit for bit under the interpreter (checked on 1.15M values) and are RNE on GPUs.
"""
from __future__ import annotations

import torch

from .perturb_spec import _KIND, PerturbStats, _check_perturb_args, _check_restore_args, _raise_mismatch
from ._triton import tl, triton

BLOCK_SIZE = 1024
BLOCKS_PER_PROGRAM = 8  # a program covers a chunk of 8192 elements: 0.8M programs for 6.7e9 params
CHUNK = BLOCK_SIZE * BLOCKS_PER_PROGRAM
# Rows of the per-program statistics buffer.
_S_CHANGED, _S_REALISED, _S_INTENDED, _S_NONFINITE, _S_MISMATCH = range(5)
_NUM_STATS = 5


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _typed_ptr(addr, KIND: tl.constexpr):
    # fp32 tensors are read as int32 bit patterns, fp16/bf16 as int16: all compares are on bits.
    if KIND == 0:
        return addr.to(tl.pointer_type(tl.int32))
    else:
        return addr.to(tl.pointer_type(tl.int16))


@triton.jit
def _bits_to_f32(bits, KIND: tl.constexpr):
    """Exact widening of a stored bit pattern to fp32."""
    if KIND == 0:
        return bits.to(tl.float32, bitcast=True)
    elif KIND == 1:
        return bits.to(tl.float16, bitcast=True).to(tl.float32)
    else:
        # bf16 is the top half of an fp32. Done with integers: the interpreter's own bf16 -> fp32
        # conversion gets subnormals wrong.
        return (bits.to(tl.int32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _f32_to_bits(x, KIND: tl.constexpr):
    """Round an fp32 value to the dtype (round-to-nearest-even) and return its bit pattern."""
    if KIND == 0:
        return x.to(tl.int32, bitcast=True)
    elif KIND == 1:
        return x.to(tl.float16).to(tl.int16, bitcast=True)
    else:
        # RNE on the fp32 bits: add 0x7FFF plus the lowest kept bit, then drop 16 bits. Overflow
        # to inf comes out right. The interpreter's fp32 -> bf16 cast truncates instead, and
        # doing it here on GPUs too keeps one code path. int32 wraps on NaN bit patterns, hence
        # the separate NaN branch (quiet NaN, sign and top payload kept).
        u = x.to(tl.int32, bitcast=True)
        rounded = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
        quiet_nan = (u >> 16) | 0x40
        return tl.where(x != x, quiet_nan, rounded).to(tl.int16)


@triton.jit
def _program_chunk(CHUNK_TENSOR_ptr, CHUNK_START_ptr, NUMEL_ptr):
    """This program's chunk: (program id, tensor index, first element, the tensor's size), all int64."""
    pid = tl.program_id(0).to(tl.int64)
    tensor = tl.load(CHUNK_TENSOR_ptr + pid).to(tl.int64)
    return pid, tensor, tl.load(CHUNK_START_ptr + pid), tl.load(NUMEL_ptr + tensor)


@triton.jit
def _perturb_kernel(
    P_ADDR_ptr, G_ADDR_ptr, M_ADDR_ptr, V_ADDR_ptr, NUMEL_ptr,
    CHUNK_TENSOR_ptr, CHUNK_START_ptr,
    STATS_ptr, num_chunks,
    eta, eps, bias_correction2,
    P_KIND: tl.constexpr, G_KIND: tl.constexpr,
    HAS_MASTER: tl.constexpr, HAS_V: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr,
):
    pid, tensor, chunk_start, numel = _program_chunk(CHUNK_TENSOR_ptr, CHUNK_START_ptr, NUMEL_ptr)
    P = _typed_ptr(tl.load(P_ADDR_ptr + tensor), P_KIND)
    G = _typed_ptr(tl.load(G_ADDR_ptr + tensor), G_KIND)
    if HAS_MASTER:
        M = tl.load(M_ADDR_ptr + tensor).to(tl.pointer_type(tl.float32))
    if HAS_V:
        V = tl.load(V_ADDR_ptr + tensor).to(tl.pointer_type(tl.float32))
    # Only the blocks that hold elements: small tensors do not pay for a whole chunk.
    num_blocks = tl.minimum((numel - chunk_start + BLOCK_SIZE - 1) // BLOCK_SIZE, BLOCKS_PER_PROGRAM)

    # fp64 accumulators: squares of any finite fp32 value neither overflow nor underflow in fp64
    # (in fp32, |e| > 1.8e19 would give inf and |e| < 1e-23 would give 0). A few fp64 ops per
    # element are far below what the memory traffic leaves free on an A100 or H100.
    acc_changed = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
    acc_realised = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
    acc_intended = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
    acc_nonfinite = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
    acc_mismatch = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
    for b in range(0, num_blocks):
        offs = chunk_start + b * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < numel
        p_bits = tl.load(P + offs, mask=mask, other=0)
        p = _bits_to_f32(p_bits, P_KIND)
        g = _bits_to_f32(tl.load(G + offs, mask=mask, other=0), G_KIND)
        if HAS_V:
            v = tl.load(V + offs, mask=mask, other=1.0)
            # _rn: IEEE rounding, as the torch reference; the default sqrt/div are approximate.
            d = tl.div_rn(g, tl.maximum(tl.sqrt_rn(tl.div_rn(v, bias_correction2)), tl.abs(g)) + eps)
        else:
            d = g
        e = eta * d
        e_finite = tl.abs(e) < float("inf")  # False for inf and NaN

        if HAS_MASTER:
            w = tl.load(M + offs, mask=mask, other=0.0)
            # The compute copy must be round(master), or re-casting would not restore it.
            mismatch = mask & (_f32_to_bits(w, P_KIND) != p_bits) & ~((w != w) & (p != p))
            new_bits = _f32_to_bits(w + e, P_KIND)
            new = _bits_to_f32(new_bits, P_KIND)
            ok = mask & e_finite & (tl.abs(new) < float("inf")) & (new != p) & ~mismatch
            acc_mismatch += mismatch.to(tl.float64)
        else:
            s = _bits_to_f32(_f32_to_bits(p + e, P_KIND), P_KIND)
            z_bits = _f32_to_bits(s - p, G_KIND)
            z = _bits_to_f32(z_bits, G_KIND)
            new_bits = _f32_to_bits(p + z, P_KIND)
            new = _bits_to_f32(new_bits, P_KIND)
            back_bits = _f32_to_bits(new - z, P_KIND)  # exactly what restore_ will compute
            ok = mask & (z != 0.0) & (tl.abs(new) < float("inf")) & (new != p) & (back_bits == p_bits)
            # The whole grads buffer is rewritten: it now holds the step, or 0.
            tl.store(G + offs, tl.where(ok, z_bits, tl.zeros_like(z_bits)), mask=mask)
        # Only changed weights are written: in bf16 that is ~0.06% of them for a plain step.
        tl.store(P + offs, new_bits, mask=ok)

        delta = tl.where(ok, new.to(tl.float64) - p.to(tl.float64), 0.0)  # exact in fp64
        e64 = tl.where(mask & e_finite, e, 0.0).to(tl.float64)
        acc_changed += ok.to(tl.float64)
        acc_realised += delta * delta
        acc_intended += e64 * e64
        acc_nonfinite += (mask & ~e_finite).to(tl.float64)

    # Per-program partials; the host adds them in a fixed order, so the stats are repeatable.
    tl.store(STATS_ptr + 0 * num_chunks + pid, tl.sum(acc_changed, axis=0))
    tl.store(STATS_ptr + 1 * num_chunks + pid, tl.sum(acc_realised, axis=0))
    tl.store(STATS_ptr + 2 * num_chunks + pid, tl.sum(acc_intended, axis=0))
    tl.store(STATS_ptr + 3 * num_chunks + pid, tl.sum(acc_nonfinite, axis=0))
    tl.store(STATS_ptr + 4 * num_chunks + pid, tl.sum(acc_mismatch, axis=0))


@triton.jit
def _restore_kernel(
    P_ADDR_ptr, Z_ADDR_ptr, M_ADDR_ptr, NUMEL_ptr,
    CHUNK_TENSOR_ptr, CHUNK_START_ptr,
    P_KIND: tl.constexpr, Z_KIND: tl.constexpr, HAS_MASTER: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr,
):
    pid, tensor, chunk_start, numel = _program_chunk(CHUNK_TENSOR_ptr, CHUNK_START_ptr, NUMEL_ptr)
    P = _typed_ptr(tl.load(P_ADDR_ptr + tensor), P_KIND)
    if HAS_MASTER:
        M = tl.load(M_ADDR_ptr + tensor).to(tl.pointer_type(tl.float32))
    else:
        Z = _typed_ptr(tl.load(Z_ADDR_ptr + tensor), Z_KIND)
    num_blocks = tl.minimum((numel - chunk_start + BLOCK_SIZE - 1) // BLOCK_SIZE, BLOCKS_PER_PROGRAM)
    for b in range(0, num_blocks):
        offs = chunk_start + b * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < numel
        if HAS_MASTER:
            w = tl.load(M + offs, mask=mask, other=0.0)
            tl.store(P + offs, _f32_to_bits(w, P_KIND), mask=mask)
        else:
            z = _bits_to_f32(tl.load(Z + offs, mask=mask, other=0), Z_KIND)
            moved = mask & (z != 0.0)
            # Unmoved weights are neither read nor written (most of them, in bf16).
            p = _bits_to_f32(tl.load(P + offs, mask=moved, other=0), P_KIND)
            tl.store(P + offs, _f32_to_bits(p - z, P_KIND), mask=moved)


# ----------------------------------------------------------------------------------------------
# Host side: tables, launches
# ----------------------------------------------------------------------------------------------
def _chunk_tables(numels: list[int], device):
    """(chunk -> tensor index, chunk -> first element) for tensors of these sizes."""
    counts = torch.tensor([triton.cdiv(n, CHUNK) for n in numels], dtype=torch.int64)
    chunk_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
    first_chunk = torch.cumsum(counts, 0) - counts  # (T,)
    chunk_start = (torch.arange(chunk_tensor.numel(), dtype=torch.int64) - first_chunk[chunk_tensor]) * CHUNK
    return chunk_tensor.to(torch.int32).to(device), chunk_start.to(device)


def _addr_table(tensors, device):
    # Raw addresses; the caller's lists keep the tensors alive until the launch has been queued.
    return torch.tensor([0 if t is None else t.data_ptr() for t in tensors], dtype=torch.int64).to(device)


def _groups(params, keys):
    """Indices of non-empty tensors grouped by key, in first-seen order (deterministic)."""
    groups: dict = {}
    for i, key in enumerate(keys):
        if params[i].numel():
            groups.setdefault(key, []).append(i)
    return groups


def perturb_triton_(params, grads, eta, *, masters=None, exp_avg_sq=None, eps=1e-8, bias_correction2=1.0):
    """Host launcher of _perturb_kernel: one launch per (param dtype, grads dtype, has v) group."""
    _check_perturb_args(params, grads, eta, masters, exp_avg_sq, eps, bias_correction2)
    if not params:
        return PerturbStats(0, 0, 0.0, 0.0, 0)
    device = params[0].device
    has_v = [exp_avg_sq is not None and exp_avg_sq[i] is not None for i in range(len(params))]
    keys = [(_KIND[p.dtype], _KIND[g.dtype], hv) for p, g, hv in zip(params, grads, has_v)]
    launched = []  # (indices, chunk_tensor, stats)
    for (p_kind, g_kind, hv), idx in _groups(params, keys).items():
        p_table = _addr_table([params[i] for i in idx], device)
        numel = torch.tensor([params[i].numel() for i in idx], dtype=torch.int64).to(device)
        chunk_tensor, chunk_start = _chunk_tables([params[i].numel() for i in idx], device)
        num_chunks = chunk_tensor.numel()
        stats = torch.empty(_NUM_STATS, num_chunks, dtype=torch.float64, device=device)
        _perturb_kernel[(num_chunks,)](
            p_table,
            _addr_table([grads[i] for i in idx], device),
            _addr_table([masters[i] for i in idx], device) if masters is not None else p_table,
            _addr_table([exp_avg_sq[i] for i in idx], device) if hv else p_table,
            numel, chunk_tensor, chunk_start,
            stats, num_chunks,
            float(eta), float(eps), float(bias_correction2),
            P_KIND=p_kind, G_KIND=g_kind, HAS_MASTER=masters is not None, HAS_V=hv,
            BLOCK_SIZE=BLOCK_SIZE, BLOCKS_PER_PROGRAM=BLOCKS_PER_PROGRAM,
            # No FMA contraction of eta*d + p: the reference rounds the product first.
            enable_fp_fusion=False,
        )
        launched.append((idx, chunk_tensor, stats))
    if not launched:  # every tensor empty: nothing to launch
        return PerturbStats(0, 0, 0.0, 0.0, 0)
    # One device-to-host copy for all groups.
    totals = torch.stack([s.sum(dim=1) for _, _, s in launched]).sum(dim=0).tolist()
    stats_out = PerturbStats(
        numel=sum(p.numel() for p in params),
        changed=int(totals[_S_CHANGED]),
        intended_sq=totals[_S_INTENDED],
        realised_sq=totals[_S_REALISED],
        nonfinite=int(totals[_S_NONFINITE]),
    )
    if totals[_S_MISMATCH] > 0:
        per_tensor: dict = {}
        for idx, chunk_tensor, s in launched:
            for c in (s[_S_MISMATCH] > 0).nonzero().flatten().tolist():
                i = idx[int(chunk_tensor[c])]
                per_tensor[i] = per_tensor.get(i, 0) + int(s[_S_MISMATCH, c])
        _raise_mismatch(sorted(per_tensor.items()))
    return stats_out


def restore_triton_(params, deltas, *, masters=None):
    """Host launcher of _restore_kernel: one launch per (param dtype, deltas dtype) group."""
    _check_restore_args(params, deltas, masters)
    if not params:
        return
    device = params[0].device
    if masters is not None:
        keys = [(_KIND[p.dtype], 0) for p in params]
    else:
        keys = [(_KIND[p.dtype], _KIND[z.dtype]) for p, z in zip(params, deltas)]
    for (p_kind, z_kind), idx in _groups(params, keys).items():
        p_table = _addr_table([params[i] for i in idx], device)
        chunk_tensor, chunk_start = _chunk_tables([params[i].numel() for i in idx], device)
        _restore_kernel[(chunk_tensor.numel(),)](
            p_table,
            _addr_table([deltas[i] for i in idx], device) if masters is None else p_table,
            _addr_table([masters[i] for i in idx], device) if masters is not None else p_table,
            torch.tensor([params[i].numel() for i in idx], dtype=torch.int64).to(device),
            chunk_tensor, chunk_start,
            P_KIND=p_kind, Z_KIND=z_kind, HAS_MASTER=masters is not None,
            BLOCK_SIZE=BLOCK_SIZE, BLOCKS_PER_PROGRAM=BLOCKS_PER_PROGRAM,
            enable_fp_fusion=False,
        )
