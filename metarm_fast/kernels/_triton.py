"""Triton, or a stand-in where it is not installed (it ships Linux wheels only).

Without Triton the kernels' modules still import: ``@triton.jit`` gives an object that refuses to
launch, and every op's ``impl="auto"`` takes its torch path (see ``_dispatch``). The
annotations (``tl.constexpr``) are never evaluated: the kernel modules use postponed annotations.
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False
    tl = None

    class _Unlaunchable:
        def __init__(self, fn):
            self.fn = fn
            self.__name__ = getattr(fn, "__name__", "kernel")

        def __getitem__(self, grid):
            raise ValueError(f"{self.__name__}: Triton is not installed here (it has Linux wheels only); "
                             "the torch path serves this machine (impl='torch' or METARM_FAST_KERNELS=torch)")

    class _NoTriton:
        @staticmethod
        def jit(fn=None, **kwargs):
            return _Unlaunchable(fn) if fn is not None else _Unlaunchable

    triton = _NoTriton()

__all__ = ["HAS_TRITON", "triton", "tl"]
