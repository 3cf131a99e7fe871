"""Which items a step uses, as a function of (seed, step) alone.

The items of step s are positions [s * per_step, (s + 1) * per_step) of an endless sequence made
of one permutation of the items per epoch, each permutation seeded by (seed, salt, epoch). Nothing
is carried from one step to the next, so a resumed run draws exactly what the uninterrupted run
drew, and a run split over ranks can give each its share of the same global batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class EpochSampler:
    n_items: int
    per_step: int
    seed: int
    salt: int = 0  # tells streams of one run apart (pairs, meta groups)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.n_items < 1:
            raise ValueError("EpochSampler needs at least one item")
        if self.per_step < 1:
            raise ValueError("EpochSampler needs per_step >= 1")

    def permutation(self, epoch: int) -> list[int]:
        if epoch not in self._cache:
            if len(self._cache) > 2:
                self._cache.clear()
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.salt) * 1_000_033 + epoch)
            self._cache[epoch] = torch.randperm(self.n_items, generator=g).tolist()
        return self._cache[epoch]

    def indices(self, step: int) -> list[int]:
        start = step * self.per_step
        out = []
        for pos in range(start, start + self.per_step):
            out.append(self.permutation(pos // self.n_items)[pos % self.n_items])
        return out
