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

from .perturb_spec import _KIND, PerturbStats, _check_perturb_args, _raise_mismatch
from .perturbation import Perturbation, RestorePlan
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
def _chunk(chunk, CHUNK_TENSOR_ptr, CHUNK_START_ptr, NUMEL_ptr):
    """Chunk ``chunk`` (int64) of the tables: (tensor index, first element, the tensor's size), all int64."""
    tensor = tl.load(CHUNK_TENSOR_ptr + chunk).to(tl.int64)
    return tensor, tl.load(CHUNK_START_ptr + chunk), tl.load(NUMEL_ptr + tensor)


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
    pid = tl.program_id(0).to(tl.int64)
    tensor, chunk_start, numel = _chunk(pid, CHUNK_TENSOR_ptr, CHUNK_START_ptr, NUMEL_ptr)
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
            # _rn: IEEE rounding, as on the torch path; the default sqrt/div are approximate.
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


# first_chunk is not specialised on: its value changes from hook to hook, and a specialisation
# (== 1, divisible by 16) would compile up to three variants of the kernel for one job.
@triton.jit(do_not_specialize=["first_chunk"])
def _restore_kernel(
    P_ADDR_ptr, Z_ADDR_ptr, M_ADDR_ptr, NUMEL_ptr,
    CHUNK_TENSOR_ptr, CHUNK_START_ptr, first_chunk,
    P_KIND: tl.constexpr, Z_KIND: tl.constexpr, HAS_MASTER: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr,
):
    # Program k restores chunk first_chunk + k: a launch covers a run of chunks (one tensor's, or all).
    chunk = first_chunk.to(tl.int64) + tl.program_id(0).to(tl.int64)
    tensor, chunk_start, numel = _chunk(chunk, CHUNK_TENSOR_ptr, CHUNK_START_ptr, NUMEL_ptr)
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
def _chunk_tables(numels: list[int]):
    """(chunk -> tensor index, chunk -> first element) for tensors of these sizes, int64, on the host."""
    counts = torch.tensor([triton.cdiv(n, CHUNK) for n in numels], dtype=torch.int64)
    chunk_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
    first_chunk = torch.cumsum(counts, 0) - counts  # (T,)
    chunk_start = (torch.arange(chunk_tensor.numel(), dtype=torch.int64) - first_chunk[chunk_tensor]) * CHUNK
    return chunk_tensor, chunk_start


def _addresses(tensors) -> torch.Tensor:
    """The tensors' raw addresses (0 for None), int64, on the host. The caller keeps the tensors alive
    until every launch reading them has been queued."""
    return torch.tensor([0 if t is None else t.data_ptr() for t in tensors], dtype=torch.int64)


def _addr_table(tensors, device):
    return _addresses(tensors).to(device)


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

    def perturbation(stats):
        return Perturbation(stats, params, grads if masters is None else None, masters, plan_type=TritonRestorePlan)

    if not params:
        return perturbation(PerturbStats())
    device = params[0].device
    has_v = [exp_avg_sq is not None and exp_avg_sq[i] is not None for i in range(len(params))]
    keys = [(_KIND[p.dtype], _KIND[g.dtype], hv) for p, g, hv in zip(params, grads, has_v)]
    launched = []  # (indices, chunk_tensor, stats)
    for (p_kind, g_kind, hv), idx in _groups(params, keys).items():
        p_table = _addr_table([params[i] for i in idx], device)
        numel = torch.tensor([params[i].numel() for i in idx], dtype=torch.int64).to(device)
        chunk_tensor, chunk_start = _chunk_tables([params[i].numel() for i in idx])
        chunk_tensor, chunk_start = chunk_tensor.to(torch.int32).to(device), chunk_start.to(device)
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
            # No FMA contraction of eta*d + p: the torch path rounds the product first.
            enable_fp_fusion=False,
        )
        launched.append((idx, chunk_tensor, stats))
    if not launched:  # every tensor empty: nothing to launch
        return perturbation(PerturbStats())
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
    return perturbation(stats_out)


def restore_triton_(params, deltas, *, masters=None):
    """Host launcher of _restore_kernel: one launch per (param dtype, deltas dtype) group."""
    TritonRestorePlan(params, deltas, masters).restore_all()


class TritonRestorePlan(RestorePlan):
    """The Triton path's RestorePlan: the device tables are built and uploaded here, once.

    The tables (per group of tensors sharing (param dtype, deltas dtype): the tensors' addresses,
    sizes, and the chunk -> (tensor, first element) map) are packed into one host tensor and copied
    to the device in one go. ``restore_all()`` is then one launch per group over all its chunks;
    ``restore(i)``, what each backward hook runs, one launch over tensor i's run of chunks
    (``first_chunk`` and a grid of its chunk count), reading the same tables. A hook thus runs no
    argument check, makes no tensor and copies nothing to the device.

    Why it matters on a GPU (reasoned, not measured here: no GPU run has been made): a table built
    per call is a ``torch.tensor(...).to(device)`` from pageable host memory, which torch makes a
    synchronous copy: the host waits until the stream has drained. Inside the backward pass that
    would stall the host at every parameter -- hundreds of times a step -- while it should be
    queueing the next kernels, serialising host and device. Here the only copy is made when the plan
    is built, before the L pass, and each hook only queues a kernel (Triton's own launch overhead,
    tens of microseconds of host time, remains). The plan holds the tensors whose raw addresses the
    tables hold, so they outlive every launch queued from it.
    """

    def __init__(self, params, deltas, masters=None):
        super().__init__(params, deltas, masters)
        self._groups = []  # per group: (tables, num_chunks, P_KIND, Z_KIND)
        self._where: list = [None] * len(self.params)  # per tensor: (group, first chunk, chunk count); None if empty
        if not self.params:
            return
        has_master = self.masters is not None
        if has_master:
            keys = [(_KIND[p.dtype], 0) for p in self.params]
        else:
            keys = [(_KIND[p.dtype], _KIND[z.dtype]) for p, z in zip(self.params, self.deltas)]
        host, size = [], 0  # int64 segments, each padded to 16 bytes: Triton specialises pointers on 16-byte alignment
        groups = []  # per group: (spans of its 5 tables in ``host``, num_chunks, P_KIND, Z_KIND)
        others = self.masters if has_master else self.deltas
        for g, ((p_kind, z_kind), idx) in enumerate(_groups(self.params, keys).items()):
            numels = [self.params[i].numel() for i in idx]
            chunk_tensor, chunk_start = _chunk_tables(numels)
            spans = []
            for table in (_addresses([self.params[i] for i in idx]), _addresses([others[i] for i in idx]),
                          torch.tensor(numels, dtype=torch.int64), chunk_tensor, chunk_start):
                spans.append((size, table.numel()))
                host += [table, torch.zeros(table.numel() % 2, dtype=torch.int64)]
                size += table.numel() + table.numel() % 2
            groups.append((spans, chunk_tensor.numel(), p_kind, z_kind))
            first = 0
            for i, n in zip(idx, numels):
                count = triton.cdiv(n, CHUNK)
                self._where[i] = (g, first, count)
                first += count
        if not groups:  # every tensor empty: nothing to restore
            return
        tables = torch.cat(host).to(self.params[0].device)  # the plan's one host-to-device copy
        for spans, num_chunks, p_kind, z_kind in groups:
            self._groups.append(([tables[start:start + n] for start, n in spans], num_chunks, p_kind, z_kind))

    def _launch(self, group: int, first_chunk: int, num_chunks: int) -> None:
        (p_table, other_table, numel, chunk_tensor, chunk_start), _, p_kind, z_kind = self._groups[group]
        has_master = self.masters is not None
        _restore_kernel[(num_chunks,)](
            p_table,
            p_table if has_master else other_table,
            other_table if has_master else p_table,
            numel, chunk_tensor, chunk_start, first_chunk,
            P_KIND=p_kind, Z_KIND=z_kind, HAS_MASTER=has_master,
            BLOCK_SIZE=BLOCK_SIZE, BLOCKS_PER_PROGRAM=BLOCKS_PER_PROGRAM,
            enable_fp_fusion=False,
        )

    def restore(self, i: int) -> None:
        where = self._where[i]
        if where is not None:
            self._launch(*where)

    def restore_all(self) -> None:
        for g, (_, num_chunks, _, _) in enumerate(self._groups):
            self._launch(g, 0, num_chunks)
