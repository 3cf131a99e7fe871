"""The JSON report of bench.gpu_check: one record per section, written to disk after every section.

A section records checks (pass/fail against a stated bound), measurements (numbers reported, not
judged), the tolerances it used with where each comes from, and the parts it skipped with why.
The file is replaced atomically (``.tmp`` + ``os.replace``) each time, so a run that is cut short
leaves the report of every section that finished, and the name of the one that was running.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field


class Skip(Exception):
    """Raised by a section that cannot run here; its message is the reason."""


@dataclass
class Check:
    name: str
    ok: bool
    value: object = None
    bound: object = None
    note: str = ""


@dataclass
class SectionRecord:
    name: str
    title: str
    correctness: bool  # a failure here makes the run exit 1
    time_limit_s: float
    status: str = "running"  # running | pass | fail | skip
    reason: str = ""
    seconds: float = 0.0
    checks: list[Check] = field(default_factory=list)
    measurements: dict = field(default_factory=dict)
    tolerances: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)  # part -> why

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def time_left(self) -> float:
        """Seconds left of the section's limit (its whole limit before ``start``)."""
        return self.time_limit_s - (time.perf_counter() - getattr(self, "_t0", time.perf_counter()))

    def check(self, name: str, ok: bool, value=None, bound=None, note: str = "") -> bool:
        self.checks.append(Check(name, bool(ok), _plain(value), _plain(bound), note))
        return bool(ok)

    def measure(self, **values) -> None:
        self.measurements.update({k: _plain(v) for k, v in values.items()})

    def tolerance(self, name: str, value, source: str) -> None:
        self.tolerances[name] = {"value": _plain(value), "source": source}

    def skip_part(self, part: str, why: str) -> None:
        self.skipped[part] = why

    @property
    def failed_checks(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    @classmethod
    def from_dict(cls, d: dict) -> "SectionRecord":
        """A record written by ``to_dict`` (a section run in a process of its own)."""
        rec = cls(d["name"], d["title"], d["correctness"], d["time_limit_s"])
        rec.status, rec.reason, rec.seconds = d["status"], d["reason"], d["seconds"]
        rec.checks = [Check(**c) for c in d["checks"]]
        rec.measurements, rec.tolerances, rec.skipped = d["measurements"], d["tolerances"], d["skipped"]
        return rec

    def to_dict(self) -> dict:
        d = asdict(self)
        d["seconds"] = round(self.seconds, 3)
        return d


def _plain(v):
    """JSON-safe: tensors and numpy numbers as Python numbers, non-finite floats as strings."""
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


class Report:
    def __init__(self, path: str, header: dict):
        self.path = path
        self.header = header
        self.sections: list[SectionRecord] = []
        self.started = time.time()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def add(self, rec: SectionRecord) -> None:
        self.sections.append(rec)
        self.write()

    def write(self, finished: bool = False, exit_code: int | None = None) -> None:
        data = {**self.header, "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)),
                "elapsed_s": round(time.time() - self.started, 2), "finished": finished, "exit_code": exit_code,
                "sections": [s.to_dict() for s in self.sections]}
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, default=str)
        os.replace(tmp, self.path)


def exit_code(sections: list[SectionRecord]) -> int:
    """1 when a correctness section failed (or never finished), else 0."""
    return int(any(s.correctness and s.status in ("fail", "running") for s in sections))


def table(sections: list[SectionRecord]) -> str:
    lines = [f"{'section':<10} {'status':<6} {'seconds':>8}  {'checks':>7}  summary"]
    for s in sections:
        n_ok = sum(c.ok for c in s.checks)
        kind = "" if s.correctness else " (measurement)"
        if s.status == "fail":
            bad = s.failed_checks
            summary = s.reason or "; ".join(f"{c.name}: {c.value} (bound {c.bound})" for c in bad[:3])
        elif s.status == "skip":
            summary = s.reason
        else:
            summary = s.reason or _headline(s)
        if s.skipped and s.status != "skip":
            summary += f" [skipped: {', '.join(s.skipped)}]"
        lines.append(f"{s.name:<10} {s.status:<6} {s.seconds:8.1f}  {n_ok:>3}/{len(s.checks):<3}  {summary[:150]}{kind}")
    return "\n".join(lines)


def _headline(s: SectionRecord) -> str:
    keys = s.measurements.get("_headline", [])
    return ", ".join(f"{k} {_short(s.measurements.get(k))}" for k in keys)


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)
