"""Resume checkpoints: one folder per step, written with torch.distributed.checkpoint (DCP).

Layout under ``<output_dir>/checkpoints/``: ``step-00000042/`` holds DCP's files for everything an
exact continuation needs (see ``RewardTrainer.state_dict``). A checkpoint is written into
``.step-00000042.partial/`` and renamed into place only when complete, so a crash mid-save leaves
the previous checkpoints as they were; the partial folder is removed by the next save. DCP is the
format sharded training writes too (each rank its shards), so the same folders carry over.
"""
from __future__ import annotations

import os
import re
import shutil
import warnings

import torch.distributed.checkpoint as dcp

_STEP_DIR = re.compile(r"^step-(\d{8})$")
# DCP's note that it runs without a process group: expected for a single-process run.
_SINGLE_PROCESS = ".*torch.distributed is disabled, unavailable or uninitialized.*"


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step-{step:08d}")


def complete_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoints under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(root, name, ".metadata")):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def latest_checkpoint(root: str) -> str | None:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def save_checkpoint(root: str, step: int, state: dict, keep_last: int = 0, info=None) -> str:
    """Write ``state`` as the checkpoint of ``step``; keep the newest ``keep_last`` (0: all).

    With several ranks (``info``), every rank calls this: DCP writes each rank's part (a replicated
    tensor once), and rank 0 alone tidies, renames and prunes, between barriers. ``root`` must be on
    a file system every rank sees."""
    from metarm_fast.parallel import barrier

    main = info is None or info.is_main
    if main:
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):
            if name.endswith(".partial"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)  # left by a crash mid-save
    barrier(info)
    final = step_dir(root, step)
    tmp = os.path.join(root, f".step-{step:08d}.partial")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS)
        dcp.save(state, checkpoint_id=tmp)
    barrier(info)
    if main:
        _fsync_dir(tmp)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        if keep_last > 0:
            for _, path in complete_checkpoints(root)[:-keep_last]:
                shutil.rmtree(path, ignore_errors=True)
    barrier(info)
    return final


def load_checkpoint(path: str, state: dict, *, partial: bool = False) -> None:
    """Load the checkpoint at ``path`` into ``state`` in place (tensors copied into, other values replaced).
    ``partial``: keys of ``state`` the checkpoint lacks keep their values (a config saved before a
    setting existed) instead of failing the load."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS)
        dcp.load(state, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=partial))


def flatten(obj, prefix: str = "") -> dict:
    """An optimizer state dict as one flat dict whose keys record the path with each key's type
    ("i3" for the int 3, "s.name" for a string), so that no two paths can share a key. DCP joins
    nested keys with dots, which made bitsandbytes' nested quantization state (keys reused one level
    down) collide; a flat dict of such keys cannot."""
    out = {}
    if isinstance(obj, dict) or (isinstance(obj, list) and any(isinstance(v, dict) for v in obj)):
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        out[prefix + "/#"] = ("dict" if isinstance(obj, dict) else "list", len(obj))
        for k, v in items:
            tag = f"i{k}" if isinstance(k, int) else f"s.{k}"
            out.update(flatten(v, f"{prefix}/{tag}"))
    else:
        out[prefix] = obj
    return out


def unflatten(flat: dict, prefix: str = ""):
    if prefix + "/#" not in flat:
        return flat[prefix]
    kind, _ = flat[prefix + "/#"]
    head = prefix + "/"
    tags = []
    for key in flat:
        if key.startswith(head) and key != prefix + "/#":
            tag = key[len(head):].split("/", 1)[0]
            if tag not in tags:
                tags.append(tag)
    if kind == "list":
        return [unflatten(flat, head + t) for t in sorted(tags, key=lambda t: int(t[1:]))]
    return {(int(t[1:]) if t[0] == "i" else t[2:]): unflatten(flat, head + t) for t in tags}


def _fsync_dir(path: str) -> None:
    for name in os.listdir(path):
        p = os.path.join(path, name)
        if os.path.isfile(p):
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
