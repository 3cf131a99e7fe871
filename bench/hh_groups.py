"""k-response records of HH length, built from HH-RLHF's pairs, for bench.groups.

The HH slice has almost no repeated prompt (2 of its 2,302 prompts appear twice), so a record's extra
responses come from other records. The rule (deterministic, no randomness): split each record into
prompt, chosen and rejected (bench.hh_records.split_hh), order the records by the character length
of chosen + rejected (ties: file order), and give the record at place q of that order, k = 2, 3 or 4:

  responses  chosen (score 1), [extra A (0.5)], rejected (0), [extra B (0)]
  extra A    (k >= 3) the chosen response of the record at q+1, the next longer
  extra B    (k = 4) the rejected response of the record at q-1, the next shorter

(the order is cyclic: the longest record's next is the shortest); an extra whose text is already one
of the record's responses is replaced by the next record further along in the same direction. So
the extras are of similar length to the record's own responses, and k = 4 gives 5 ordered pairs of
different scores per record (1 > 0.5, 1 > 0 twice, 0.5 > 0 twice; the two zeros tie: no pair),
k = 3 gives 3, k = 2 gives the record's own pair. The records keep file order, in the generic
"ranked" format ({"prompt", "responses", "scores"}, read by metarm_fast.data).
"""
from __future__ import annotations

import json

from bench.hh_records import split_hh

SCORES = {2: (1.0, 0.0), 3: (1.0, 0.5, 0.0), 4: (1.0, 0.5, 0.0, 0.0)}


def _extra(texts: list[str], q: int, step: int, taken: list[str]) -> str:
    n = len(texts)
    for d in range(1, n):
        t = texts[(q + step * d) % n]
        if t not in taken:
            return t
    raise ValueError("no response left that differs from the record's own")


def hh_groups(path: str, k: int = 4) -> list[dict]:
    """The k-response records of the module docstring, one per usable HH record, in file order."""
    if k not in SCORES:
        raise ValueError(f"k must be one of {sorted(SCORES)}, got {k}")
    recs = [(p, c, r) for _, p, c, r in split_hh(path)]
    if len(recs) < 3:
        raise ValueError(f"{path}: {len(recs)} usable HH records; k-response records need at least 3")
    order = sorted(range(len(recs)), key=lambda i: (len(recs[i][1]) + len(recs[i][2]), i))
    chosen = [recs[i][1] for i in order]
    rejected = [recs[i][2] for i in order]
    out: list[dict | None] = [None] * len(recs)
    for q, i in enumerate(order):
        prompt, c, r = recs[i]
        responses = [c, r]
        if k >= 3:
            responses.insert(1, _extra(chosen, q, +1, responses))
        if k == 4:
            responses.append(_extra(rejected, q, -1, responses))
        out[i] = {"prompt": prompt, "responses": responses, "scores": list(SCORES[k])}
    return out


def write_groups(path: str, out_path: str, k: int = 4) -> int:
    """Write the records to `out_path` (jsonl); returns how many."""
    groups = hh_groups(path, k)
    with open(out_path, "w") as f:
        f.writelines(json.dumps(g) + "\n" for g in groups)
    return len(groups)
