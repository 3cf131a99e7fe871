"""What perturb_ hands back: its statistics, and the restore that undoes it (a ``RestorePlan``).

A ``Perturbation`` holds the tensors one perturb_ call wrote (the params, and the grads buffers
holding z in case A or the masters in case B), the stats, which path ran, and what that path
learnt while perturbing that its restore can use (the torch path: each tensor's row-sparse rows
and whether its weights were all finite). ``restore()`` undoes the whole call;
``restore_plan()`` gives a ``RestorePlan``, which restores one tensor at a time, as the meta step
does in its backward hooks, with everything that does not depend on the moment -- the argument
checks, on Triton the device tables -- done once, when the plan is built.

Each path defines its plan (``perturb_torch.TorchRestorePlan``, ``perturb_triton.TritonRestorePlan``);
this module knows neither, so both paths can import it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .perturb_spec import PerturbStats, _check_restore_args


class RestorePlan:
    """Undoes a perturbation tensor by tensor: ``restore(i)`` gives params[i] back bit for bit,
    ``restore_all()`` gives every tensor back. Restore each tensor once (a second restore of a
    case A tensor would subtract its step again).

    Case A (no masters): ``deltas`` are the grads buffers as perturb_ left them, and the plan holds
    for them and for the params as perturb_ left them (the forward pass reads them, nothing writes
    them). Case B: ``masters``, and each restore re-casts its master. The constructor checks the
    arguments, once; subclasses add what their path works out once.
    """

    def __init__(self, params: Sequence[torch.Tensor], deltas: Optional[Sequence[torch.Tensor]],
                 masters: Optional[Sequence[torch.Tensor]] = None):
        _check_restore_args(params, deltas, masters)
        self.params = list(params)
        self.deltas = list(deltas) if masters is None else None
        self.masters = list(masters) if masters is not None else None

    def restore(self, i: int) -> None:
        raise NotImplementedError

    def restore_all(self) -> None:
        for i in range(len(self.params)):
            self.restore(i)


class Perturbation:
    """One perturb_ call: ``stats`` (``PerturbStats``), and the restore that undoes it.

    Made by the paths; ``plan_type`` is the path's RestorePlan subclass and ``layout`` what the
    path learnt for it (one entry per tensor, or None). The perturbation keeps the tensors it was
    given alive until it is dropped.
    """

    def __init__(self, stats: PerturbStats, params, deltas, masters, *, plan_type: type, layout: Optional[list] = None):
        self.stats = stats
        self.params = list(params)
        self.deltas = list(deltas) if deltas is not None else None
        self.masters = list(masters) if masters is not None else None
        self._plan_type = plan_type
        self._layout = layout

    def restore_plan(self) -> RestorePlan:
        """A plan over every tensor of this call, to restore them one at a time (each once)."""
        if self._layout is None:
            return self._plan_type(self.params, self.deltas, self.masters)
        return self._plan_type(self.params, self.deltas, self.masters, layout=self._layout)

    def restore(self) -> None:
        """Undo the whole call: every tensor back to its bits before perturb_. Once, and not after
        any tensor was restored through a plan."""
        self.restore_plan().restore_all()

    @staticmethod
    def concat(parts: Sequence["Perturbation"]) -> "Perturbation":
        """The perturbation of several calls on disjoint tensors (same path, same case), as one:
        stats added up, tensors in the order of the parts."""
        if not parts:
            raise ValueError("Perturbation.concat: no parts")
        first = parts[0]
        if any(p._plan_type is not first._plan_type or (p.masters is None) != (first.masters is None) for p in parts):
            raise ValueError("Perturbation.concat: the parts must come from one path and one case (masters or not)")

        def joined(lists):
            return None if any(x is None for x in lists) else [t for x in lists for t in x]

        return Perturbation(
            sum((p.stats for p in parts), PerturbStats()),
            joined([p.params for p in parts]),
            joined([p.deltas for p in parts]),
            joined([p.masters for p in parts]),
            plan_type=first._plan_type,
            layout=joined([p._layout for p in parts]),
        )
