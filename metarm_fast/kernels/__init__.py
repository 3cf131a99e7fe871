"""Fused Triton kernels for MetaRM (installed as metarm_fast.kernels).

Imports only torch and triton. Each op runs its Triton kernel on CUDA tensors and its pure-torch
reference on CPU tensors; ``impl=`` or METARM_FAST_KERNELS overrides that (see ``_dispatch``).

- ``bt_loss``: pairwise Bradley-Terry loss (margin, reward centering), fused forward+backward.
- ``difference_loss``: MetaRM's J over groups of k responses per prompt, fused forward+backward.
- ``perturb_`` / ``restore_``: the meta step's in-place theta + eta * d and its bit-exact undo,
  with the realised-perturbation statistics (``PerturbStats``); ``RestorePlan`` restores one
  tensor at a time (in backward hooks) with the per-call checks made once; ``perturb_oracle_`` /
  ``restore_oracle_`` are the rule transcribed plainly, the yardstick the tests hold both paths to.
"""
from ._triton import HAS_TRITON
from .bt_loss import BTLossFunction, bt_loss, bt_loss_reference
from .difference_loss import DifferenceLossFunction, difference_loss, difference_loss_reference
from .perturb import perturb_, restore_
from .perturb_spec import PerturbStats, perturb_oracle_, restore_oracle_
from .perturb_torch import perturb_reference_, restore_reference_
from .restore_plan import RestorePlan

__all__ = [
    "HAS_TRITON",
    "bt_loss",
    "bt_loss_reference",
    "BTLossFunction",
    "difference_loss",
    "difference_loss_reference",
    "DifferenceLossFunction",
    "perturb_",
    "restore_",
    "perturb_reference_",
    "restore_reference_",
    "perturb_oracle_",
    "restore_oracle_",
    "PerturbStats",
    "RestorePlan",
]
