"""Fused Triton kernels for MetaRM (installed as metarm_fast.kernels).

Imports only torch and triton. Each op runs its Triton kernel on CUDA tensors and its pure-torch
path on CPU tensors; ``impl=`` or METARM_FAST_KERNELS overrides that (see ``_dispatch``).

- ``bt_loss``: pairwise Bradley-Terry loss (margin, reward centering), fused forward+backward;
  ``bt_loss_reference`` is its plain torch reference (the torch path, and what the tests hold the
  kernel to).
- ``difference_loss``: MetaRM's J over groups of k responses per prompt, fused forward+backward;
  ``difference_loss_reference`` likewise.
- ``group_loss``: preference loss over groups of k scored responses per prompt (all pairs
  Bradley-Terry, or listwise Plackett-Luce), fused forward+backward; ``group_loss_reference``
  likewise.
- ``perturb_`` / ``restore_``: the meta step's in-place theta + eta * d and its bit-exact undo.
  perturb_ returns a ``Perturbation``: the realised-perturbation statistics (``PerturbStats``, also
  what the meta step reports) and the restore of that call, whole or one tensor at a time (a
  ``RestorePlan``, for backward hooks, with the per-call work done once). The two paths they
  choose between are ``perturb_torch`` (``perturb_torch_``, the CPU-optimised torch path) and
  ``perturb_triton`` (``perturb_triton_``, the kernels); ``perturb_spec`` states the rule, and
  ``perturb_direction`` computes its d for one tensor.
"""
from ._triton import HAS_TRITON
from .bt_loss import BTLossFunction, bt_loss, bt_loss_reference
from .difference_loss import DifferenceLossFunction, difference_loss, difference_loss_reference
from .group_loss import GroupLossFunction, group_loss, group_loss_reference
from .perturb import perturb_, restore_
from .perturb_spec import PerturbStats
from .perturb_torch import perturb_direction
from .perturbation import Perturbation, RestorePlan

__all__ = [
    "HAS_TRITON",
    "bt_loss",
    "bt_loss_reference",
    "BTLossFunction",
    "difference_loss",
    "difference_loss_reference",
    "DifferenceLossFunction",
    "group_loss",
    "group_loss_reference",
    "GroupLossFunction",
    "perturb_",
    "perturb_direction",
    "restore_",
    "Perturbation",
    "PerturbStats",
    "RestorePlan",
]
