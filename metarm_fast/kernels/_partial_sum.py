"""The deterministic reduction the loss kernels share: out = scale * sum(partials), no atomics.

Each loss kernel writes one fp32 partial per program; this kernel, launched as a single program,
adds them in a fixed order (BLOCK_SIZE lanes, each walking its stride of the buffer, then a tree
sum across the lanes), so repeated runs give the same bits. Atomics would add in the order the
programs happen to finish.
"""
from __future__ import annotations

import torch

from ._triton import tl, triton

BLOCK_SIZE = 1024


@triton.jit
def _partial_sum_kernel(PARTIAL_ptr, OUT_ptr, num_partials, scale, BLOCK_SIZE: tl.constexpr):
    acc = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    for start in range(0, num_partials, BLOCK_SIZE):
        offs = start + tl.arange(0, BLOCK_SIZE)
        acc += tl.load(PARTIAL_ptr + offs, mask=offs < num_partials, other=0.0)
    tl.store(OUT_ptr, tl.sum(acc, axis=0) * scale)


def sum_partials(partials: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * sum(partials) as a 0-dim fp32 tensor on the partials' device (partials: 1-D fp32)."""
    out = torch.empty((), dtype=torch.float32, device=partials.device)
    _partial_sum_kernel[(1,)](partials, out, partials.numel(), scale, BLOCK_SIZE=BLOCK_SIZE)
    return out
