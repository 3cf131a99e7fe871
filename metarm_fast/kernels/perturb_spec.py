r"""In-place perturbation of the weights for the MetaRM meta step, and its bit-exact restore.

The meta step (Dou et al., AAAI 2025, Algorithm 1, steps 3-5) evaluates the preference loss at
theta' = theta + eta * grad J and must then give back theta exactly, without a full copy of the
weights (a 7B model's fp32 copy is 27 GB, which does not fit beside the rest on an A100-80G).

Direction and intended step, per element, in fp32:

    d = g                                            (plain: the J gradient)
    d = g / (max(sqrt(v / bias_correction2), |g|) + eps)
                                                     (preconditioned by the optimizer's second
                                                      moment v, fp32, same shape)
The floor |g| (taken after the sqrt, so g*g cannot overflow) keeps |d| <= 1: where v is ~0 (a
weight the preference data has not moved yet, but that J does move) a plain g / (sqrt(v) + eps)
would be g / 1e-8, a step no one asked for. With the floor such an element moves by at most eta,
like the sign step Adam itself would take there.
    e = eta * d

Every fp32 operation is IEEE round-to-nearest on both paths (tl.sqrt_rn / tl.div_rn in Triton,
FMA contraction switched off), so the torch path and the kernel agree bit for bit.

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

    check: bits(p) == bits(round(w))  or both are NaN
           (else restoring by re-casting w would not give p back; NaN payloads are not compared)
    new = round(w + e);  ok = isfinite(e) and isfinite(new) and new != p and the check passed
    p <- ok ? new : p                # the grads are not modified, w is not modified
    restore:  p <- round(w)

Elements failing the check are left alone and counted; the host then raises naming the tensor.

Statistics (both cases, over all elements): numel; changed = count(ok), i.e. elements whose
forward-visible weight changed; realised_sq = sum (p_after - p_before)^2 (differences taken in
fp64, where they are exact); intended_sq = sum e^2 over finite e (fp64); nonfinite = count(e not
finite). With weights ~N(0, 0.02^2), grads ~N(0, 0.01^2) and eta = 5e-6, case A changes ~0.06%
of bf16 weights and ~99% of fp32 weights (tests/kernel_tests/test_perturb.py measures both): the stats
are how a trainer notices a vanished step.

Limits. NaN: a NaN weight is never perturbed and keeps its bits in case A; in case B a NaN master
restores to a NaN whose payload may differ between the torch and Triton paths (torch's own
fp32 -> bf16 cast gives different NaN bits on its scalar and vectorised paths). Agreement of the
two paths on a GPU rests on IEEE fp32 on both sides (sqrt_rn, div_rn, no FMA contraction); the
tests check it under the interpreter and check the compiled PTX for those properties, but no GPU
run has been made here.

This module holds the rule itself: the statistics' type and the argument checks every path runs.
The paths are ``perturb_torch`` (what CPU training runs) and ``perturb_triton`` (the kernels);
``perturb`` chooses between them, and ``perturbation`` holds what a call hands back. The tests
hold both paths to an oracle, the rule above transcribed line by line with no fast path
(tests/kernel_tests/perturb_oracle.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Optional

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # constexpr codes in the kernels
_BITS_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


@dataclass
class PerturbStats:
    """How much of the intended perturbation reached the weights the forward pass uses.

    The counts and sums come from the perturbation pass itself; the two times are the caller's to
    fill in (the meta step times its whole perturbation and restore) and do not take part in ==.
    Stats add up (``a + b``, ``sum(parts, PerturbStats())``): the stats of several calls over
    disjoint tensors are those of one call over all of them."""

    numel: int = 0  # elements considered
    changed: int = 0  # elements whose forward-visible weight (the param tensor) changed
    intended_sq: float = 0.0  # sum (eta*d)^2 over finite eta*d (e in fp32, squared and summed in fp64)
    realised_sq: float = 0.0  # sum (param_after - param_before)^2, differences and sums in fp64 (exact)
    nonfinite: int = 0  # elements whose eta*d was not finite (left unperturbed)
    perturb_s: float = field(default=0.0, compare=False)  # host time of the perturbation
    restore_s: float = field(default=0.0, compare=False)  # host time of the restore
    # The largest per-weight move max |eta*d| (fp32), when the caller measured it (the meta step
    # does on its diagnostic steps; the kernels do not); None: not measured.
    max_move: Optional[float] = field(default=None, compare=False)

    @property
    def frac_changed(self) -> float:
        return self.changed / self.numel if self.numel else 0.0

    @property
    def ratio(self) -> float:
        """Realised over intended perturbation norm; 0 when nothing was intended."""
        return math.sqrt(self.realised_sq / self.intended_sq) if self.intended_sq > 0 else 0.0

    @property
    def vanished(self) -> bool:
        """The perturbation was (almost) entirely lost to rounding in the weights the forward pass uses."""
        return self.intended_sq > 0 and (self.changed == 0 or self.ratio < 0.1)

    @property
    def rounding_dominated(self) -> bool:
        """Most of the realised perturbation is rounding: the weights the forward pass uses moved by
        more than twice the intended norm. A bf16 compute copy re-cast from fp32 masters does this
        when eta * d is far below a bf16 spacing: a few weights move by a whole spacing each."""
        return self.intended_sq > 0 and self.ratio > 2.0

    def __add__(self, other: "PerturbStats") -> "PerturbStats":
        if not isinstance(other, PerturbStats):
            return NotImplemented
        moves = [m for m in (self.max_move, other.max_move) if m is not None]
        return PerturbStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self) if f.name != "max_move"),
                            max_move=max(moves) if moves else None)


# ----------------------------------------------------------------------------------------------
# Argument checks, shared by every path (the same call fails the same way whatever runs it)
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


def _raise_mismatch(mismatches):
    """Case B's refusal, raised after the other elements were perturbed. ``mismatches``: (tensor index, count)."""
    i, count = mismatches[0]
    more = f" (and {len(mismatches) - 1} more tensors)" if len(mismatches) > 1 else ""
    raise RuntimeError(
        f"perturb_: params[{i}] is not the rounding of masters[{i}] at {count} elements{more}, so "
        "restoring by re-casting the master would not give the current weights back. Those "
        "elements were left unperturbed; the others were perturbed. Re-cast the compute copy from "
        "the masters (restore_(params, None, masters=masters)) or check that the optimizer writes "
        "the compute copy from the masters after every step."
    )


def _all_tensors(*lists):
    """The tensors in these argument lists (None entries and non-lists skipped), for the dispatch."""
    for lst in lists:
        if isinstance(lst, (list, tuple)):
            yield from (t for t in lst if isinstance(t, torch.Tensor))
