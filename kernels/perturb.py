r"""In-place perturbation of the weights for the MetaRM meta step, and its bit-exact restore.

The meta step (metarm.md, Algorithm 1, steps 3-5) evaluates the preference loss at
theta' = theta + eta * grad J and must then give back theta exactly, without a full copy of the
weights (a 7B model's fp32 copy is 27 GB, which does not fit beside the rest on an A100-80G).

Direction and intended step, per element, in fp32:

    d = g                                            (plain: the J gradient)
    d = g / (max(sqrt(v / bias_correction2), |g|) + eps)
                                                     (preconditioned by the optimizer's second
                                                      moment v, fp32, same shape)
The floor |g| (taken after the sqrt, so g*g cannot overflow) keeps |d| <= 1: where v is ~0 (a weight the preference data has not moved yet, but
that J does move) a plain g / (sqrt(v) + eps) would be g / 1e-8, a step no one asked for. With the
floor such an element moves by at most eta, like the sign step Adam itself would take there.
    e = eta * d

Every fp32 operation is IEEE round-to-nearest on both paths (tl.sqrt_rn / tl.div_rn in Triton,
FMA contraction switched off), so the torch reference and the kernel agree bit for bit.

Case A - no master weights (param p in fp32, fp16 or bf16; g held in the grads buffer G).
round() rounds to the param dtype (round-to-nearest-even), round_G() to the grads dtype:

    s  = round(p + e)
    z  = round_G(s - p)              # the step as it can be stored in the grads buffer
    p1 = round(p + z)
    ok = z != 0  and  isfinite(p1)  and  p1 != p  and  bits(round(p1 - z)) == bits(p)
    p <- ok ? p1 : p                 # the forward pass sees p1
    G <- ok ? z  : 0                 # "exactly what was added"; the J gradient is not needed again
    restore:  p <- (z != 0) ? round(p - z) : p

The restore is exact by construction: ``ok`` runs the very operation the restore will run and
keeps the step only where it gives back the same bits (this covers -0.0, subnormals, values near
the overflow threshold). Elements where it would not are left alone and show up in the stats.
No copy of anything is made: the grads buffer is reused.

Case B - fp32 master weights w, params a compute copy (bf16/fp16; fp32 also accepted):

    check: bits(p) == bits(round(w))  (else restoring by re-casting w would not give p back)
    new = round(w + e);  ok = isfinite(e) and isfinite(new) and new != p and the check passed
    p <- ok ? new : p                # the grads are not modified, w is not modified
    restore:  p <- round(w)

Elements failing the check are left alone and counted; the host then raises naming the tensor.

Statistics (both cases, over all elements): numel; changed = count(ok), i.e. elements whose
forward-visible weight changed; realised_sq = sum (p_after - p_before)^2 (differences taken in
fp64, where they are exact); intended_sq = sum e^2 over finite e (fp64); nonfinite = count(e not
finite). With weights ~N(0, 0.02^2), grads ~N(0, 0.01^2) and eta = 5e-6, case A changes ~0.06%
of bf16 weights and ~99% of fp32 weights (metarm.md): the stats are how a trainer notices a
vanished step.

Multi-tensor launches: the host builds, per group of tensors sharing (param dtype, grads dtype,
has exp_avg_sq), a table of the tensors' base addresses and sizes, and a table of chunks (tensor
index, first element). One launch covers the group; each program loads its tensor's addresses from
the tables and casts them to typed pointers. This works under the interpreter too (checked with
Triton 3.9). 16-bit tensors are handled as int16 bit patterns and widened/rounded with integer
bit operations: the interpreter widens bf16 subnormals wrongly and rounds fp32 -> bf16 by
truncation (measured: ~50% of random values off by one ulp), so relying on its bf16 conversions
would break both exactness and the agreement with torch. fp16 uses Triton's own conversions,
which match torch bit for bit under the interpreter (checked on 1.15M values) and are RNE on GPUs.

Limits. NaN: a NaN weight is never perturbed and keeps its bits in case A; in case B a NaN master
restores to a NaN whose payload may differ between the torch and Triton paths (torch's own
fp32 -> bf16 cast gives different NaN bits on its scalar and vectorised paths). Agreement of the
two paths on a GPU rests on IEEE fp32 on both sides (sqrt_rn, div_rn, no FMA contraction); the
tests check it under the interpreter and check the compiled PTX for those properties, but no GPU
run has been made here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ._dispatch import resolve_impl

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # constexpr codes in the kernels
_BITS_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
BLOCK_SIZE = 1024
BLOCKS_PER_PROGRAM = 8  # a program covers a chunk of 8192 elements: 0.8M programs for 6.7e9 params
CHUNK = BLOCK_SIZE * BLOCKS_PER_PROGRAM
# Rows of the per-program statistics buffer.
_S_CHANGED, _S_REALISED, _S_INTENDED, _S_NONFINITE, _S_MISMATCH = range(5)
_NUM_STATS = 5


@dataclass
class PerturbStats:
    """How much of the intended perturbation reached the weights the forward pass uses."""

    numel: int  # elements considered
    changed: int  # elements whose forward-visible weight (the param tensor) changed
    intended_sq: float  # sum (eta*d)^2 over finite eta*d (e in fp32, squared and summed in fp64)
    realised_sq: float  # sum (param_after - param_before)^2, differences and sums in fp64 (exact)
    nonfinite: int = 0  # elements whose eta*d was not finite (left unperturbed)
    # What the torch path learnt per tensor (case A): the rows it worked on (None: all) and whether every
    # weight it worked on was finite. RestorePlan(hints=...) then skips finding them again; None elsewhere.
    restore_hints: Optional[list] = field(default=None, repr=False, compare=False)

    @property
    def frac_changed(self) -> float:
        return self.changed / self.numel if self.numel else 0.0

    @property
    def ratio(self) -> float:
        """Realised over intended perturbation norm; 0 when nothing was intended."""
        return math.sqrt(self.realised_sq / self.intended_sq) if self.intended_sq > 0 else 0.0


# ----------------------------------------------------------------------------------------------
# Reference (pure torch): the CPU path and the tests' oracle. Same op sequence as the kernels.
# ----------------------------------------------------------------------------------------------
def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_BITS_VIEW[t.dtype])


def _direction_reference(grad, v, eps, bias_correction2):
    """d in fp32. torch's CPU fp32 sqrt is not correctly rounded (1 ulp off on ~20% of inputs,
    measured with torch 2.13), so it is taken in fp64 and rounded once: for sqrt, fp64 is wide
    enough that this equals the IEEE fp32 result, which is what tl.sqrt_rn computes."""
    g = grad.float()
    if v is None:
        return g
    scaled = v / bias_correction2  # fp32 / fp32(scalar): IEEE, like tl.div_rn
    return g / (torch.maximum(scaled.double().sqrt().float(), g.abs()) + eps)


def perturb_reference_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    eta: float,
    *,
    masters: Optional[Sequence[torch.Tensor]] = None,
    exp_avg_sq: Optional[Sequence[Optional[torch.Tensor]]] = None,
    eps: float = 1e-8,
    bias_correction2: float = 1.0,
) -> PerturbStats:
    """perturb_ in plain torch (one tensor at a time). See the module docstring for the math."""
    _check_perturb_args(params, grads, eta, masters, exp_avg_sq, eps, bias_correction2)
    eta32 = torch.tensor(eta, dtype=torch.float32)
    numel = changed = nonfinite = 0
    intended_sq = realised_sq = 0.0
    mismatches = []  # (tensor index, count)
    hints = [] if masters is None else None
    with torch.no_grad():
        for i, (param, grad) in enumerate(zip(params, grads)):
            if param.numel() == 0:
                if hints is not None:
                    hints.append((None, True))
                continue
            v = exp_avg_sq[i] if exp_avg_sq is not None else None
            numel += param.numel()
            rows = _sparse_rows(grad) if masters is None else None
            if rows is not None:
                # Row-sparse J gradient (an embedding: only the tokens of the meta batch have one). A
                # +0 gradient element has e = +0, so it is never perturbed and its stored step is +0:
                # work on the other rows only; the skipped rows' buffer already holds those +0s.
                p2, g2 = param.view(param.shape[0], -1), grad.view(grad.shape[0], -1)
                v2 = v.view(v.shape[0], -1).index_select(0, rows) if v is not None else None
                p_sub, g_sub = p2.index_select(0, rows), g2.index_select(0, rows)
                c, nf, isq, rsq, finite = _perturb_block_(p_sub, g_sub, v2, None, eta32, eps, bias_correction2, i, mismatches)
                p2.index_copy_(0, rows, p_sub)
                g2.index_copy_(0, rows, g_sub)  # the other rows are all +0 already: the stored step
            else:
                w = masters[i] if masters is not None else None
                c, nf, isq, rsq, finite = _perturb_block_(param, grad, v, w, eta32, eps, bias_correction2, i, mismatches)
            if hints is not None:
                hints.append((rows, finite))
            changed += c
            nonfinite += nf
            intended_sq += isq
            realised_sq += rsq
    stats = PerturbStats(numel, changed, intended_sq, realised_sq, nonfinite, restore_hints=hints)
    if mismatches:
        _raise_mismatch(mismatches)
    return stats


# Below this many elements, or above this fraction of non-zero rows, the row-sparse path saves nothing.
_SPARSE_MIN_NUMEL = 1 << 16
_SPARSE_MAX_FRACTION = 0.5


def _sparse_rows(t: torch.Tensor) -> Optional[torch.Tensor]:
    """Indices of the rows of an embedding-shaped tensor holding a non-+0 bit pattern, when few rows do."""
    if t.dim() < 2 or t.numel() < _SPARSE_MIN_NUMEL or t.shape[0] < 4 * (t.numel() // t.shape[0]):
        # Only vocabulary-shaped tensors (rows >= 4x columns: embeddings) are worth the extra sweep
        # that finds the rows; a dense weight's gradient has no zero rows.
        return None
    # On the bytes: a row is skipped only if every element is +0 (all bits clear), so the skipped
    # rows already hold what perturb_ would write there and need no pass at all; -0.0 and NaN rows are
    # kept. The max over unsigned bytes is one pass without temporaries: 4x faster than abs().amax().
    nz = t.view(torch.uint8).view(t.shape[0], -1).amax(dim=1).ne(0)
    n = int(nz.sum())
    if n > _SPARSE_MAX_FRACTION * t.shape[0]:
        return None
    return nz.nonzero().squeeze(1)


def _perturb_block_(param, grad, v, w, eta32, eps, bias_correction2, i, mismatches):
    """The per-element rule of the module docstring on one tensor (or a block of its rows), in place.

    Returns (changed, nonfinite, intended_sq, realised_sq, every weight finite). Written for few passes over memory (this
    is the CPU training path, where each pass costs about as much as the arithmetic): masks are
    combined in place and on integer bit patterns, the fp64 statistics are dot products, and the
    general (slower) form of a step runs only when a sum comes out non-finite."""
    p = param.float()
    e = _direction_reference(grad, v, eps, bias_correction2) * eta32.to(param.device)
    if w is None:
        s = (p + e).to(param.dtype).float()
        z = (s - p).to(grad.dtype)
        z32 = z.float()
        new = (p + z32).to(param.dtype)
        back = (new.float() - z32).to(param.dtype)
        # The docstring's mask, ok = z != 0 & isfinite(new) & new != p & bits(back) == bits(p), as two
        # integer compares: bits(back) == bits(p) & bits(new) != bits(p). The same elements, for any
        # p but NaN:
        # - z = +-0: new has p's bits, except p = -0, z = +0, where back = +0 does not have p's bits;
        # - new not finite (from a non-finite z, or an overflow): back is then inf or NaN, never the
        #   bits of a finite p; an infinite p gives new = p (z finite) or a NaN back (z not finite);
        # - bits that differ are floats that differ, except +0 / -0, which the first case covers.
        # A NaN p is excluded too when NaN arithmetic passes the payload on (IEEE's recommendation,
        # what x86 and ARM do): new then has p's bits, or back == new for a signalling p. Not relying
        # on it: a NaN weight makes the realised sum below NaN, and the mask is then redone with isnan.
        ok = _bits(back) == _bits(param)
        ok &= _bits(new) != _bits(param)
    else:
        mismatch = (_bits(w.to(param.dtype)) != _bits(param)) & ~(torch.isnan(w) & torch.isnan(p))
        n_mismatch = int(mismatch.sum())
        if n_mismatch:
            mismatches.append((i, n_mismatch))
        new = (w + e).to(param.dtype)
        ok = torch.isfinite(e)
        ok &= torch.isfinite(new)
        ok &= new.float() != p
        ok &= ~mismatch
    # fp64, as in the kernel: squares that cannot overflow or underflow. A finite fp64 sum means
    # every step was finite (an fp32 value squared stays far inside fp64's range).
    e64 = e.double().view(-1)
    isq = sum_of_squares_(e64)
    nonfinite = 0
    if not math.isfinite(isq):
        e_finite = torch.isfinite(e)
        nonfinite = int((~e_finite).sum())
        isq = sum_of_squares_(torch.where(e_finite, e, 0.0).double().view(-1))
    if w is None and param.dtype == grad.dtype == torch.float32 and math.isfinite(float(_ordered_sum(param.view(-1)))):
        # fp32 weights and steps, every weight finite (a finite sum has no inf or NaN term): the
        # realised step of a moved weight is z itself, new - p == z exactly, so realised_sq is the
        # sum of the stored steps squared -- the same fp64 vector as (after - p), the same sum -- and
        # the weights are written in place, with no copy of them. Proof: if s is within [p/2, 2p],
        # s - p is exact (Sterbenz), so z = s - p and p + z = s. Otherwise |z| >= |p|/2. If z has the
        # opposite sign and |z| <= 2|p|, p + z is exact (Sterbenz again). Else |z| > |p| (|z| < |p|
        # with z of p's sign would need s in (p, 2p)), so p + z and its rounding error r are multiples
        # of p's ulp; r != 0 would make p + r, and so back = round(new - z) = round(p + r), differ
        # from p, and ok is false. With subnormals this holds unchanged (gradual underflow).
        # tests/kernels/test_perturb.py checks it on random bit patterns.
        torch.where(ok, new, param, out=param)
        torch.where(ok, z, torch.zeros((), dtype=z.dtype, device=z.device), out=grad)
        return int(ok.sum()), nonfinite, isq, sum_of_squares_(grad.double().view(-1)), True
    after = torch.where(ok, new, param)
    delta = after.double().view(-1)
    # exact in fp64: new - p where changed, p - p = 0 elsewhere (for a finite p). Both operands fp64:
    # torch's in-place fp64 -= fp32 takes a scalar casting loop, 20x slower than a copy and a subtract.
    delta -= p.double().view(-1)
    rsq = sum_of_squares_(delta)
    # Finite: p - p is 0 for every finite weight, and the squares of fp32 differences cannot overflow fp64.
    finite = math.isfinite(rsq)
    if not finite:
        # A non-finite weight: p - p is NaN there, and a NaN weight may have passed case A's mask.
        ok &= ~torch.isnan(param)
        after = torch.where(ok, new, param)
        delta = new.double()
        delta -= p.double()
        delta.masked_fill_(~ok, 0.0)
        rsq = sum_of_squares_(delta.view(-1))
    param.copy_(after)
    if w is None:
        torch.where(ok, z, torch.zeros((), dtype=z.dtype, device=z.device), out=grad)
    return int(ok.sum()), nonfinite, isq, rsq, finite


_ROW = 4096  # width of the rows a long sum is split into
_SERIAL = 16384  # torch sums fewer elements than its grain size (32768) on one thread


def sum_of_squares_(x: torch.Tensor) -> float:
    """sum(x * x) of a 1-D fp64 temporary, squared in place, by a sum whose bits do not depend on the
    number of threads.

    torch.dot (BLAS) and a full ``.sum()`` split a long sum among the threads, so its rounding changes
    with the thread count (measured: 1 and 2 threads give different bits from 40k elements on). A
    sum along the rows of a 2-D view is computed row by row, each row on one thread, and a sum of
    fewer than the grain size is serial; so the rows' sums, then the sum of those, are the same on
    any number of threads."""
    x.square_()
    return float(_ordered_sum(x))


def _ordered_sum(x: torch.Tensor) -> torch.Tensor:
    n = x.numel()
    if n <= _SERIAL:
        return x.sum()
    k = n // _ROW
    head = _ordered_sum(x[: k * _ROW].view(k, _ROW).sum(dim=1))
    return head + x[k * _ROW :].sum()


def restore_reference_(
    params: Sequence[torch.Tensor],
    deltas: Optional[Sequence[torch.Tensor]],
    *,
    masters: Optional[Sequence[torch.Tensor]] = None,
) -> None:
    """restore_ in plain torch: undo perturb_ bit for bit."""
    _check_restore_args(params, deltas, masters)
    if masters is None:  # case A: the same restore as the hooks' (rows, finiteness, subnormal mode)
        plan = RestorePlan(params, deltas, impl="torch")
        for i in range(len(params)):
            plan.restore(i)
        return
    with torch.no_grad():
        for param, master in zip(params, masters):
            if param.numel():
                param.copy_(master.to(param.dtype))


def _restore_block_(param, z, plain_sub: bool) -> None:
    """p <- (z != 0) ? round(p - z) : p, in place.

    perturb_ stores +0 for every weight it left alone, and p - (+0) is p bit for bit for every p but
    a NaN (whose payload the arithmetic may change: torch's bf16 rounding makes every NaN canonical)
    or, with subnormal inputs flushed to zero (torch.set_flush_denormal(True)), a subnormal. So when
    neither can occur, one subtraction over the tensor is the restore: 2 passes over memory instead
    of the 5 of the masked form, the cost that matters inside the backward pass. (A -0.0 in z would
    also differ from the masked form, for p = -0.0; perturb_ never stores one: see its mask.)"""
    if plain_sub and not torch.isnan(_ordered_sum(param.view(-1))):  # NaN: a NaN weight, or both infinities
        param.sub_(z)
        return
    z = z.float()
    back = (param.float() - z).to(param.dtype)
    torch.where(z != 0, back, param, out=param)


def _subnormals_kept(params) -> bool:
    """False when this CPU flushes subnormal inputs to zero (torch.set_flush_denormal(True))."""
    if not params or params[0].device.type != "cpu":
        return False
    tiny = torch.ones(16, dtype=torch.int32).view(torch.float32)  # 1.4e-45 from its bits: no conversion
    return torch.equal(_bits(tiny - 0.0), _bits(tiny))


def _raise_mismatch(mismatches):
    i, count = mismatches[0]
    more = f" (and {len(mismatches) - 1} more tensors)" if len(mismatches) > 1 else ""
    raise RuntimeError(
        f"perturb_: params[{i}] is not the rounding of masters[{i}] at {count} elements{more}, so "
        "restoring by re-casting the master would not give the current weights back. Those "
        "elements were left unperturbed; the others were perturbed. Re-cast the compute copy from "
        "the masters (restore_(params, None, masters=masters)) or check that the optimizer writes "
        "the compute copy from the masters after every step."
    )


# ----------------------------------------------------------------------------------------------
# Triton kernels
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
    tensor = tl.load(CHUNK_TENSOR_ptr + pid).to(tl.int64)
    chunk_start = tl.load(CHUNK_START_ptr + pid)
    numel = tl.load(NUMEL_ptr + tensor)
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
    pid = tl.program_id(0).to(tl.int64)
    tensor = tl.load(CHUNK_TENSOR_ptr + pid).to(tl.int64)
    chunk_start = tl.load(CHUNK_START_ptr + pid)
    numel = tl.load(NUMEL_ptr + tensor)
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
# Host side: checks, tables, launches
# ----------------------------------------------------------------------------------------------
def _check_list(name, tensors, n, op):
    if not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{op}: {name} must be a list of tensors, got {type(tensors).__name__}")
    if len(tensors) != n:
        raise ValueError(f"{op}: {name} has {len(tensors)} entries but params has {n}")


def _check_like(op, name, i, t, param, dtypes):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name}[{i}] must be a tensor, got {type(t).__name__}")
    if t.shape != param.shape:
        raise ValueError(f"{op}: {name}[{i}] has shape {tuple(t.shape)} but params[{i}] has {tuple(param.shape)}")
    if t.device != param.device:
        raise ValueError(f"{op}: {name}[{i}] is on {t.device} but params[{i}] is on {param.device}")
    if t.dtype not in dtypes:
        raise ValueError(f"{op}: {name}[{i}] has dtype {t.dtype}; supported: {dtypes}")
    if not t.is_contiguous():
        raise ValueError(
            f"{op}: {name}[{i}] is not contiguous; the kernels walk memory linearly and write in "
            "place, so a copy would not be updated. Pass the contiguous tensors the model holds."
        )


def _check_params(op, params):
    if not isinstance(params, (list, tuple)):
        raise TypeError(f"{op}: params must be a list of tensors, got {type(params).__name__}")
    seen = {}
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{op}: params[{i}] must be a tensor, got {type(p).__name__}")
        if p.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{op}: params[{i}] has dtype {p.dtype}; supported: {SUPPORTED_DTYPES}")
        if not p.is_contiguous():
            raise ValueError(f"{op}: params[{i}] is not contiguous; in-place updates need contiguous weights")
        if p.numel() and (p.device, p.data_ptr()) in seen:
            raise ValueError(
                f"{op}: params[{i}] shares memory with params[{seen[(p.device, p.data_ptr())]}]; pass "
                "each weight once (a weight perturbed twice could not be restored exactly)"
            )
        seen[(p.device, p.data_ptr())] = i
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(f"{op}: params are on several devices {sorted(map(str, devices))}; call once per device")


def _check_perturb_args(params, grads, eta, masters, exp_avg_sq, eps, bias_correction2):
    op = "perturb_"
    _check_params(op, params)
    n = len(params)
    _check_list("grads", grads, n, op)
    if masters is not None:
        _check_list("masters", masters, n, op)
    if exp_avg_sq is not None:
        _check_list("exp_avg_sq", exp_avg_sq, n, op)
    for i, param in enumerate(params):
        _check_like(op, "grads", i, grads[i], param, SUPPORTED_DTYPES)
        if param.numel() and grads[i].data_ptr() == param.data_ptr():
            raise ValueError(f"{op}: grads[{i}] is the same memory as params[{i}]")
        if masters is not None:
            _check_like(op, "masters", i, masters[i], param, (torch.float32,))
        if exp_avg_sq is not None and exp_avg_sq[i] is not None:
            _check_like(op, "exp_avg_sq", i, exp_avg_sq[i], param, (torch.float32,))
    for name, value in (("eta", eta), ("eps", eps), ("bias_correction2", bias_correction2)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{op}: {name} must be a float, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"{op}: {name} must be finite, got {value}")
    if eps < 0:
        raise ValueError(f"{op}: eps must be >= 0, got {eps}")
    if bias_correction2 <= 0:
        raise ValueError(f"{op}: bias_correction2 must be > 0, got {bias_correction2}")


def _check_restore_args(params, deltas, masters):
    op = "restore_"
    _check_params(op, params)
    n = len(params)
    if masters is not None:
        _check_list("masters", masters, n, op)
        for i, param in enumerate(params):
            _check_like(op, "masters", i, masters[i], param, (torch.float32,))
        return
    if deltas is None:
        raise ValueError(f"{op}: without masters, deltas (the grads buffers perturb_ wrote) are required")
    _check_list("deltas", deltas, n, op)
    for i, param in enumerate(params):
        _check_like(op, "deltas", i, deltas[i], param, SUPPORTED_DTYPES)


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


# ----------------------------------------------------------------------------------------------
# Public ops. No autograd.Function: these are in-place updates under no_grad, not differentiable.
# ----------------------------------------------------------------------------------------------
def _all_tensors(*lists):
    for lst in lists:
        if isinstance(lst, (list, tuple)):
            yield from (t for t in lst if isinstance(t, torch.Tensor))


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
) -> PerturbStats:
    """theta <- theta + eta * d in place, restorable bit for bit by :func:`restore_`.

    Without ``masters`` (case A) the grads buffers are overwritten with exactly what was added
    (0 where nothing was); keep them for restore_. With ``masters`` (case B) only the compute copy
    ``params`` is written. Returns how much of the step reached the weights (PerturbStats).
    """
    path = resolve_impl("perturb_", impl, _all_tensors(params, grads, masters, exp_avg_sq), kernel=_perturb_kernel)
    kwargs = dict(masters=masters, exp_avg_sq=exp_avg_sq, eps=eps, bias_correction2=bias_correction2)
    if path == "torch":
        return perturb_reference_(params, grads, eta, **kwargs)
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
    torch path relies on; see ``_restore_block_``)."""
    path = resolve_impl("restore_", impl, _all_tensors(params, deltas, masters), kernel=_restore_kernel)
    if path == "torch":
        restore_reference_(params, deltas, masters=masters)
    else:
        restore_triton_(params, deltas, masters=masters)


class RestorePlan:
    """:func:`restore_` of case A (no masters) one tensor at a time, with the per-call work done once.

    Made for restoring inside backward hooks: each hook restores one tensor, at a moment when the
    caches hold the backward's activations and every torch op costs 2-4x what it costs in a loop
    (measured on the CPU path: a 256-element restore_ took 96 us in a hook, 37 us outside). So what
    restore_ works out per call -- the argument checks, the path, whether this CPU flushes
    subnormals, the rows of a row-sparse delta, whether a weight is not finite -- is worked out here,
    once for all tensors, and ``restore(i)`` then runs only the restore itself: on the torch path a
    single ``p -= z`` for a dense tensor whose weights are all finite. The result is restore_'s, bit
    for bit. The plan holds for the deltas as perturb_ left them and the params as perturb_ left them
    (the forward pass reads them, nothing writes them); restore each tensor once.
    """

    def __init__(self, params: list[torch.Tensor], deltas: list[torch.Tensor], *, impl: str = "auto",
                 hints: Optional[list] = None):
        """``hints``: ``PerturbStats.restore_hints`` from the perturb_ of these very tensors (torch path),
        which found the rows and the finiteness already; without them the plan finds them itself."""
        _check_restore_args(params, deltas, None)
        self.params, self.deltas = list(params), list(deltas)
        self.path = resolve_impl("restore_", impl, _all_tensors(self.params, self.deltas), kernel=_restore_kernel)
        self._rows: list[Optional[torch.Tensor]] = [None] * len(self.params)
        self._plain = [False] * len(self.params)
        if self.path != "torch":
            return
        if hints is not None and len(hints) != len(self.params):
            raise ValueError(f"RestorePlan: {len(hints)} hints for {len(self.params)} params")
        with torch.no_grad():
            kept = _subnormals_kept(self.params)
            if hints is not None:
                for i, (rows, finite) in enumerate(hints):
                    self._rows[i] = rows
                    self._plain[i] = kept and finite
                return
            dense = []
            for i, (p, z) in enumerate(zip(self.params, self.deltas)):
                if p.numel():
                    self._rows[i] = _sparse_rows(z)
                    if self._rows[i] is None:  # else only the rows perturb_ moved (see perturb_reference_)
                        dense.append(i)
                    else:
                        self._plain[i] = kept  # the NaN check is made on the rows, in _restore_block_
            if kept and dense:
                # One call for all dense tensors. A norm that is not finite means a NaN or infinite weight
                # (or, conservatively, an overflow of the norm): that tensor takes the masked form.
                norms = torch._foreach_norm([self.params[i] for i in dense])
                finite = torch.isfinite(torch.stack([n.float() for n in norms])).tolist()
                for i, ok in zip(dense, finite):
                    self._plain[i] = ok

    def restore(self, i: int) -> None:
        """Restore params[i] from deltas[i], as restore_([params[i]], [deltas[i]]) would."""
        p, z = self.params[i], self.deltas[i]
        if p.numel() == 0:
            return
        if self.path != "torch":
            restore_triton_([p], [z])
            return
        with torch.no_grad():
            rows = self._rows[i]
            if rows is None:
                if self._plain[i]:
                    p.sub_(z)  # exact: no weight NaN, subnormals kept, z = +0 where unperturbed
                else:
                    _restore_block_(p, z, False)
                return
            p2 = p.view(p.shape[0], -1)
            p_sub = p2.index_select(0, rows)
            _restore_block_(p_sub, z.view(p.shape[0], -1).index_select(0, rows), self._plain[i])
            p2.index_copy_(0, rows, p_sub)
