"""The run folder: what a run writes where, and the rules for starting, resuming and overwriting."""
from __future__ import annotations

import json
import os
import shutil

from metarm_fast import checkpoint as ckpt
from metarm_fast.config import TrainConfig
from metarm_fast.lora import ADAPTER_DIR
from metarm_fast.parallel import broadcast_object
from metarm_fast.plots import GAP_HISTOGRAM, TRAINING_CURVES
from metarm_fast.tracking import TENSORBOARD_DIR

METRICS = "metrics.jsonl"
CONFIG = "metarm_fast_config.yaml"
CHECKPOINTS = "checkpoints"
INITIAL_GAPS = "meta_reward_gaps_initial.pt"  # the baseline of the gap histogram, kept across a resume
BEST = "best"  # --keep-best's export

_RUN_FILES = (METRICS, CONFIG, CHECKPOINTS, "config.json", "model.safetensors", GAP_HISTOGRAM, TRAINING_CURVES,
              INITIAL_GAPS, BEST, TENSORBOARD_DIR, ADAPTER_DIR, "wandb")


def check_output_dir(cfg: TrainConfig) -> None:
    """Before anything slow: --output-dir must be a folder, or a path where one can be made."""
    out = cfg.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--output-dir {out}: is a file, not a folder; name a folder (it is made if missing)")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"--output-dir {out}: {parent} is a file, so the folder cannot be made")


def prepare_output_dir(cfg: TrainConfig) -> str | None:
    """Decide between a fresh start and a resume; returns the checkpoint to resume from, or None.

    A fresh start into a folder holding another run's files stops with a message (``--overwrite``
    removes them first). ``--resume auto`` takes the latest complete checkpoint, or starts fresh when
    there is none (over a run of the same settings that crashed before its first checkpoint)."""
    out = cfg.output_dir
    root = os.path.join(out, CHECKPOINTS)
    if cfg.resume and cfg.resume != "auto":
        path = cfg.resume
        if not os.path.isfile(os.path.join(path, ".metadata")):
            latest = ckpt.latest_checkpoint(path) or ckpt.latest_checkpoint(os.path.join(path, CHECKPOINTS))
            if latest is None:
                raise ValueError(f"--resume {path}: no complete checkpoint there (a checkpoint is a "
                                 f"{CHECKPOINTS}/step-NNNNNNNN folder written by --save-every or a stop)")
            path = latest
        return path
    if cfg.resume == "auto":
        latest = ckpt.latest_checkpoint(root)
        if latest:
            return latest
    present = [f for f in _RUN_FILES if os.path.exists(os.path.join(out, f))]
    if present and not cfg.overwrite:
        same = cfg.resume == "auto" and _saved_config_matches(cfg)
        if not same:
            raise ValueError(f"output dir {out} holds another run's files ({', '.join(present)}); pass --overwrite "
                             "to replace them, --resume auto to continue that run, or another --output-dir")
    for f in present:
        p = os.path.join(out, f)
        shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    return None


def agree_on_start(cfg: TrainConfig, dist) -> str | None:
    """``prepare_output_dir`` decided by rank 0 alone and told to every rank (its refusal too)."""
    decision = None
    if dist.is_main:
        try:
            decision = ("resume", prepare_output_dir(cfg))
        except ValueError as e:
            decision = ("error", str(e))
    kind, value = broadcast_object(decision, dist)
    if kind == "error":
        raise ValueError(value)
    return value


def _saved_config_matches(cfg: TrainConfig) -> bool:
    import yaml

    path = os.path.join(cfg.output_dir, CONFIG)
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        saved = yaml.safe_load(f) or {}
    return not cfg.run_differences(saved)


def write_config(cfg: TrainConfig) -> None:
    import yaml

    os.makedirs(cfg.output_dir, exist_ok=True)
    path = os.path.join(cfg.output_dir, CONFIG)
    with open(path + ".tmp", "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    os.replace(path + ".tmp", path)


def open_metrics(out_dir: str, step: int):
    """metrics.jsonl for appending, holding exactly the lines of steps 1..``step`` (a resume drops the
    lines a crashed run wrote after its last checkpoint)."""
    path = os.path.join(out_dir, METRICS)
    kept = []
    if step > 0 and os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
                if "step" in rec and rec["step"] <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)
    return open(path, "a")
