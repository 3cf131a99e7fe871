"""Where a run's metrics go besides metrics.jsonl: `--report-to none|tensorboard|wandb|trackio` (a
comma-separated list). Each backend is its own library, installed as an optional extra
(`pip install -e .[tensorboard]`, `.[wandb]`, `.[trackio]`); a named backend that is not installed
stops the run at start, before any slow step.

metrics.jsonl stays the record of the run (one line per logged step, exact across a resume); the
backends get the same numbers as scalars named `train/<metric>` and `eval/<metric>`. On a resume,
tensorboard drops the events written after the checkpoint (``purge_step``), so each step appears
once there too; wandb and trackio runs are keyed by the output folder's name.
"""
from __future__ import annotations

import importlib.util
import os

BACKENDS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}  # name -> module to import
TENSORBOARD_DIR = "tensorboard"

__all__ = ["BACKENDS", "TENSORBOARD_DIR", "parse_report_to", "check_installed", "Trackers", "scalars"]


def parse_report_to(value: str) -> list[str]:
    """The backends named by a --report-to value; 'none' (or empty) is none of them."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    if names in ([], ["none"]):
        return []
    bad = [n for n in names if n not in BACKENDS]
    if bad or "none" in names:
        raise ValueError(f"config: report_to={value!r}: each entry must be one of {', '.join(BACKENDS)} "
                         "(comma-separated), or the value 'none'")
    return list(dict.fromkeys(names))


def check_installed(names: list[str]) -> None:
    missing = [n for n in names if importlib.util.find_spec(BACKENDS[n]) is None]
    if missing:
        raise ValueError(f"--report-to {','.join(missing)}: not installed; pip install "
                         + " ".join(f"'metarm-fast[{n}]'" for n in missing) + " (or drop it from --report-to)")


def scalars(record: dict) -> dict[str, float]:
    """A metrics.jsonl record as flat scalars: top-level numbers under train/, the eval dict under eval/."""
    out = {}
    for k, v in record.items():
        if k == "eval" and isinstance(v, dict):
            out.update({f"eval/{ek}": float(ev) for ek, ev in v.items() if _is_number(ev)})
        elif k != "step" and _is_number(v):
            out[f"train/{k}"] = float(v)
    return out


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class Trackers:
    """The run's backends; ``log(record)`` sends one metrics.jsonl record to each of them."""

    def __init__(self, names: list[str], output_dir: str, config: dict, start_step: int = 0):
        check_installed(names)
        self.names = names
        self._tb = self._wandb = self._trackio = None
        run = os.path.basename(os.path.abspath(output_dir))
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            # A resume from step s drops the events a crashed run wrote after s (tensorboard purges
            # steps >= purge_step); step s itself was logged before its checkpoint and stays.
            self._tb = SummaryWriter(os.path.join(output_dir, TENSORBOARD_DIR),
                                     purge_step=start_step + 1 if start_step else None)
        if "wandb" in names:
            import wandb

            self._wandb = wandb.init(project="metarm-fast", name=run, id=_safe_id(run), resume="allow",
                                     dir=output_dir, config=config)
        if "trackio" in names:
            import trackio

            self._trackio = trackio
            trackio.init(project="metarm-fast", name=run, config=config, resume="allow")

    def log(self, record: dict) -> None:
        if not self.names:
            return
        values, step = scalars(record), int(record["step"])
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)
        if self._trackio is not None:
            self._trackio.log(values, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._trackio is not None:
            self._trackio.finish()


def _safe_id(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:64] or "run"
