"""Timing marks for bench.gpu_check: CUDA events on a GPU (what the device did between two marks,
without synchronising at each), perf_counter on the CPU."""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class Clock:
    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.marks: dict = {}

    def reset(self) -> None:
        self.marks = {}

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks[name] = event
        else:
            self.marks[name] = time.perf_counter()

    def seconds(self, start: str, end: str) -> float:
        if self.cuda:
            self.marks[end].synchronize()
            return self.marks[start].elapsed_time(self.marks[end]) / 1e3
        return self.marks[end] - self.marks[start]


class TimedMeta:
    """A ``MetaStep`` whose transaction leaves marks: ``perturb_start`` / ``perturbed`` around the
    perturbation, ``l_done`` / ``restored`` around the restore on exit (with fp32 masters the whole
    restore happens there; without them part of it runs inside the L backward's hooks). With
    ``snapshot`` set it also checks that the weights came back bit for bit (``restored_bitwise``).
    Everything else is the wrapped step's."""

    def __init__(self, meta, clock: Clock):
        self._meta = meta
        self.clock = clock
        self.snapshot = False
        self.restored_bitwise = None

    def __getattr__(self, name):
        return getattr(self._meta, name)

    @contextmanager
    def perturbed(self, micro_batches: int = 1, **kwargs):
        before = [p.detach().clone() for p in self._meta.params] if self.snapshot else None
        self.clock.mark("perturb_start")
        with self._meta.perturbed(micro_batches=micro_batches, **kwargs) as stats:
            self.clock.mark("perturbed")
            try:
                yield stats
            finally:
                self.clock.mark("l_done")
        self.clock.mark("restored")
        if before is not None:
            self.restored_bitwise = all(torch.equal(bits(p), bits(b)) for p, b in zip(self._meta.params, before))


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    return t.view({4: torch.int32, 2: torch.int16, 8: torch.int64, 1: torch.int8}[t.element_size()])
