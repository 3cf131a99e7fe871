"""`metarm-fast eval` on RewardBench-style records (fixtures written here): per-subset accuracy,
RewardBench 1's section weighting, and RewardBench 2's scoring (fractional credit on exact ties, the
Ties subset's weighted score, the unweighted mean over subsets), checked against pairwise scoring
and against the published formulas written out again below."""
import json
import math
import random
from statistics import fmean

import numpy as np
import pytest

from metarm_fast.cli import main
from metarm_fast.data import DataError, MetaGroup, PreferencePair
from metarm_fast.data.formats import Loc
from metarm_fast.evaluate import load_checkpoint, score_groups, score_pairs
from metarm_fast.model import build_tiny_llama
from metarm_fast.rewardbench import EXAMPLE_COUNTS, comparisons_from_records, report
from metarm_fast.synthetic import VOCAB, SyntheticTask


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import torch

    d = tmp_path_factory.mktemp("rm")
    tok = SyntheticTask(0).tokenizer()
    torch.manual_seed(3)
    build_tiny_llama(len(tok), tok.pad_token_id, layers=1, hidden=32).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def _text(rng, n):
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _eval(capsys, model_dir, data):
    assert main(["eval", "--model", model_dir, "--data", data]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _wins(model_dir, pairs):
    model, tok = load_checkpoint(model_dir)
    rc, rr, _ = score_pairs(model, tok, pairs)
    return (rc > rr).tolist()


def test_rewardbench1_subsets_and_weighted_sections(tmp_path, capsys, model_dir):
    rng = random.Random(0)
    subsets = ["alpacaeval-easy"] * 9 + ["mt-bench-easy"] * 7 + ["math-prm"] * 8 + ["hep-go"] * 6 + ["mine"] * 5
    records = [{"prompt": _text(rng, 5), "chosen": _text(rng, 6), "rejected": _text(rng, 4), "subset": s, "id": i}
               for i, s in enumerate(subsets)]
    out = _eval(capsys, model_dir, _write(tmp_path / "rb1.jsonl", records))
    wins = _wins(model_dir, [PreferencePair(r["prompt"], r["chosen"], r["rejected"]) for r in records])
    acc = {s: sum(w for w, t in zip(wins, subsets) if t == s) / subsets.count(s) for s in set(subsets)}
    assert {s: v["accuracy"] for s, v in out["subsets"].items()} == pytest.approx(acc)
    assert out["subsets"]["mt-bench-easy"]["records"] == 7
    c = EXAMPLE_COUNTS
    chat = (acc["alpacaeval-easy"] * c["alpacaeval-easy"] + acc["mt-bench-easy"] * c["mt-bench-easy"]) / (
        c["alpacaeval-easy"] + c["mt-bench-easy"])
    reasoning = (acc["math-prm"] * 984 + acc["hep-go"] * 164) / (984 + 164)
    assert out["sections"] == pytest.approx({"Chat": chat, "Reasoning": reasoning})
    assert out["score"] == pytest.approx((chat + reasoning) / 2)
    assert out["not_in_a_section"] == ["mine"] and out["kind"].startswith("RewardBench 1")
    assert 0 < sum(wins) < len(wins)  # the fixture has wins and losses, so the accuracies can be wrong


def test_rewardbench2_best_of_4(tmp_path, capsys, model_dir):
    rng = random.Random(1)
    subsets = ["Factuality"] * 12 + ["Math"] * 10
    records = [{"prompt": _text(rng, 5), "chosen": [_text(rng, 5)], "rejected": [_text(rng, 3 + j) for j in range(3)],
                "subset": s, "id": str(i)} for i, s in enumerate(subsets)]
    out = _eval(capsys, model_dir, _write(tmp_path / "rb2.jsonl", records))
    wins = _wins(model_dir, [PreferencePair(r["prompt"], r["chosen"][0], rej) for r in records for rej in r["rejected"]])
    correct = [all(wins[3 * i : 3 * i + 3]) for i in range(len(records))]
    acc = {s: sum(w for w, t in zip(correct, subsets) if t == s) / subsets.count(s) for s in set(subsets)}
    assert {s: v["accuracy"] for s, v in out["subsets"].items()} == pytest.approx(acc)
    assert out["score"] == pytest.approx(sum(acc.values()) / 2)
    assert "best of 4" in out["kind"]
    assert any(correct) and not all(correct) and sum(correct) < sum(wins)  # the fixture tells the rules apart


def test_rewardbench_bad_record_names_the_line_and_field(tmp_path, capsys, model_dir):
    data = _write(tmp_path / "bad.jsonl", [{"prompt": "w01", "chosen": "w02", "rejected": "w03", "subset": "x"},
                                          {"prompt": "w01", "chosen": [], "rejected": "w03", "subset": "x"}])
    assert main(["eval", "--model", model_dir, "--data", data]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:line 2" in err and "'chosen'" in err
    # skipped on request, and counted
    assert main(["eval", "--model", model_dir, "--data", data, "--on-bad-record", "skip"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["records"] == 1 and out["skipped"] == {"wrong-type field": 1}


def test_rewardbench_file_with_no_usable_record_is_named(tmp_path, capsys, model_dir):
    data = _write(tmp_path / "allbad.jsonl", [{"prompt": "w01", "chosen": [], "rejected": "w03", "subset": "x"}])
    assert main(["eval", "--model", model_dir, "--data", data, "--on-bad-record", "skip"]) == 2
    err = capsys.readouterr().err
    assert "allbad.jsonl: no usable RewardBench records" in err and "wrong-type field" in err


# -- RewardBench 2 as published, written out again (allenai/reward-bench: rewardbench/utils.py,
# reroll_and_score_dataset for the per-record credit and process_single_model for Ties, as
# scripts/run_v2.py applies them; the dataset card: the leaderboard averages the six subsets) ------


def _published_credit(r):
    """1 / (how many responses share the top reward) when the first response has it, else 0."""
    return 1.0 / r.count(max(r)) if r[0] == max(r) else 0.0


def _published_ties(rows):
    """rows: (record, rewards). Per prompt: gap = worst correct - best incorrect, spread = best
    correct - worst correct; 30% tied and 30% ref accuracy (gap > 0), 20% gap_tied > spread, 20%
    min(gap_ref, gap_tied) > spread, 1% tanh(min gap / spread - 1) with NaN as 0 (numpy's division)."""
    ref, tied = {}, {}
    for rec, r in rows:
        kind, number = rec["id"].split(":")
        good, bad = r[: rec["num_correct"]], r[rec["num_correct"] :]
        (ref if kind == "ref" else tied)[int(number)] = (min(good) - max(bad), max(good) - min(good))
    both = sorted(ref.keys() & tied.keys())
    with np.errstate(divide="ignore", invalid="ignore"):
        margins = [np.tanh(np.float64(min(ref[n][0], tied[n][0])) / np.float64(tied[n][1]) - 1) for n in both]
    return (0.3 * fmean(g > 0 for g, _ in tied.values()) + 0.3 * fmean(g > 0 for g, _ in ref.values())
            + 0.2 * fmean(tied[n][0] > tied[n][1] for n in both)
            + 0.2 * fmean(min(ref[n][0], tied[n][0]) > tied[n][1] for n in both)
            + 0.01 * fmean(0.0 if math.isnan(m) else float(m) for m in margins))


def _published_rb2(records, rewards):
    """({subset: score}, overall): Ties by its formula, the rest by the mean credit; overall the plain mean."""
    rows = {}
    for rec, r in zip(records, rewards):
        rows.setdefault(rec["subset"], []).append((rec, list(r)))
    scores = {s: _published_ties(v) if s.lower() == "ties" else fmean(_published_credit(r) for _, r in v)
              for s, v in rows.items()}
    return scores, fmean(scores.values())


def _rb2_record(i, subset, chosen, rejected, record_id=None):
    return {"id": record_id if record_id is not None else str(i), "prompt": f"w0{i % 9 + 1} w10",
            "chosen": chosen, "rejected": rejected, "num_correct": len(chosen), "num_incorrect": len(rejected),
            "total_completions": len(chosen) + len(rejected), "subset": subset}


def _comparisons(records):
    return comparisons_from_records([(Loc("fixture", "record", i + 1), r) for i, r in enumerate(records)])[0]


# Rewards written by hand: exact ties, several chosen in a plain subset, and a Ties subset whose
# prompts exercise every term (a tied prompt without a ref, correct answers tied exactly, 0/0).
HAND = [  # (subset, id, n_chosen, rewards)
    ("Factuality", None, 1, [2.0, 2.0, 1.0, 0.5]),  # top shared by 2 incl. the chosen: 1/2
    ("Factuality", None, 1, [1.5, 1.5, 1.5, 1.5]),  # all four tie: 1/4
    ("Factuality", None, 1, [1.0, 3.0, 1.0, 0.0]),  # a rejected on top: 0
    ("Factuality", None, 1, [3.0, 1.0, 1.0, 1.0]),  # 1
    ("Math", None, 2, [1.0, 5.0, 0.0, 0.2]),  # the second chosen on top: 0 (only the first counts)
    ("Math", None, 2, [5.0, 5.0, 0.0, 0.1]),  # the two chosen share the top: 1/2
    ("Ties", "ref:0", 1, [3.0, 1.0, 2.0, 0.0]),  # gap 1
    ("Ties", "tied:0", 3, [4.0, 3.5, 3.0, 2.5, 1.0]),  # spread 1, gap 0.5
    ("Ties", "ref:1", 1, [1.0, 2.0, 0.0]),  # gap -1
    ("Ties", "tied:1", 2, [5.0, 5.0, 1.0]),  # spread 0, gap 4: margin term tanh(-1/0) = -1
    ("Ties", "ref:2", 1, [2.0, 2.0]),  # gap 0: not accurate
    ("Ties", "tied:2", 2, [1.0, 1.0, 1.0]),  # spread 0, gap 0: 0/0, margin term 0
    ("Ties", "tied:3", 2, [2.0, 1.5, 0.0]),  # no ref:3: in the tied accuracy only
]


def _hand_records():
    return [_rb2_record(i, s, [f"w{j + 2:02d}" for j in range(k)], [f"w{j + 20:02d}" for j in range(len(r) - k)], rid)
            for i, (s, rid, k, r) in enumerate(HAND)]


def test_rewardbench2_scores_by_hand():
    records, rewards = _hand_records(), [r for *_, r in HAND]
    out = report(_comparisons(records), rewards)
    sub = out["subsets"]
    assert sub["Factuality"]["score"] == sub["Factuality"]["accuracy"] == (0.5 + 0.25 + 0 + 1) / 4
    assert sub["Math"]["score"] == 0.25
    # Ties, by hand: tied accuracy 3/4 (tied:0, 1, 3), ref accuracy 1/3 (ref:0); over the prompts 0, 1, 2:
    # gap_tied > spread: F, T, F -> 1/3; min(gap_ref, gap_tied) > spread: min(1, .5) > 1, min(-1, 4) > 0, 0 > 0
    # -> 0; margin terms tanh(0.5 / 1 - 1), -1, 0.
    ties = 0.3 * 0.75 + 0.3 / 3 + 0.2 / 3 + 0.2 * 0 + 0.01 * (math.tanh(-0.5) - 1.0) / 3
    assert ties == pytest.approx(0.3867929428, abs=1e-10)
    assert sub["Ties"]["score"] == pytest.approx(ties, rel=1e-12)
    assert sub["Ties"]["ties"] == pytest.approx({
        "tied_accuracy": 0.75, "ref_accuracy": 1 / 3, "correctness_preferred": 1 / 3,
        "correctness_preferred_hard": 0.0, "margin_score": (math.tanh(-0.5) - 1.0) / 3, "paired_prompts": 3})
    assert sub["Ties"]["accuracy"] == 4 / 7  # records whose every correct answer beats every incorrect one
    assert out["score"] == pytest.approx((0.4375 + 0.25 + ties) / 3, rel=1e-12)  # unweighted mean of subsets
    published, overall = _published_rb2(records, rewards)
    assert {s: v["score"] for s, v in sub.items()} == pytest.approx(published, rel=1e-12)
    assert out["score"] == pytest.approx(overall, rel=1e-12)
    assert "note" not in out and out["kind"] == "RewardBench 2 style (best of 5)"


@pytest.mark.parametrize("case", ["ids without a kind", "no ref prompt", "a tied prompt with one correct answer"])
def test_rewardbench2_ties_without_its_fields_is_scored_per_record_and_says_why(case):
    records, rewards = _hand_records()[6:], [r for *_, r in HAND[6:]]
    if case == "ids without a kind":
        records[0]["id"] = "17"
    elif case == "no ref prompt":
        keep = [i for i, r in enumerate(records) if r["id"].startswith("tied")]
        records, rewards = [records[i] for i in keep], [rewards[i] for i in keep]
    else:
        records[1].update(chosen=["w02"], rejected=["w20", "w21", "w22", "w23"], num_correct=1, num_incorrect=4)
    out = report(_comparisons(records), rewards)
    assert "Ties scored per record" in out["note"] and "ties" not in out["subsets"]["Ties"]
    assert out["subsets"]["Ties"]["score"] == pytest.approx(fmean(_published_credit(r) for r in rewards))


def test_rewardbench2_num_correct_must_match_chosen():
    record = _rb2_record(0, "Ties", ["w02", "w03"], ["w20"], "tied:0")
    record["num_correct"] = 1
    with pytest.raises(DataError, match="'num_correct' is 1 but 'chosen' lists 2"):
        _comparisons([record])


def test_rewardbench2_published_formulas_end_to_end(tmp_path, capsys, model_dir):
    rng = random.Random(2)
    records = []
    for i in range(8):
        records.append(_rb2_record(len(records), ["Factuality", "Focus"][i % 2], [_text(rng, 5)],
                                   [_text(rng, 3 + j) for j in range(3)]))
    same = _text(rng, 4)
    records.append(_rb2_record(len(records), "Focus", [same], [same, same, same]))  # four equal responses
    for n in range(4):
        rejected = [_text(rng, 4) for _ in range(3)]
        records.append(_rb2_record(len(records), "Ties", [_text(rng, 3)], rejected, f"ref:{n}"))
        answers = [_text(rng, 2) for _ in range(2 + n % 2)]
        if n == 0:
            answers[1] = answers[0]  # two correct answers tie exactly: spread 0
        records.append(_rb2_record(len(records), "Ties", answers, [_text(rng, 4) for _ in range(3)], f"tied:{n}"))
    out = _eval(capsys, model_dir, _write(tmp_path / "rb2.jsonl", records))
    model, tok = load_checkpoint(model_dir)
    groups = [MetaGroup(r["prompt"], tuple(r["chosen"] + r["rejected"])) for r in records]
    rewards, _ = score_groups(model, tok, groups)  # the rewards eval saw: same batches, same order
    assert len(set(rewards[8])) == 1  # the fixture's exact tie: the credit is 1/4
    assert rewards[10][0] == rewards[10][1]  # and tied:0's spread is 0
    published, overall = _published_rb2(records, rewards)
    assert {s: v["score"] for s, v in out["subsets"].items()} == pytest.approx(published, rel=1e-9)
    assert out["score"] == pytest.approx(overall, rel=1e-9)
    assert out["score"] == pytest.approx(fmean(v["score"] for v in out["subsets"].values()), rel=1e-12)
    assert out["subsets"]["Ties"]["records"] == 8 and out["subsets"]["Ties"]["ties"]["paired_prompts"] == 4
    assert "note" not in out
