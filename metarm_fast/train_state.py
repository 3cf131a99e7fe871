"""A run's progress (``TrainState``) and the resume checkpoints that hold it with the weights
(``Checkpointer``): everything an exact continuation needs, written with
torch.distributed.checkpoint between steps, never between perturb and restore."""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import torch

from metarm_fast import checkpoint as ckpt
from metarm_fast.weights import Weights


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    pairs_done: int = 0
    train_seconds: float = 0.0
    warned_vanished: bool = False  # the rounding warning (a vanished or a rounding-dominated perturbation) is given once per run
    best_eval_accuracy: float = -1.0  # of the --keep-best export; -1: none yet

    @property
    def pairs_per_s(self) -> float:
        return self.pairs_done / max(self.train_seconds, 1e-9)


class Checkpointer:
    def __init__(self, root: str, cfg, weights: Weights, optimizer, scheduler, state: TrainState, *,
                 keep_last: int = 0, info=None):
        self.root, self.cfg, self.weights = root, cfg, weights
        self.optimizer, self.scheduler, self.state = optimizer, scheduler, state
        self.keep_last, self.info = keep_last, info

    def state_dict(self) -> dict:
        """A DCP state dict: nested dicts of tensors and values."""
        sd = self.weights.state_dict()
        sd["optimizer"] = ckpt.flatten(self.optimizer.state_dict())
        sd["scheduler"] = self.scheduler.state_dict()
        sd["train"] = {
            **dataclasses.asdict(self.state),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            "config": self.cfg.to_dict(),
            "layout": self.weights.layout,
        }
        return sd

    def save(self) -> str:
        return ckpt.save_checkpoint(self.root, self.state.step, self.state_dict(), self.keep_last, info=self.info)

    def step_dir(self) -> str:
        return ckpt.step_dir(self.root, self.state.step)

    def load(self, path: str) -> None:
        """Continue from the checkpoint at ``path`` (refuses one whose run settings differ)."""
        self.weights.init_optimizer_state(self.optimizer)
        sd = self.state_dict()
        probe = {"train": {"config": sd["train"]["config"], "layout": sd["train"]["layout"]}}
        # Partial: a setting added after the checkpoint was written is missing from its config, and
        # compared as "not saved" (run_differences looks at the settings both have).
        ckpt.load_checkpoint(path, probe, partial=True)
        diff = self.cfg.run_differences(probe["train"]["config"])
        if diff:
            saved = probe["train"]["config"]
            raise ValueError(
                f"--resume {path}: the checkpoint was written by a run with other settings: "
                + ", ".join(f"{k}={saved[k]!r} (now {getattr(self.cfg, k)!r})" for k in diff)
                + "; resume with the same settings, or start a new run in another --output-dir"
            )
        self.weights.adopt_layout(sd, probe["train"]["layout"])
        del sd["train"]["config"]  # compared above; strict from here: every tensor must be in the checkpoint
        ckpt.load_checkpoint(path, sd)
        self.weights.after_load()
        self.optimizer.load_state_dict(ckpt.unflatten(sd["optimizer"]))
        self.scheduler.load_state_dict(sd["scheduler"])
        t = sd["train"]
        s = self.state
        s.step, s.warned_vanished = int(t["step"]), bool(t["warned_vanished"])
        s.pairs_done, s.train_seconds = int(t["pairs_done"]), float(t["train_seconds"])
        s.best_eval_accuracy = float(t["best_eval_accuracy"])
        torch.set_rng_state(t["torch_rng"])
        random.setstate(t["python_rng"])
