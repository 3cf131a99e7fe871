"""The pure-torch path of perturb_ / restore_ (the rule is in ``perturb_spec``): what CPU training runs.

The same op sequence as the kernels, so the two agree bit for bit, but written for few passes over
memory, since on the CPU each pass costs about as much as the arithmetic: an embedding's row-sparse
J gradient is worked on row by row, fp32 weights are written in place when that is provably the
same, and a restore is a single subtraction where no weight can make that differ from the masked
form. The restore is ``TorchRestorePlan``: ``_restore_layout`` works out once what each tensor's
restore needs (or takes it from the perturbation, which found it while perturbing), and
``_restore_one_`` restores one tensor.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .perturb_spec import _BITS_VIEW, PerturbStats, _check_perturb_args, _raise_mismatch
from .perturbation import Perturbation, RestorePlan


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_BITS_VIEW[t.dtype])


def perturb_direction(grad, v, eps: float = 1e-8, bias_correction2: float = 1.0):
    """d of perturb_spec for one tensor, in fp32 (``v`` None: the plain direction, d = grad).

    torch's CPU fp32 sqrt is not correctly rounded (1 ulp off on ~20% of inputs, measured with
    torch 2.13), so it is taken in fp64 and rounded once: for sqrt, fp64 is wide enough that this
    equals the IEEE fp32 result, which is what tl.sqrt_rn computes."""
    g = grad.float()
    if v is None:
        return g
    scaled = v / bias_correction2  # fp32 / fp32(scalar): IEEE, like tl.div_rn
    return g / (torch.maximum(scaled.double().sqrt().float(), g.abs()) + eps)


def perturb_torch_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    eta: float,
    *,
    masters: Optional[Sequence[torch.Tensor]] = None,
    exp_avg_sq: Optional[Sequence[Optional[torch.Tensor]]] = None,
    eps: float = 1e-8,
    bias_correction2: float = 1.0,
) -> Perturbation:
    """perturb_ in plain torch (one tensor at a time). The math is in perturb_spec's docstring.

    In case A the perturbation keeps, per tensor, the rows it worked on (None: all) and whether
    every weight it worked on was finite: its restore then need not find them again."""
    _check_perturb_args(params, grads, eta, masters, exp_avg_sq, eps, bias_correction2)
    eta32 = torch.tensor(eta, dtype=torch.float32)
    numel = changed = nonfinite = 0
    intended_sq = realised_sq = 0.0
    mismatches = []  # (tensor index, count)
    layout = [] if masters is None else None
    with torch.no_grad():
        for i, (param, grad) in enumerate(zip(params, grads)):
            if param.numel() == 0:
                if layout is not None:
                    layout.append((None, True))
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
            if layout is not None:
                layout.append((rows, finite))
            changed += c
            nonfinite += nf
            intended_sq += isq
            realised_sq += rsq
    stats = PerturbStats(numel, changed, intended_sq, realised_sq, nonfinite)
    if mismatches:
        _raise_mismatch(mismatches)
    return Perturbation(stats, params, grads if masters is None else None, masters,
                        plan_type=TorchRestorePlan, layout=layout)


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
    """The per-element rule of perturb_spec on one tensor (or a block of its rows), in place.

    Returns (changed, nonfinite, intended_sq, realised_sq, every weight finite). Written for few passes over memory (this
    is the CPU training path, where each pass costs about as much as the arithmetic): masks are
    combined in place and on integer bit patterns, the fp64 statistics are dot products, and the
    general (slower) form of a step runs only when a sum comes out non-finite."""
    p = param.float()
    e = perturb_direction(grad, v, eps, bias_correction2) * eta32.to(param.device)
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
        # tests/kernel_tests/test_perturb.py checks it on random bit patterns.
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



def restore_torch_(
    params: Sequence[torch.Tensor],
    deltas: Optional[Sequence[torch.Tensor]],
    *,
    masters: Optional[Sequence[torch.Tensor]] = None,
) -> None:
    """restore_ in plain torch: undo perturb_ bit for bit."""
    TorchRestorePlan(params, deltas, masters).restore_all()


class TorchRestorePlan(RestorePlan):
    """The torch path's RestorePlan: what each tensor's restore needs is worked out here, once.

    Made for restoring inside backward hooks: each hook restores one tensor, at a moment when the
    caches hold the backward's activations and every torch op costs 2-4x what it costs in a loop
    (measured on this path: a 256-element restore_ took 96 us in a hook, 37 us outside). So the
    argument checks, whether this CPU flushes subnormals, the rows of a row-sparse delta and whether
    a weight is not finite are found once for all tensors (the last two handed over by
    perturb_torch_ through ``layout``, when the plan comes from its perturbation), and
    ``restore(i)`` then runs only the restore itself: a single ``p -= z`` for a dense tensor whose
    weights are all finite. The result is the masked form's, bit for bit.
    """

    def __init__(self, params, deltas, masters=None, *, layout: Optional[list] = None):
        super().__init__(params, deltas, masters)
        if self.masters is None:
            self._rows, self._plain = _restore_layout(self.params, self.deltas, layout)

    def restore(self, i: int) -> None:
        p = self.params[i]
        if self.masters is None:
            _restore_one_(p, self.deltas[i], self._rows[i], self._plain[i])
        elif p.numel():
            with torch.no_grad():
                p.copy_(self.masters[i].to(p.dtype))


def _restore_layout(params, deltas, layout: Optional[list] = None):
    """What restoring each tensor of case A needs, found once for all: (rows, plain), one entry each.

    rows[i]: the rows of a row-sparse delta (None: the whole tensor); plain[i]: whether a single
    ``p -= z`` restores it (subnormals kept by this CPU and every weight finite). ``layout``: the
    (rows, every weight finite) per tensor that perturb_torch_ found while perturbing these very
    tensors; without it they are found here."""
    rows: list[Optional[torch.Tensor]] = [None] * len(params)
    plain = [False] * len(params)
    with torch.no_grad():
        kept = _subnormals_kept(params)
        if layout is not None:
            if len(layout) != len(params):
                raise ValueError(f"restore_: a layout of {len(layout)} entries for {len(params)} params")
            for i, (found_rows, finite) in enumerate(layout):
                rows[i] = found_rows
                plain[i] = kept and finite
            return rows, plain
        dense = []
        for i, (p, z) in enumerate(zip(params, deltas)):
            if p.numel():
                rows[i] = _sparse_rows(z)
                if rows[i] is None:  # else only the rows perturb_ moved (see perturb_torch_)
                    dense.append(i)
                else:
                    plain[i] = kept  # the NaN check is made on the rows, in _restore_block_
        if kept and dense:
            # One call for all dense tensors. A norm that is not finite means a NaN or infinite weight
            # (or, conservatively, an overflow of the norm): that tensor takes the masked form.
            norms = torch._foreach_norm([params[i] for i in dense])
            finite = torch.isfinite(torch.stack([n.float() for n in norms])).tolist()
            for i, ok in zip(dense, finite):
                plain[i] = ok
    return rows, plain


def _restore_one_(p: torch.Tensor, z: torch.Tensor, rows: Optional[torch.Tensor], plain: bool) -> None:
    """Restore one tensor from its delta, given its entries of ``_restore_layout``."""
    if p.numel() == 0:
        return
    with torch.no_grad():
        if rows is None:
            if plain:
                p.sub_(z)  # exact: no weight NaN, subnormals kept, z = +0 where unperturbed
            else:
                _restore_block_(p, z, False)
            return
        p2 = p.view(p.shape[0], -1)
        p_sub = p2.index_select(0, rows)
        _restore_block_(p_sub, z.view(p.shape[0], -1).index_select(0, rows), plain)
        p2.index_copy_(0, rows, p_sub)


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
