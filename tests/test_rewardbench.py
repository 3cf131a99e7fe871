"""`metarm-fast eval` on RewardBench-style records (fixtures written here): per-subset accuracy,
RewardBench 1's section weighting, and RewardBench 2's best-of-4, checked against pairwise scoring."""
import json
import random

import pytest

from metarm_fast.cli import main
from metarm_fast.data import PreferencePair
from metarm_fast.evaluate import load_checkpoint, score_pairs
from metarm_fast.model import build_tiny_llama
from metarm_fast.rewardbench import EXAMPLE_COUNTS
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
