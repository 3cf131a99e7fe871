"""The MetaRM meta step (Algorithm 1 of Dou et al.), with an in-place perturbation and no weight copy.

    1. J = difference loss on the meta batch at theta; backward -> grad J in the grad buffers.
    2. theta' = theta + eta * d, d = grad J (or grad J / (sqrt(v) + eps) with AdamW's own v), in place.
    3. L = Bradley-Terry loss on the preference batch at theta'; backward -> grad L(theta').
    4. theta restored bit for bit; the optimizer then steps with grad L(theta') (the caller does it).

Where the exact restore information lives, so that no copy of the weights is ever made:
- fp32 master weights with a bf16 compute copy: the masters are the backup. Only the compute copy is
  perturbed (from the masters) and the restore re-casts the masters.
- no master (fp32, or pure bf16): `perturb_` turns the J gradient buffer into exactly what was added to
  each weight, z, chosen so that `p' - z` gives back p's bits. During the L backward, a hook on each
  parameter fires when its gradient arrives -- the moment no later backward node needs p' -- restores
  p from z, zeroes the buffer and lets the new gradient accumulate into it. So z and grad L share one
  buffer, and the step needs no memory beyond a vanilla step's (weights, grads, states, activations).
  With gradient accumulation the hook cannot be used (later micro-batches still need theta'), and z
  is moved to a side buffer the size of the gradients; this costs one gradient of memory.

Anything that fails between step 2 and the end of the restore (an exception, a non-finite loss)
restores the weights before it propagates: the model is never left perturbed.

Optional exact second-order term (sgd direction): the true meta-gradient is
(I + eta * H_J) grad L(theta'). `second_order_correction_` adds eta * H_J grad L(theta') with one
more forward of J at theta and a double backward (a Hessian-vector product).
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from metarm_fast.kernels import RestorePlan, perturb_, restore_


@dataclass
class MetaState:
    """What the perturbation needs to know about the weights (see module docstring)."""

    params: list[torch.Tensor]  # the weights the forward pass uses, in order
    masters: list[torch.Tensor] | None  # fp32 masters of a low-precision compute copy, or None


def _grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


def adam_second_moments(optimizer: torch.optim.Optimizer, opt_params: list[torch.Tensor]):
    """AdamW's v for each parameter (None where there is no state yet) and its bias correction."""
    vs, step, beta2 = [], 0, None
    for group in optimizer.param_groups:
        beta2 = group.get("betas", (0.9, 0.999))[1]
    for p in opt_params:
        st = optimizer.state.get(p, {})
        v = st.get("exp_avg_sq")
        if v is None and "state2" in st:
            v = st["state2"] if st["state2"].dtype == torch.float32 else _Dequantized(st)
        vs.append(v)
        if "step" in st:
            step = max(step, int(st["step"]))
    if step == 0 or all(v is None for v in vs):
        return None, 1.0
    return vs, 1.0 - beta2**step


class _Dequantized:
    """bitsandbytes keeps v blockwise-quantized (8 bits) for large tensors. Dequantized on demand, one
    tensor at a time, so the direction never holds an fp32 copy of every v (4 B/param) at once."""

    def __init__(self, st: dict):
        self.st = st

    def __call__(self) -> torch.Tensor:
        import bitsandbytes.functional as F

        st = self.st
        return F.dequantize_blockwise(st["state2"], absmax=st["absmax2"], code=st["qmap2"], blocksize=256)


def perturb(state: MetaState, eta: float, exp_avg_sq=None, bias_correction2: float = 1.0):
    """Step 2: theta' = theta + eta * d in place; returns the kernel's realised-perturbation stats."""
    grads = _grads(state.params)
    if exp_avg_sq is not None and any(isinstance(v, _Dequantized) for v in exp_avg_sq):
        # One tensor at a time, each with its own transient fp32 v.
        total = None
        for i, (p, g) in enumerate(zip(state.params, grads)):
            v = exp_avg_sq[i]
            masters = [state.masters[i]] if state.masters is not None else None
            st = perturb_([p], [g], eta, masters=masters, exp_avg_sq=[v() if callable(v) else v],
                          bias_correction2=bias_correction2)
            total = st if total is None else _add_stats(total, st)
    else:
        total = perturb_(state.params, grads, eta, masters=state.masters, exp_avg_sq=exp_avg_sq,
                         bias_correction2=bias_correction2)
    if state.masters is not None:
        for g in grads:  # the compute copy's J gradient is not needed any more; L accumulates from zero
            g.zero_()
    return total


def _add_stats(a, b):
    hints = a.restore_hints + b.restore_hints if a.restore_hints is not None and b.restore_hints is not None else None
    return type(a)(**{f: getattr(a, f) + getattr(b, f) for f in a.__dataclass_fields__ if f != "restore_hints"},
                   restore_hints=hints)


class _Restorer:
    """Restores each weight as soon as its L gradient arrives (no-master case), and the rest on exit."""

    def __init__(self, state: MetaState, use_hooks: bool, hints=None):
        t0 = time.perf_counter()
        self.seconds = 0.0  # host time spent restoring (plan, hooks, exit); the bench reports it
        self.state = state
        self.pending = set(range(len(state.params)))
        self.side_deltas: list[torch.Tensor] | None = None
        self.handles = []
        self.plan: RestorePlan | None = None
        if state.masters is not None:
            return
        if use_hooks:
            # z is in each grad buffer until its hook restores it; the plan makes the per-call checks once
            try:
                self.plan = RestorePlan(state.params, [p.grad for p in state.params], hints=hints)
            except Exception:
                restore_(state.params, [p.grad for p in state.params])  # never leave theta' behind
                for p in state.params:
                    p.grad.zero_()
                raise
            self.handles = [p.register_hook(self._hook(i)) for i, p in enumerate(state.params)]
            self.seconds += time.perf_counter() - t0
        else:
            # Gradient accumulation: theta' is needed by every micro-batch, so z moves aside.
            self.side_deltas = [p.grad for p in state.params]
            for p in state.params:
                p.grad = torch.zeros_like(p)

    def _hook(self, i: int):
        def hook(grad):
            if i in self.pending:
                t0 = time.perf_counter()
                p = self.state.params[i]
                self.plan.restore(i)
                self.pending.discard(i)
                p.grad.zero_()  # the incoming gradient now accumulates onto zeros: exactly grad L
                self.seconds += time.perf_counter() - t0
            return grad

        return hook

    def restore_all(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        st = self.state
        if not self.pending:
            return
        t0 = time.perf_counter()
        idx = sorted(self.pending)
        params = [st.params[i] for i in idx]
        if st.masters is not None:
            restore_(params, None, masters=[st.masters[i] for i in idx])
        elif self.side_deltas is not None:
            restore_(params, [self.side_deltas[i] for i in idx])
            self.side_deltas = None
        else:
            # Parameters that got no gradient from L (unused), or all of them if the L pass failed
            # before its backward: z is still in their grad buffers.
            for i in idx:
                self.plan.restore(i)
                st.params[i].grad.zero_()
        self.pending.clear()
        self.seconds += time.perf_counter() - t0


@contextmanager
def perturbed(state: MetaState, use_hooks: bool, stats=None):
    """Run the L pass at theta'; on exit (normal or not) every weight is back to theta, bitwise.

    ``stats``: what ``perturb`` returned for this state (its restore hints spare the restore a scan)."""
    restorer = _Restorer(state, use_hooks, hints=getattr(stats, "restore_hints", None))
    try:
        yield restorer
    finally:
        restorer.restore_all()


@contextmanager
def _math_attention():
    """SDPA's fused CPU/GPU kernels have no double backward; the math backend has."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


def second_order_correction_(params, j_fn, eta: float) -> None:
    """grad += eta * H_J(theta) @ grad, with the grads holding grad L(theta') and params at theta.

    For the sgd direction only: d(theta')/d(theta) = I + eta * H_J, so this makes the update exact."""
    vec = [p.grad.detach().clone() for p in params]  # one gradient-sized temporary
    with torch.enable_grad(), _math_attention():
        j = j_fn()
        gj = torch.autograd.grad(j, params, create_graph=True, allow_unused=True)
        pairs = [(g, v) for g, v in zip(gj, vec) if g is not None]
        hv = torch.autograd.grad([g for g, _ in pairs], [p for p, g in zip(params, gj) if g is not None],
                                 grad_outputs=[v for _, v in pairs], allow_unused=True)
    it = iter(hv)
    for p, g in zip(params, gj):
        if g is None:
            continue
        h = next(it)
        if h is not None:
            p.grad.add_(h, alpha=eta)


def finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())


def vanished(stats) -> bool:
    """The perturbation was (almost) entirely lost to rounding in the weights the forward pass uses."""
    return stats.intended_sq > 0 and (stats.changed == 0 or math.sqrt(stats.realised_sq / stats.intended_sq) < 0.1)
