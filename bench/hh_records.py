"""HH-RLHF transcripts split into prompt and responses, for the benches that write their own inputs.

Why not ``metarm_fast.data.load_pairs``: these benches write the records back out as files for the
CLI (its pairs and meta sets), and their published runs used this simpler split (on the HH slice it
keeps one record more than the loader, 2304 against 2303 pairs).
"""
from __future__ import annotations

import gzip
import json
from collections.abc import Iterator

ASSISTANT = "\n\nAssistant:"


def split_hh(path: str) -> Iterator[tuple[dict, str, str, str]]:
    """(record, prompt, chosen response, rejected response) for each record of an HH-RLHF jsonl(.gz)
    whose two transcripts share everything up to the last Assistant turn and whose responses are
    not empty; the others are passed over (the CLI refuses them)."""
    with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as f:
        for line in f:
            rec = json.loads(line)
            c, r = rec["chosen"], rec["rejected"]
            cut = c.rfind(ASSISTANT) + len(ASSISTANT)
            if cut < len(ASSISTANT) or r[:cut] != c[:cut] or not c[cut:].strip() or not r[cut:].strip():
                continue
            yield rec, c[:cut], c[cut:], r[cut:]
