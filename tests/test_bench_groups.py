"""bench.groups at toy size: k = 4 records built from HH transcripts (a fixture over the synthetic
vocabulary), metarm-fast training them as groups against TRL on their flattened pairs. Checks that
both sides train on the same ordered pairs every step, and that the tokens each side's model ran
(the hook on its input embedding) are the counts made by hand from the records: the prompt once
per record in share-prompt, twice per pair in TRL's padded pairs."""
from __future__ import annotations

import gzip
import importlib.util
import json
from collections import Counter

import pytest

from bench import groups
from bench.hh_groups import hh_groups
from metarm_fast.synthetic import VOCAB

HAS_TRL = importlib.util.find_spec("trl") is not None
N_RECORDS, BATCH, STEPS = 24, 2, 2
PAIRS_PER_RECORD = 5  # scores (1, 0.5, 0, 0): 1 > 0.5, 1 > 0 twice, 0.5 > 0 twice


def _words(start: int, n: int) -> str:
    return " ".join(VOCAB[(start + j) % len(VOCAB)] for j in range(n))


def _hh_file(tmp_path) -> str:
    recs = []
    for i in range(N_RECORDS):
        prompt = f"\n\nHuman: {_words(5 * i, 3 + i % 6)}\n\nAssistant:"
        recs.append({"chosen": prompt + " " + _words(7 * i, 1 + i % 5),
                     "rejected": prompt + " " + _words(7 * i + 31, 2 + i % 4)})
    path = tmp_path / "hh.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    return str(path)


def _tokens(record: dict) -> tuple[int, tuple[int, ...]]:
    """(prompt, responses) token counts of a record by hand: the synthetic tokenizer splits on
    whitespace (one token a word), the encoder adds bos before the prompt and eos after a response."""
    return 1 + len(record["prompt"].split()), tuple(sorted(len(r.split()) + 1 for r in record["responses"]))


@pytest.fixture(scope="module")
def hh(tmp_path_factory):
    return _hh_file(tmp_path_factory.mktemp("hh"))


@pytest.fixture(scope="module")
def result(hh):
    methods = "vanilla,metarm" + (",trl" if HAS_TRL else "")
    return groups.main(["--data", hh, "--hidden", "32", "--layers", "2", "--batch", str(BATCH), "--steps", str(STEPS),
                        "--warmup", "1", "--threads", "1", "--max-length", "64", "--methods", methods])


def test_k4_records_follow_the_documented_rule(hh):
    recs = hh_groups(hh, 4)
    src = [json.loads(line) for line in gzip.open(hh, "rt")]
    assert len(recs) == N_RECORDS
    chosen = {s["chosen"].split("Assistant:")[-1] for s in src}
    rejected = {s["rejected"].split("Assistant:")[-1] for s in src}
    for rec, s in zip(recs, src):
        c, a, r, b = rec["responses"]
        assert rec["scores"] == [1.0, 0.5, 0.0, 0.0]
        assert s["chosen"] == rec["prompt"] + c and s["rejected"] == rec["prompt"] + r  # its own pair
        assert a in chosen and b in rejected and len({c, a, r, b}) == 4  # extras from other records, all distinct
    assert [len(g["responses"]) for g in hh_groups(hh, 3)] == [3] * N_RECORDS


def test_both_sides_train_on_the_same_pairs(result):
    rows = {r["method"]: r for r in result["rows"]}
    assert not result["skipped"], result["skipped"]
    assert set(rows) == {"vanilla", "metarm"} | ({"trl"} if HAS_TRL else set())
    for name, row in rows.items():
        # what each step says it trained on (group_pass's count; TRL's batch rows) = the records' own pairs
        assert row["trained_pairs_steps"] == [BATCH * PAIRS_PER_RECORD] * STEPS, name
        assert row["expected_pairs_steps"] == row["trained_pairs_steps"], name
        assert row["pairs_per_step"] == BATCH * PAIRS_PER_RECORD
        assert row["records_per_step"] == BATCH
    if HAS_TRL:
        assert rows["trl"]["micro_batches_per_step"] == BATCH  # one record's pairs a micro-batch
        # same initial weights, same pairs, the same loss (mean over records of the mean over their pairs)
        assert rows["trl"]["first_loss"] == pytest.approx(rows["vanilla"]["first_loss"], rel=1e-5)
        for q in result["ratios"]:
            p = q["pairs_per_s_ratio"]
            assert q["same_pairs_every_step"] and p["n"] == STEPS
            assert 0 < p["min"] <= p["ci95"][0] <= p["median"] <= p["ci95"][1] <= p["max"]


def test_tokens_computed_match_a_count_by_hand(result, hh):
    rows = {r["method"]: r for r in result["rows"]}
    # the records the steps trained on are the rule's, tokenized as the hand count says
    built = Counter(_tokens(g) for g in hh_groups(hh, 4))
    for i, recs in result["records"].items():
        assert not Counter((g["prompt"], tuple(sorted(g["responses"]))) for g in recs) - built, i
    steps = rows["vanilla"]["step_index"]
    for n, i in enumerate(steps):
        recs = result["records"][i]
        shared = sum(g["prompt"] + sum(g["responses"]) for g in recs)  # the prompt once per record
        assert rows["vanilla"]["tokens_computed_steps"][n] == shared
        assert rows["metarm"]["tokens_computed_steps"][n] == 2 * shared  # the meta pass: the same records
        if HAS_TRL:  # each pair holds the prompt; a micro-batch (one record's pairs) pads to its longest
            pairs = [(g["prompt"], a, b) for g in recs for a, sa in zip(g["responses"], g["scores"])
                     for b, sb in zip(g["responses"], g["scores"]) if sa > sb]
            padded = sum(2 * PAIRS_PER_RECORD * (g["prompt"] + max(g["responses"])) for g in recs)
            assert len(pairs) == BATCH * PAIRS_PER_RECORD
            assert rows["trl"]["tokens_computed_steps"][n] == padded
    if HAS_TRL:
        real = [sum(2 * g["prompt"] + a + b for g in result["records"][i]
                    for a, sa in zip(g["responses"], g["scores"]) for b, sb in zip(g["responses"], g["scores"]) if sa > sb)
                for i in steps]
        assert rows["trl"]["tokens_real_per_step"] == pytest.approx(sum(real) / len(real))


def test_mfu_on_every_row(result):
    assert result["peak_flops"] > 0
    for row in result["rows"]:
        assert row["mfu"] is not None and 0 < row["mfu"]["median"] < 1.5, row["method"]


def test_trl_micro_batch_must_divide_a_step():
    with pytest.raises(SystemExit):
        groups.trl_batches([[[_group()]]], micro=3)  # 5 pairs in a step


def _group():
    from metarm_fast.batch import EncodedGroup
    from metarm_fast.data import EncodedSeq

    return EncodedGroup([EncodedSeq([1, 2], [3 + i]) for i in range(4)], (1.0, 0.5, 0.0, 0.0))


def test_flatten_gives_the_ordered_pairs_of_different_scores():
    g = _group()
    pairs = groups.flatten(g)
    assert [(p.chosen.response_ids[0], p.rejected.response_ids[0]) for p in pairs] == [(3, 4), (3, 5), (3, 6), (4, 5), (4, 6)]
