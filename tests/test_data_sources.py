"""Data as users keep it: save_to_disk folders, folders of files, HelpSteer3, records from Python;
and the bad inputs around a run that must end in one message naming the thing."""
import json

import pytest

from metarm_fast.cli import main
from metarm_fast.config import TrainConfig
from metarm_fast.data import DataError, load_pairs
from metarm_fast.trainer import RewardTrainer
from tests.helpers import tiny_config

ROWS = [{"prompt": f"a b c {i}", "chosen": f"good answer {i}", "rejected": f"bad answer {i}"} for i in range(6)]


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    pairs, rep = load_pairs(str(tmp_path / "ds"))
    assert len(pairs) == 6 and rep.format == "explicit" and pairs[0].chosen == "good answer 0"
    pairs, _ = load_pairs(f"{tmp_path / 'ds'}?split=train")  # the form that once blamed the network
    assert len(pairs) == 6

    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:4]),
                          "test": datasets.Dataset.from_list(ROWS[4:])}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_pairs(str(tmp_path / "dd"))[0]) == 4  # the default split: train
    assert len(load_pairs(str(tmp_path / "dd"), split="test")[0]) == 2
    assert len(load_pairs(f"{tmp_path / 'dd'}?split=test")[0]) == 2
    with pytest.raises(DataError, match=r"without the split 'validation'; its splits are train, test"):
        load_pairs(str(tmp_path / "dd"), split="validation")


def test_folder_of_files_reads_the_split_its_names_say(tmp_path):
    _jsonl(tmp_path / "flat" / "part-0.jsonl", ROWS[:2])
    _jsonl(tmp_path / "flat" / "part-1.jsonl", ROWS[2:])
    pairs, _ = load_pairs(str(tmp_path / "flat"))
    assert [p.chosen for p in pairs] == [r["chosen"] for r in ROWS]  # every file, in name order

    _jsonl(tmp_path / "split" / "train.jsonl", ROWS[:5])
    _jsonl(tmp_path / "split" / "test" / "x.jsonl", ROWS[5:])
    assert len(load_pairs(str(tmp_path / "split"))[0]) == 5
    assert len(load_pairs(f"{tmp_path / 'split'}?split=test")[0]) == 1
    with pytest.raises(DataError, match=r"no file for split 'dev'; .* named for the splits test, train"):
        load_pairs(str(tmp_path / "split"), split="dev")

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .jsonl, .json or .parquet file, and is not a folder written by"):
        load_pairs(str(tmp_path / "empty"))
    bad = _jsonl(tmp_path / "bad" / "b.jsonl", [ROWS[0], {"prompt": "x", "chosen": "y"}])
    with pytest.raises(DataError, match=rf"{bad}:line 2.*rejected"):  # the file and the line inside the folder
        load_pairs(str(tmp_path / "bad"))


def test_helpsteer3_sign_picks_the_pair_and_ties_are_counted(tmp_path):
    ctx = [{"role": "user", "content": "q"}]
    rows = [{"context": ctx, "response1": "one", "response2": "two", "overall_preference": p} for p in (-2, 3, 0)]
    f = _jsonl(tmp_path / "hs3.jsonl", rows)
    pairs, rep = load_pairs(str(f))
    assert rep.format == "helpsteer3" and len(pairs) == 2
    assert (pairs[0].chosen, pairs[0].rejected, pairs[0].margin) == ("one", "two", None)  # negative: response1
    assert (pairs[1].chosen, pairs[1].rejected) == ("two", "one")
    assert rep.skipped["filtered: a tie (overall_preference 0)"] == 1 and "1 filtered: a tie" in rep.summary()
    pairs, _ = load_pairs(str(f), helpsteer3_margin=True)
    assert [p.margin for p in pairs] == [2.0, 3.0]
    with pytest.raises(DataError, match=r"line 1.*overall_preference.*expected one of"):
        load_pairs(str(_jsonl(tmp_path / "bad.jsonl", [dict(rows[0], overall_preference=7)])))


@pytest.mark.parametrize("kind", ["list", "Dataset", "DataFrame"])
def test_records_from_python_train_and_the_config_shows_a_summary(tmp_path, kind):
    import datasets
    import pandas

    from metarm_fast.synthetic import SyntheticTask

    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in SyntheticTask(0).pairs("train", n=16)]
    data = {"list": rows, "Dataset": datasets.Dataset.from_list(rows), "DataFrame": pandas.DataFrame(rows)}[kind]
    cfg = tiny_config(tmp_path, train_data=data, eval_data=data, max_steps=2)
    assert f"<{type(data).__name__} of 16 records>" in repr(cfg) and rows[0]["chosen"] not in repr(cfg)
    assert cfg.to_dict()["train_data"] == f"<{type(data).__name__} of 16 records>"
    summary = RewardTrainer(cfg).train()
    assert summary["steps"] == 2 and summary["eval"]["pairs"] == 16
    with pytest.raises(ValueError, match="train_data must be a str"):
        TrainConfig(train_data=3).resolved()


def _train(tmp_path, capsys, *args):
    rc = main(["train", "--no-progress", "--max-steps", "1", *args])
    return rc, capsys.readouterr()


def test_meta_set_needs_two_responses_a_prompt(tmp_path, capsys):
    single = _jsonl(tmp_path / "single.jsonl", [{"prompt": "the cat", "responses": ["sat"]}] * 3)
    rc, out = _train(tmp_path, capsys, "--method", "metarm", "--meta-data", str(single),
                     "--output-dir", str(tmp_path / "a"))
    assert rc == 2 and "no prompt of the meta set has two responses" in out.err and "Traceback" not in out.err
    mixed = _jsonl(tmp_path / "mixed.jsonl", [{"prompt": "the cat", "responses": ["sat"]},
                                              {"prompt": "the dog", "responses": ["sat", "ran", "the"]}])
    tr = RewardTrainer(tiny_config(tmp_path, method="metarm", meta_data=str(mixed)))
    meta_report = dict(tr.data.reports)["meta"]
    assert len(tr.data.meta_groups) == 1 and "1 filtered: prompt with one response" in meta_report.summary()


def test_bad_paths_get_one_message_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import metarm_fast.build as build

    monkeypatch.setattr(build, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    afile = tmp_path / "a-file"
    afile.write_text("x")
    rc, out = _train(tmp_path, capsys, "--output-dir", str(afile))
    assert rc == 2 and f"--output-dir {afile}: is a file" in out.err and "Traceback" not in out.err

    rc = main(["eval", "--model", str(tmp_path / "nope"), "--data", "synthetic:eval"])
    out = capsys.readouterr()
    assert rc == 2 and f"--model {tmp_path / 'nope'}: there is no folder" in out.err and "Traceback" not in out.err

    notmodel = tmp_path / "notmodel"
    notmodel.mkdir()
    (notmodel / "notes.txt").write_text("x")
    rc, out = _train(tmp_path, capsys, "--model", str(notmodel), "--output-dir", str(tmp_path / "b"))
    assert rc == 2 and f"--model {notmodel}: the folder holds no Hugging Face model" in out.err
    assert "sentencepiece" not in out.err and "Traceback" not in out.err
