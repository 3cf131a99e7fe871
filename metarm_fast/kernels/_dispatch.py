"""Choosing between an op's Triton path and its pure-torch path.

Rules, shared by every public op in this package:

* ``impl="auto"`` (the default): CUDA tensors run the Triton kernels (the torch path where Triton
  is not installed); tensors on any other device run the torch path. On the CPU the Triton
  interpreter is far too slow for training (~1 s per million elements), so CPU training always
  takes the torch path unless asked otherwise.
* ``impl="torch"`` / ``impl="triton"`` force one path. An explicit argument beats the environment.
* The environment variable ``METARM_FAST_KERNELS`` (``auto`` | ``torch`` | ``triton``) changes
  what ``"auto"`` means, so a whole run can be forced onto one path without touching code.
* The Triton path accepts CPU tensors only when the kernels were defined under Triton's
  interpreter (``TRITON_INTERPRET=1`` set before this package was imported). Without it, a CPU
  tensor on the Triton path raises a ValueError saying what to do, instead of Triton's own
  "0 active drivers" message.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional

import torch

from ._triton import HAS_TRITON

try:  # The interpreter's class; its name has been stable since triton 2.2.
    from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction
except ImportError:  # pragma: no cover - a triton without the interpreter
    _InterpretedFunction = None

ENV_VAR = "METARM_FAST_KERNELS"
IMPLS = ("auto", "torch", "triton")


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` (a ``@triton.jit`` object) will run under Triton's CPU interpreter.

    Triton decides this once, when the decorator runs, from ``TRITON_INTERPRET``: setting the
    variable later changes nothing for kernels already defined. So the kernel object, not the
    current environment, is the thing to ask.
    """
    return _InterpretedFunction is not None and isinstance(kernel, _InterpretedFunction)


def _env_impl() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in IMPLS:
        raise ValueError(
            f"{ENV_VAR}={os.environ.get(ENV_VAR)!r} is not one of {IMPLS}; unset it or pick one of those"
        )
    return value


def _devices(tensors: Iterable[Optional[torch.Tensor]]) -> list[torch.device]:
    seen: list[torch.device] = []
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device not in seen:
            seen.append(t.device)
    return seen


def check_triton_device(op: str, tensors: Iterable[Optional[torch.Tensor]], *, interpreted: bool) -> None:
    """Raise a ValueError unless the Triton path of ``op`` can run on these tensors.

    ``interpreted`` says whether the op's kernels were defined under the interpreter (see
    :func:`is_interpreted`); tests pass ``False`` to exercise the no-interpreter error on a CPU box.
    """
    devices = _devices(tensors)
    if len(devices) > 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {[str(d) for d in devices]}")
    if not devices:
        return
    device = devices[0]
    if device.type == "cuda":
        return
    if device.type == "cpu":
        if interpreted:
            return
        raise ValueError(
            f"{op}: the Triton path was requested for CPU tensors, but Triton's interpreter is off: "
            "TRITON_INTERPRET=1 must be in the environment before metarm_fast.kernels is imported "
            "(the kernels are compiled for a GPU otherwise). Set it before starting Python, move "
            "the tensors to a CUDA device, or use impl='torch'."
        )
    raise ValueError(
        f"{op}: the Triton path runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
        f"got a tensor on {device}; use impl='torch' for this device"
    )


def resolve_impl(op: str, impl: str, tensors: Iterable[Optional[torch.Tensor]], *, kernel) -> str:
    """Return ``"torch"`` or ``"triton"`` for a call of ``op`` on ``tensors``.

    ``kernel`` is one of the op's ``@triton.jit`` kernels, used to know whether the Triton path
    would run under the interpreter. Raises a ValueError when the requested path cannot run.
    """
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    if impl == "auto":
        impl = _env_impl()
    if impl == "auto":
        devices = _devices(tensors)
        on_cuda = devices and all(d.type == "cuda" for d in devices)
        impl = "triton" if on_cuda and HAS_TRITON else "torch"
    if impl == "triton" and not HAS_TRITON:
        raise ValueError(f"{op}: the Triton path was asked for, but Triton is not installed here (it has Linux "
                         "wheels only); use impl='torch' (or unset METARM_FAST_KERNELS)")
    if impl == "triton":
        check_triton_device(op, tensors, interpreted=is_interpreted(kernel))
    return impl
