"""What a run reports as it goes: metrics.jsonl, the trackers (--report-to) and the progress bar.

Rank 0 alone writes; on the other ranks every method is a no-op, so the loop calls them without
asking which rank it is on.
"""
from __future__ import annotations

import json
import os

from metarm_fast.run_dir import open_metrics
from metarm_fast.tracking import Trackers, parse_report_to


class RunLog:
    def __init__(self, cfg, step: int, total_steps: int, *, main: bool = True):
        from tqdm.auto import tqdm

        self.main, self.log_every, self.total = main, cfg.log_every, total_steps
        self.metrics = open_metrics(cfg.output_dir, step) if main else None  # resumed: lines 1..step kept
        self.trackers = Trackers(parse_report_to(cfg.report_to) if main else [], cfg.output_dir, cfg.to_dict(), step)
        self.bar = tqdm(total=total_steps, initial=step, disable=not (cfg.progress and main), unit="step",
                        dynamic_ncols=True)
        self.postfix: dict = {}

    def step(self, m: dict, rate: float) -> None:
        """Step ``m["step"]``'s metrics: a metrics line every log_every steps (and at the last step and
        at each evaluation), the trackers, the progress bar."""
        step = m["step"]
        if self.main and (step % self.log_every == 0 or step == self.total or "eval" in m):
            self._write(m)
            self.trackers.log(m)
        if "eval" in m:
            self.postfix["eval_acc"] = f"{m['eval']['accuracy']:.3f}"
        if "loss" in m:
            self.postfix.update(loss=f"{m['loss']:.4f}", acc=f"{m['accuracy']:.2f}", pairs_s=f"{rate:.1f}")
            self.bar.set_postfix(self.postfix)
        self.bar.update(1)

    def final(self, summary: dict) -> None:
        if self.main:
            self._write({"final": summary})

    def durable(self) -> None:
        """Everything written so far is on disk (before a checkpoint claims the step)."""
        if self.main:
            self.metrics.flush()
            os.fsync(self.metrics.fileno())

    def flush(self) -> None:
        if self.main:
            self.metrics.flush()

    def close(self) -> None:
        """Idempotent: the loop's ``finally`` closes whatever is still open."""
        self.bar.close()
        self.trackers.close()
        if self.metrics is not None and not self.metrics.closed:
            self.metrics.close()

    def _write(self, rec: dict) -> None:
        self.metrics.write(json.dumps(rec) + "\n")
        self.metrics.flush()
