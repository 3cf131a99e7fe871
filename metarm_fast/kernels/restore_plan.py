"""RestorePlan: restore_ of case A one tensor at a time, for the backward hooks of the meta step."""
from __future__ import annotations

from typing import Optional

import torch

from ._dispatch import resolve_impl
from .perturb_spec import _all_tensors, _check_restore_args
from .perturb_torch import _restore_layout, _restore_one_
from .perturb_triton import _restore_kernel, restore_triton_


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
        self._rows, self._plain = _restore_layout(self.params, self.deltas, hints)

    def restore(self, i: int) -> None:
        """Restore params[i] from deltas[i], as restore_([params[i]], [deltas[i]]) would."""
        p, z = self.params[i], self.deltas[i]
        if p.numel() == 0:
            return
        if self.path != "torch":
            restore_triton_([p], [z])
            return
        _restore_one_(p, z, self._rows[i], self._plain[i])
