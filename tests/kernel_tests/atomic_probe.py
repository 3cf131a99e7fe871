"""A kernel with an atomic add and a contractible multiply-add, for tests/kernel_tests/test_gpu_compile.py:
the PTX counts of gpu_compile must see them (a count that can only be 0 would prove nothing)."""
from metarm_fast.kernels._triton import tl, triton


@triton.jit
def _atomic_probe_kernel(X_ptr, OUT_ptr, a, b, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(X_ptr + offs)
    tl.atomic_add(OUT_ptr, tl.sum(x * a + b, axis=0))
