"""Fused Triton kernels for MetaRM (installed as metarm_fast.kernels)."""
