"""The MetaRM meta step (Algorithm 1 of Dou et al.) with one owner: perturb, the L pass, restore.

    1. J = difference loss on the meta batch at theta; backward -> grad J in the grad buffers.
    2. theta' = theta + eta * d, d = grad J (or grad J / (sqrt(v) + eps) with AdamW's own v), in place.
    3. L = Bradley-Terry loss on the preference batch at theta'; backward -> grad L(theta').
    4. theta restored bit for bit; the optimizer then steps with grad L(theta').

``MetaStep.perturbed()`` is steps 2 and 4 around the caller's step 3::

    with meta.perturbed(micro_batches=n) as stats:   # grad J is in the .grad buffers
        ...forward/backward of L...                  # at theta'
    # theta is back, bitwise; .grad holds grad L(theta') only

Where the exact restore information lives, so that no copy of the weights is ever made:
- fp32 master weights with a bf16 compute copy: the masters are the backup. Only the compute copy is
  perturbed (from the masters) and the restore re-casts the masters.
- no master (fp32, or pure bf16): ``perturb_`` turns the J gradient buffer into exactly what was added
  to each weight, z, chosen so that ``p' - z`` gives back p's bits. During the L backward, a hook on
  each parameter fires when its gradient arrives -- the moment no later backward node needs p' --
  restores p from z, zeroes the buffer and lets the new gradient accumulate into it. So z and grad L
  share one buffer, and the step needs no memory beyond a vanilla step's.
  With gradient accumulation the hook cannot be used (later micro-batches still need theta'), and z
  moves to a side buffer the size of the gradients; this costs one gradient of memory.
The caller never learns which scheme is in play.

Anything that fails inside the block (an exception, a non-finite loss, a KeyboardInterrupt) restores
the weights before it propagates: the model is never left perturbed.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from metarm_fast.kernels import RestorePlan, perturb_, restore_


@dataclass
class MetaStats:
    """What one perturbation did, for the metrics and the vanished-step warning."""

    numel: int
    changed: int  # weights whose forward-visible value changed
    intended_sq: float
    realised_sq: float
    nonfinite: int  # elements of eta * d that were not finite (left unperturbed)
    perturb_s: float = 0.0  # host time of the perturbation
    restore_s: float = 0.0  # host time of the restore (plan, hooks, exit); filled in on exit

    @property
    def ratio(self) -> float:
        return math.sqrt(self.realised_sq / self.intended_sq) if self.intended_sq > 0 else 0.0

    @property
    def frac_changed(self) -> float:
        return self.changed / max(self.numel, 1)

    @property
    def vanished(self) -> bool:
        """The perturbation was (almost) entirely lost to rounding in the weights the forward pass uses."""
        return self.intended_sq > 0 and (self.changed == 0 or self.ratio < 0.1)


class MetaStep:
    """Owns the perturb -> L pass -> restore transaction over ``params`` (and their fp32 ``masters``).

    ``direction``: "sgd" (d = grad J, the paper's) or "adam" (grad J preconditioned by the second
    moments of ``optimizer`` over ``opt_params``; plain grad J before its first step)."""

    def __init__(self, params, masters=None, *, eta: float, direction: str = "sgd", optimizer=None, opt_params=None):
        self.params = list(params)
        self.masters = list(masters) if masters is not None else None
        self.eta = eta
        self.direction = direction
        self.optimizer = optimizer
        self.opt_params = opt_params if opt_params is not None else self.params
        # FSDP2: the parameters are DTensors holding this rank's shard. Each rank perturbs its own
        # shards with its shard of the reduce-scattered grad J; the restore cannot ride on tensor hooks
        # (they do not fire on DTensor parameters), so z waits in its grad shard, set aside.
        self.sharded = any(_is_dtensor(p) for p in self.params)
        if self.sharded and self.masters is not None:
            raise ValueError("MetaStep: sharded parameters are their own fp32 masters (FSDP2's mixed precision)")

    @contextmanager
    def perturbed(self, micro_batches: int = 1):
        """theta' for the block; theta back on exit (normal or not). grad J must be in the .grad buffers."""
        stats, hints = self._perturb()
        if self.sharded:
            restorer = _ShardRestorer(self.params)
        else:
            restorer = _Restorer(self.params, self.masters, use_hooks=micro_batches == 1, hints=hints)
        try:
            yield stats
        finally:
            restorer.restore_all()
            stats.restore_s = restorer.seconds

    def _perturb(self):
        """theta' in place; returns the stats and what the perturbation learnt for the restore plan."""
        t0 = time.perf_counter()
        grads = [_local(g) for g in _grads(self.params)]
        params = [_local(p) for p in self.params]
        vs, bc2 = (None, 1.0)
        if self.direction == "adam":
            vs, bc2 = adam_second_moments(self.optimizer, self.opt_params)
            if vs is not None:
                vs = [_local(v) if isinstance(v, torch.Tensor) else v for v in vs]
        if vs is not None and any(isinstance(v, _Dequantized) for v in vs):
            # One tensor at a time, each with its own transient fp32 v.
            parts = []
            for i, (p, g) in enumerate(zip(params, grads)):
                v = vs[i]
                masters = [self.masters[i]] if self.masters is not None else None
                parts.append(perturb_([p], [g], self.eta, masters=masters, exp_avg_sq=[v() if callable(v) else v],
                                      bias_correction2=bc2))
            hints = [h for st in parts for h in st.restore_hints] if all(st.restore_hints is not None for st in parts) else None
            st = _sum_stats(parts)
        else:
            st = perturb_(params, grads, self.eta, masters=self.masters, exp_avg_sq=vs, bias_correction2=bc2)
            hints = st.restore_hints
        if self.masters is not None:
            for g in grads:  # the compute copy's J gradient is not needed any more; L accumulates from zero
                g.zero_()
        numbers = [st.numel, st.changed, st.intended_sq, st.realised_sq, st.nonfinite]
        if self.sharded:  # every rank decides on the whole model's numbers (warnings, non-finite skips)
            import torch.distributed as dist

            t = torch.tensor(numbers, dtype=torch.float64, device=grads[0].device if grads else "cpu")
            dist.all_reduce(t)
            numbers = t.tolist()
        return MetaStats(int(numbers[0]), int(numbers[1]), numbers[2], numbers[3], int(numbers[4]),
                         perturb_s=time.perf_counter() - t0), hints


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - a torch without DTensor
        return False
    return isinstance(t, DTensor)


def _local(t):
    """This rank's shard of a DTensor (a view: writes reach the parameter), or the tensor itself."""
    return t.to_local() if _is_dtensor(t) else t


class _ShardRestorer:
    """FSDP2: z (in each grad shard) set aside, .grad emptied so that FSDP2 writes grad L(theta') into a
    fresh one, and the shards restored from z after the L backward. Extra memory: one local gradient
    shard, 1/N of the parameter bytes, for the duration of the L pass."""

    def __init__(self, params):
        t0 = time.perf_counter()
        self.params = params
        self.deltas = [_local(p.grad) for p in params]
        for p in params:
            p.grad = None  # FSDP2 adds its reduce-scattered gradient into an existing .grad
        self.seconds = time.perf_counter() - t0

    def restore_all(self) -> None:
        if self.deltas is None:
            return
        t0 = time.perf_counter()
        restore_([_local(p) for p in self.params], self.deltas)
        self.deltas = None
        self.seconds += time.perf_counter() - t0


def _sum_stats(parts):
    first = parts[0]
    return type(first)(**{f: sum(getattr(p, f) for p in parts) for f in first.__dataclass_fields__ if f != "restore_hints"})


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


class _Restorer:
    """Restores each weight as soon as its L gradient arrives (no-master case), and the rest on exit."""

    def __init__(self, params, masters, use_hooks: bool, hints=None):
        t0 = time.perf_counter()
        self.seconds = 0.0
        self.params, self.masters = params, masters
        self.pending = set(range(len(params)))
        self.side_deltas: list[torch.Tensor] | None = None
        self.handles = []
        self.plan: RestorePlan | None = None
        if masters is not None:
            return
        if use_hooks:
            # z is in each grad buffer until its hook restores it; the plan makes the per-call checks once
            try:
                self.plan = RestorePlan(params, [p.grad for p in params], hints=hints)
            except BaseException:
                restore_(params, [p.grad for p in params])  # never leave theta' behind
                for p in params:
                    p.grad.zero_()
                raise
            self.handles = [p.register_hook(self._hook(i)) for i, p in enumerate(params)]
        else:
            # Gradient accumulation: theta' is needed by every micro-batch, so z moves aside.
            self.side_deltas = [p.grad for p in params]
            for p in params:
                p.grad = torch.zeros_like(p)
        self.seconds += time.perf_counter() - t0

    def _hook(self, i: int):
        def hook(grad):
            if i in self.pending:
                t0 = time.perf_counter()
                self.plan.restore(i)
                self.pending.discard(i)
                self.params[i].grad.zero_()  # the incoming gradient now accumulates onto zeros: exactly grad L
                self.seconds += time.perf_counter() - t0
            return grad

        return hook

    def restore_all(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        if not self.pending:
            return
        t0 = time.perf_counter()
        idx = sorted(self.pending)
        params = [self.params[i] for i in idx]
        if self.masters is not None:
            restore_(params, None, masters=[self.masters[i] for i in idx])
        elif self.side_deltas is not None:
            restore_(params, [self.side_deltas[i] for i in idx])
            self.side_deltas = None
        else:
            # Parameters that got no gradient from L (unused), or all of them if the L pass failed
            # before its backward: z is still in their grad buffers.
            for i in idx:
                self.plan.restore(i)
                self.params[i].grad.zero_()
        self.pending.clear()
        self.seconds += time.perf_counter() - t0


@contextmanager
def _math_attention():
    """SDPA's fused CPU/GPU kernels have no double backward; the math backend has."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


def second_order_correction_(params, j_fn, eta: float) -> None:
    """grad += eta * H_J(theta) @ grad, with the grads holding grad L(theta') and params at theta.

    For the sgd direction only: d(theta')/d(theta) = I + eta * H_J, so this makes the update exact.
    ``j_fn`` must build J from ops that are twice differentiable (the torch J, not the fused kernel)."""
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
