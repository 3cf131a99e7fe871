"""Settings and start-up errors: typed, range-checked, one message naming the setting, before any slow step."""
import json

import pytest

from metarm_fast.cli import main


def _train(tmp_path, capsys, *args):
    rc = main(["train", "--output-dir", str(tmp_path / "run"), "--no-progress", "--overwrite", *args])
    return rc, capsys.readouterr()


def test_yaml_numbers_are_read_as_their_settings_type(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lr: 1e-4\nmax_steps: 1\nmax_records: 16\nbatch_size: 4\n")
    rc, out = _train(tmp_path, capsys, "--config", str(cfg))
    assert rc == 0, out.err
    assert "lr                         0.0001" in out.out


@pytest.mark.parametrize("text,expected", [
    ("batch_size: 2.5\n", "batch_size must be an int, got 2.5"),
    ("lr: fast\n", "lr must be a float, got 'fast'"),
    ("lr: [1\n", "not valid YAML"),
    ("max_steps: 0\n", "max_steps must be >= 1, or -1"),
    ("max_steps: -5\n", "max_steps must be >= 1, or -1"),
    ("epochs: 0\n", "epochs must be > 0"),
    ("nonsense: 1\n", "unknown setting(s) nonsense"),
])
def test_bad_settings_stop_with_one_message(tmp_path, capsys, text, expected):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    rc, out = _train(tmp_path, capsys, "--config", str(cfg))
    assert rc == 2 and expected in out.err and "Traceback" not in out.err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("metarm-fast 0.")


def test_data_the_tokenizer_does_not_know_stops_the_run(tmp_path, capsys):
    data = tmp_path / "hh.jsonl"
    rows = [{"chosen": f"\n\nHuman: Where is the nearest pharmacy {i}?\n\nAssistant: Two blocks north.",
             "rejected": f"\n\nHuman: Where is the nearest pharmacy {i}?\n\nAssistant: Dunno."} for i in range(20)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, out = _train(tmp_path, capsys, "--train-data", str(data), "--max-steps", "1")
    assert rc == 2 and "unknown to the tokenizer" in out.err and "--tokenizer" in out.err


@pytest.mark.parametrize("attn,expected", [("flash_attention_2", "needs a CUDA GPU"),
                                           ("flex_attention", "no CPU backward")])
def test_attention_the_cpu_cannot_train_with_is_refused(tmp_path, capsys, attn, expected):
    rc, out = _train(tmp_path, capsys, "--attn-implementation", attn, "--max-steps", "1")
    assert rc == 2 and expected in out.err


def test_a_missing_model_folder_is_named(tmp_path, capsys):
    rc, out = _train(tmp_path, capsys, "--model", str(tmp_path / "no-such-model"), "--max-steps", "1")
    assert rc == 2 and "there is no folder" in out.err and "Traceback" not in out.err


def test_the_data_is_checked_before_the_model_is_loaded(tmp_path, capsys, monkeypatch):
    import metarm_fast.build as build

    def never(*a, **k):
        raise AssertionError("the model was loaded before the data was read")

    monkeypatch.setattr(build, "load_model", never)
    rc, out = _train(tmp_path, capsys, "--train-data", str(tmp_path / "typo.jsonl"), "--max-steps", "1")
    assert rc == 2 and "typo.jsonl" in out.err


def test_reward_mean_and_std_are_written_without_an_eval_set(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "w01 w02", "chosen": "w03 w04", "rejected": "w05"} for _ in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, out = _train(tmp_path, capsys, "--train-data", str(data), "--max-steps", "1", "--batch-size", "4")
    assert rc == 0, out.err
    cfg = json.load(open(tmp_path / "run" / "config.json"))
    assert "reward_mean" in cfg and cfg["reward_stats_from"] == "training pairs (no eval set)"
    assert "no eval set" in out.out


def test_eval_reuses_the_runs_encoding_settings_and_says_so(tmp_path, capsys):
    rc, out = _train(tmp_path, capsys, "--max-steps", "1", "--max-length", "20", "--max-records", "16")
    assert rc == 0, out.err
    run = str(tmp_path / "run")
    assert main(["eval", "--model", run, "--data", "synthetic:eval", "--max-records", "16"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["settings"]["max_length"] == {"value": 20, "from": "run"}
    assert res["settings"]["chat_template"]["from"] == "run"
    assert main(["eval", "--model", run, "--data", "synthetic:eval", "--max-records", "16", "--max-length", "30"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["max_length"] == {"value": 30, "from": "flag"}


def test_eval_help_gives_every_flag_a_default(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = capsys.readouterr().out
    for flag in ("--data-format", "--max-length", "--chat-template", "--pku-preference", "--split", "--batch-size",
                 "--max-records", "--on-bad-record"):
        after = text.split(flag, 1)[1].split("\n  --", 1)[0]
        assert "default" in after, flag
