"""How many CPU threads torch uses for a run, and a warning when other work is competing for the cores.

Measured on a 2-core machine: two demo runs (`metarm-fast train --method metarm`) started together
took 40 s each with torch's 2 threads apiece, 14 s each with 1 thread (13 s for one run alone): threads that outnumber the free cores
spin against each other. So the choice is printed at start, and a busy machine gets a warning
that says what to pass.
"""
from __future__ import annotations

import os

import torch


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def choose_threads(requested: int) -> int:
    """``requested`` if > 0; else torch's own choice (which honours OMP_NUM_THREADS), at most the usable cores."""
    if requested > 0:
        return requested
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    return max(1, min(torch.get_num_threads(), usable_cores()))


def busy_warning(threads: int, load: float | None = None, cores: int | None = None) -> str | None:
    """A message when the 1-minute load average says other processes already keep cores busy."""
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            return None
    cores = usable_cores() if cores is None else cores
    # The load average lags by about a minute and counts this run's own start-up: less than most of
    # a core's worth of other work is not worth a warning.
    if load < 0.9 or threads + load <= cores + 0.5:
        return None
    return (f"the machine is busy (1-minute load {load:.1f} on {cores} cores) and this run uses {threads} "
            f"threads: CPU-heavy processes that share cores slow each other down several times over "
            f"(two demo runs on 2 cores with 2 threads each: 3x slower). Pass --threads "
            f"{max(1, cores - round(load))} (or set OMP_NUM_THREADS) to leave the others room.")


def set_threads(requested: int) -> int:
    n = choose_threads(requested)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
