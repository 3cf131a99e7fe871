"""The records every loader produces, the error a bad record raises, and the report of a load.

A prompt is either plain text or a tuple of chat messages (``{"role": ..., "content": ...}`` dicts,
nothing else kept). Plain-text HH-RLHF prompts keep the transcript verbatim up to and including
the last ``"\\n\\nAssistant:"``, so for those ``prompt + chosen`` is the original chosen transcript.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

Prompt = str | tuple[dict, ...]

# The hint every skippable error ends with: what the user can do about it.
SKIP_HINT = "fix or remove the record, or pass on_bad_record='skip' (--on-bad-record skip) to skip such records"


@dataclass(frozen=True)
class PreferencePair:
    """One labelled comparison: ``chosen`` was preferred to ``rejected`` as answers to ``prompt``.

    ``chosen``/``rejected`` hold the assistant response text only. ``margin`` is an optional
    per-pair margin for the Bradley-Terry loss. ``source`` says where the pair came from
    ("file:line N", "file:record N", "hub-name[split]:record N").
    Chat prompts hold dicts, so a pair with a chat prompt cannot be hashed.
    """

    prompt: Prompt
    chosen: str
    rejected: str
    margin: float | None = None
    source: str = ""


@dataclass(frozen=True)
class MetaGroup:
    """One prompt of the meta set with k >= 1 unlabelled responses (k may differ between prompts)."""

    prompt: Prompt
    responses: tuple[str, ...]
    source: str = ""


@dataclass(frozen=True)
class RankedGroup:
    """One prompt with k >= 2 labelled responses: ``scores[i]`` is response i's level, higher is
    better (ranks are stored negated). Responses of equal score are ties: they give no pair."""

    prompt: Prompt
    responses: tuple[str, ...]
    scores: tuple[float, ...]
    source: str = ""


class DataError(ValueError):
    """Bad input. The message names the file, the line or record, the field, and what to do.

    ``reason`` is a short key ("empty response", "identical responses", ...) that a skipping load
    counts in ``LoadReport.skipped``; ``location`` and ``field`` are kept for programs.
    """

    def __init__(self, message: str, *, location: str = "", field: str | None = None, reason: str = "bad record"):
        super().__init__(message)
        self.location = location
        self.field = field
        self.reason = reason


def bad_record(location: str, field: str | None, problem: str, reason: str, hint: str = SKIP_HINT) -> DataError:
    """A DataError for one record: "<file>:line 7: field 'chosen': <problem>; <hint>"."""
    where = f"{location}: field '{field}'" if field else location
    return DataError(f"{where}: {problem}; {hint}", location=location, field=field, reason=reason)


@dataclass
class LoadReport:
    """What a load read, kept and skipped (reason -> count). Nothing is dropped without a count."""

    path: str
    format: str
    records_read: int = 0
    loaded: int = 0
    skipped: Counter = field(default_factory=Counter)
    kind: str = "pairs"  # what `loaded` counts: "pairs", "groups" or "prompts"
    duplicates: int = 0  # load_prompts only: repeated prompts merged into one

    def summary(self) -> str:
        """One line, e.g. "read 120 records from x.jsonl (hh-rlhf): 117 pairs, skipped 3 (2 identical
        responses, 1 empty response)"."""
        n_skipped = sum(self.skipped.values())
        kind = self.kind[:-1] if self.loaded == 1 and self.kind.endswith("s") else self.kind
        line = f"read {self.records_read} records from {self.path} ({self.format}): {self.loaded} {kind}"
        if self.duplicates:
            line += f" ({self.duplicates} duplicate{'s' if self.duplicates != 1 else ''} merged)"
        line += f", skipped {n_skipped}"
        if n_skipped:
            reasons = ", ".join(f"{n} {_plural(reason, n)}" for reason, n in self.skipped.most_common())
            line += f" ({reasons})"
        return line


def _plural(reason: str, n: int) -> str:
    """'empty response' -> 'empty responses' when counting more than one (reasons are nouns)."""
    if n == 1 or reason.endswith("s"):
        return reason
    return reason + ("es" if reason.endswith(("ch", "sh", "x")) else "s")
