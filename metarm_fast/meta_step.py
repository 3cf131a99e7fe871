"""The MetaRM meta step (Algorithm 1 of Dou et al.) with one owner: perturb, the L pass, restore.

    1. J = difference loss on the meta batch at theta; backward -> grad J in the grad buffers.
    2. theta' = theta + eta * d, in place (the direction d below).
    3. L = Bradley-Terry loss on the preference batch at theta'; backward -> grad L(theta').
    4. theta restored bit for bit; the optimizer then steps with grad L(theta').

``MetaStep.perturbed()`` is steps 2 and 4 around the caller's step 3::

    with meta.perturbed(micro_batches=n) as stats:   # grad J is in the .grad buffers
        ...forward/backward of L...                  # at theta'
    # theta is back, bitwise; .grad holds grad L(theta') only

The directions (``--meta-direction``):
- "sgd": d = grad J, the paper's formula.
- "adam": d = grad J / (max(sqrt(v_hat), |grad J|) + eps), with AdamW's own second moments v_hat of
  the L gradients (the floor keeps |d| <= 1 where v is ~0: metarm_fast/kernels/perturb_spec.py).
- "optimizer-step": theta' is one step of the run's own optimizer on -J, as a DeepSpeed user
  would write the authors' account (MOSS-RLHF issue #42: fp32 weights backed up, the meta process
  and backpropagation run, the backup copied back). Its learning rate is the scheduled one times
  eta / lr (with the default eta = lr: the step the engine itself would take), the gradient is
  clipped like any other. Only the weights are restored: the optimizer keeps what the step did to
  its state (-grad J in the first moment, grad J^2 in the second, one more step counted), as a
  DeepSpeed engine that backs up only the fp32 weights would. This is the one direction that
  copies the weights: the backup costs 4 bytes per trainable parameter (the fp32 optimizer
  weights) for the duration of the L pass.

Where the exact restore information lives for sgd and adam, so that no copy of the weights is made:
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

import dataclasses
import time
from contextlib import contextmanager

import torch

from metarm_fast.config import META_DIRECTIONS
from metarm_fast.kernels import Perturbation, PerturbStats, perturb_, perturb_direction


class MetaStep:
    """Owns the perturb -> L pass -> restore transaction over ``weights`` (a ``metarm_fast.weights.Weights``:
    the params, and their fp32 masters when there are any).

    ``direction``: "sgd" (d = grad J, the paper's), "adam" (grad J preconditioned by the second
    moments ``optimizer`` keeps for the weights' opt_params; plain grad J before its first step) or
    "optimizer-step" (one step of ``optimizer`` on -J, clipped to ``max_grad_norm``; see the module
    docstring for what it leaves in the optimizer's state)."""

    def __init__(self, weights, *, eta: float, direction: str = "sgd", optimizer=None, max_grad_norm: float = 0.0):
        if direction not in META_DIRECTIONS:
            raise ValueError(f"MetaStep: direction {direction!r} is not one of {', '.join(META_DIRECTIONS)}")
        if direction != "sgd" and optimizer is None:
            raise ValueError(f"MetaStep: the {direction} direction needs the optimizer")
        self.weights = weights
        self.params = list(weights.params)
        self.masters = list(weights.masters) if weights.masters is not None else None
        self.eta = eta
        self.direction = direction
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.opt_params = weights.opt_params
        # FSDP2: the parameters are DTensors holding this rank's shard. Each rank perturbs its own
        # shards with its shard of the reduce-scattered grad J; the restore cannot ride on tensor hooks
        # (they do not fire on DTensor parameters), so z waits in its grad shard, set aside.
        self.sharded = any(_is_dtensor(p) for p in self.params)
        if self.sharded and self.masters is not None:
            raise ValueError("MetaStep: sharded parameters are their own fp32 masters (FSDP2's mixed precision)")

    @contextmanager
    def perturbed(self, micro_batches: int = 1, measure_move: bool = False):
        """theta' for the block; theta back on exit (normal or not). grad J must be in the .grad buffers.

        Yields the perturbation's PerturbStats (whole model, all ranks), with perturb_s filled in
        and restore_s (plan, hooks, exit) filled in on exit. ``measure_move``: also the largest
        per-weight move max |theta' - theta| in fp32 (``stats.max_move``; one more pass over the
        J gradients, and the second moments for adam, before the perturbation; the optimizer-step
        direction measures it always, from the pass its stats already make over the weights)."""
        if self.direction == "optimizer-step":
            with self._optimizer_stepped() as stats:
                yield stats
            return
        max_move = self._max_move() if measure_move else None
        perturbation, stats = self._perturb()
        stats.max_move = max_move
        if self.sharded:
            restorer = _ShardRestorer(self.params, perturbation)
        else:
            restorer = _Restorer(self.params, perturbation, use_hooks=micro_batches == 1)
        del perturbation  # the restorer owns it, and drops it once theta is back
        try:
            yield stats
        finally:
            restorer.restore_all()
            stats.restore_s = restorer.seconds

    def _second_moments(self):
        """(AdamW's v per weight, this rank's shards, or None; its bias correction) for adam, else (None, 1)."""
        if self.direction != "adam":
            return None, 1.0
        vs, bc2 = adam_second_moments(self.optimizer, self.opt_params)
        if vs is not None:
            vs = [_local(v) if isinstance(v, torch.Tensor) else v for v in vs]
        return vs, bc2

    @torch.no_grad()
    def _max_move(self) -> float:
        """max |eta * d| over every weight (all ranks), d as perturb_ computes it, one tensor at a time."""
        vs, bc2 = self._second_moments()
        top = 0.0
        for i, g in enumerate(_grads(self.params)):
            g = _local(g)
            if g.numel() == 0:
                continue
            v = None if vs is None else vs[i]
            d = perturb_direction(g, v() if callable(v) else v, bias_correction2=bc2)
            top = max(top, float(d.abs().max()))
        return self.eta * _max_over_ranks(top, self.sharded, self.params)

    def _perturb(self) -> tuple[Perturbation, PerturbStats]:
        """theta' in place; returns the perturbation (which undoes itself) and the stats to report."""
        t0 = time.perf_counter()
        grads = [_local(g) for g in _grads(self.params)]
        params = [_local(p) for p in self.params]
        vs, bc2 = self._second_moments()
        if vs is not None and any(isinstance(v, _Dequantized) for v in vs):
            # One tensor at a time, each with its own transient fp32 v.
            parts = []
            for i, (p, g) in enumerate(zip(params, grads)):
                v = vs[i]
                masters = [self.masters[i]] if self.masters is not None else None
                parts.append(perturb_([p], [g], self.eta, masters=masters, exp_avg_sq=[v() if callable(v) else v],
                                      bias_correction2=bc2))
            perturbation = Perturbation.concat(parts)
        else:
            perturbation = perturb_(params, grads, self.eta, masters=self.masters, exp_avg_sq=vs, bias_correction2=bc2)
        if self.masters is not None:
            for g in grads:  # the compute copy's J gradient is not needed any more; L accumulates from zero
                g.zero_()
        stats = perturbation.stats
        if self.sharded:  # every rank decides on the whole model's numbers (warnings, non-finite skips)
            stats = _all_reduced(stats, self.params)
        return perturbation, dataclasses.replace(stats, perturb_s=time.perf_counter() - t0)

    @contextmanager
    def _optimizer_stepped(self):
        """The optimizer-step direction: back up the weights the optimizer steps (fp32), step the
        optimizer on -grad J, yield theta'; on exit copy the backup back (and re-cast the compute
        copy from it). A non-finite grad J is not stepped on (it would poison the optimizer's
        state); it is counted in the stats, and the caller skips the step."""
        t0 = time.perf_counter()
        grads = _grads(self.params)
        nonfinite = sum(int((~torch.isfinite(_local(g))).sum()) for g in grads)
        if self.sharded:  # every rank must take the same decision: the optimizer step is collective
            nonfinite = int(_reduced([float(nonfinite)], "sum", self.params)[0])
        backup = [_local(q).detach().clone() for q in self.opt_params]
        stats = None
        try:
            if not nonfinite and self.eta:  # eta = 0: no step, the optimizer's state untouched (vanilla)
                self._step_on_minus_j(grads)
            with torch.no_grad():
                for g in grads:  # -grad J is not needed any more; L accumulates from zero
                    g.zero_()
            stats = self._moved(backup, nonfinite)
            stats.perturb_s = time.perf_counter() - t0
            yield stats
        finally:
            t1 = time.perf_counter()
            with torch.no_grad():
                for q, b in zip(self.opt_params, backup):
                    _local(q).copy_(b)
                if self.masters is not None:
                    for p, m in zip(self.params, self.masters):
                        p.copy_(m)  # the compute copy is round(master), as before the step
            if stats is not None:
                stats.restore_s = time.perf_counter() - t1

    def _step_on_minus_j(self, grads) -> None:
        """One step of the run's optimizer from -grad J, at the scheduled learning rate times eta / lr."""
        with torch.no_grad():
            for g in grads:
                g.neg_()
        groups = self.optimizer.param_groups
        lrs = [group["lr"] for group in groups]
        for group in groups:
            # LambdaLR keeps the base rate as initial_lr: lr / initial_lr is the schedule's factor now
            factor = group["lr"] / group["initial_lr"] if group.get("initial_lr") else 1.0
            group["lr"] = self.eta * factor
        try:
            self.weights.step(self.optimizer, None, self.max_grad_norm)
        finally:
            for group, lr in zip(groups, lrs):
                group["lr"] = lr

    @torch.no_grad()
    def _moved(self, backup, nonfinite: int) -> PerturbStats:
        """The stats of the optimizer-step direction, from the weights and their backup: intended =
        the optimizer's fp32 move, realised = the move of the weights the forward pass uses (the same
        with no masters). Differences and sums in fp64, one tensor at a time."""
        numel = changed = 0
        intended_sq = realised_sq = top = 0.0
        for i, (q, b) in enumerate(zip(self.opt_params, backup)):
            move = (_local(q).double() - b.double()).flatten()
            if not move.numel():
                continue
            numel += move.numel()
            top = max(top, float(move.abs().max()))
            intended_sq += float(move @ move)
            if self.masters is not None:
                p = self.params[i]
                move = (p.double() - b.to(p.dtype).double()).flatten()
            changed += int(move.count_nonzero())
            realised_sq += float(move @ move)
        stats = PerturbStats(numel, changed, intended_sq, realised_sq, 0)
        if self.sharded:
            stats = _all_reduced(stats, self.params)
        stats.nonfinite = nonfinite  # already the sum over the ranks
        stats.max_move = _max_over_ranks(top, self.sharded, self.params)
        return stats


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - a torch without DTensor
        return False
    return isinstance(t, DTensor)


def _local(t):
    """This rank's shard of a DTensor (a view: writes reach the parameter), or the tensor itself."""
    return t.to_local() if _is_dtensor(t) else t


def _reduced(values: list[float], op: str, params) -> list[float]:
    """``values`` summed ("sum") or maxed ("max") over the ranks."""
    import torch.distributed as dist

    device = _local(params[0]).device if params else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def _max_over_ranks(x: float, sharded: bool, params) -> float:
    """The largest of every rank's ``x`` (each rank sees its own shards); ``x`` itself unsharded."""
    return _reduced([x], "max", params)[0] if sharded else x


def _all_reduced(stats: PerturbStats, params) -> PerturbStats:
    """The counts and sums added over the ranks (each perturbed its own shards)."""
    numel, changed, intended_sq, realised_sq, nonfinite = _reduced(
        [stats.numel, stats.changed, stats.intended_sq, stats.realised_sq, stats.nonfinite], "sum", params)
    return PerturbStats(int(numel), int(changed), intended_sq, realised_sq, int(nonfinite))


class _ShardRestorer:
    """FSDP2: z (in each grad shard, which the perturbation holds) set aside, .grad emptied so that
    FSDP2 writes grad L(theta') into a fresh one, and the shards restored from z after the L backward.
    Extra memory: one local gradient shard, 1/N of the parameter bytes, for the duration of the L pass."""

    def __init__(self, params, perturbation: Perturbation):
        t0 = time.perf_counter()
        self.perturbation = perturbation
        for p in params:
            p.grad = None  # FSDP2 adds its reduce-scattered gradient into an existing .grad
        self.seconds = time.perf_counter() - t0

    def restore_all(self) -> None:
        if self.perturbation is None:
            return
        t0 = time.perf_counter()
        self.perturbation.restore()
        self.perturbation = None
        self.seconds += time.perf_counter() - t0


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

    def __init__(self, params, perturbation: Perturbation, use_hooks: bool):
        t0 = time.perf_counter()
        self.seconds = 0.0
        self.params, self.perturbation = params, perturbation
        self.pending = set(range(len(params)))
        self.handles = []
        self.plan = None  # the per-tensor restore of the hooks
        if perturbation.masters is None and use_hooks:
            # z is in each grad buffer until its hook restores it; the plan makes the per-call work once
            try:
                self.plan = perturbation.restore_plan()
                for i, p in enumerate(params):
                    self.handles.append(p.register_hook(self._hook(i)))
            except BaseException:  # never leave theta' behind
                for h in self.handles:
                    h.remove()
                perturbation.restore()
                for p in params:
                    p.grad.zero_()
                raise
        elif perturbation.masters is None:
            # Gradient accumulation: theta' is needed by every micro-batch, so z stays aside in the
            # buffers the perturbation holds, and L accumulates into fresh ones.
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
        t0 = time.perf_counter()
        if self.pending and self.plan is None:
            self.perturbation.restore()  # masters, or z set aside: no tensor was restored yet
        elif self.pending:
            # Parameters that got no gradient from L (unused), or all of them if the L pass failed
            # before its backward: z is still in their grad buffers.
            for i in sorted(self.pending):
                self.plan.restore(i)
                self.params[i].grad.zero_()
        self.pending.clear()
        self.plan = self.perturbation = None  # z set aside is freed with it
        self.seconds += time.perf_counter() - t0


def rounding_message(stats, step: int, dtype, precision: str) -> str | None:
    """What to tell the user when rounding decided the perturbation the L pass saw, and what to change:
    lost (``stats.vanished``: MetaRM acts as vanilla) or dominated by it (``stats.rounding_dominated``:
    a few weights moved by whole spacings); None when neither."""
    if stats.vanished:
        return (f"meta step {step}: the perturbation eta * grad J was lost to rounding in the {dtype} weights "
                f"(realised/intended norm {stats.ratio:.3g}, {stats.changed} of {stats.numel} weights changed); "
                "MetaRM is acting as vanilla training. "
                + ("Use a larger --eta, or --precision fp32." if precision == "bf16-master"
                   else "Use --precision fp32 or bf16-master (fp32 master weights), or a larger --eta."))
    if stats.rounding_dominated:
        return (f"meta step {step}: the {dtype} weights the L pass sees moved by {stats.ratio:.3g} times the "
                f"intended norm of eta * d ({stats.changed} of {stats.numel} weights changed, each by a whole "
                f"{dtype} spacing): most of the perturbation is rounding, not the meta direction, and so is most "
                "of the change it makes to the update. Use --precision fp32, or a larger --eta.")
    return None
