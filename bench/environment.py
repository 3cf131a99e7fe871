"""What bench.throughput records about the machine and the code a run measured: device, versions,
commit and whether the worktree had changes, threads, load average, the command line."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

from bench.memory import environment

REPO = Path(__file__).resolve().parents[1]


def _worktree_dirty() -> bool | None:
    try:
        out = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return bool(out.stdout.strip()) if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def full_environment(argv, module: str = "bench.throughput") -> dict:
    cwd = os.getcwd()
    try:
        os.chdir(REPO)  # environment() asks git in the working directory
        env = environment()
    finally:
        os.chdir(cwd)
    env["worktree_dirty"] = _worktree_dirty()
    try:
        import trl

        env["trl"] = trl.__version__
    except ImportError:
        env["trl"] = None
    try:
        import datasets

        env["datasets"] = datasets.__version__
    except ImportError:
        pass
    env.update(
        python=platform.python_version(),
        torch_threads=torch.get_num_threads(),
        loadavg_start=[round(x, 2) for x in os.getloadavg()],
        command=f"python -m {module} " + " ".join(argv),
    )
    return env
