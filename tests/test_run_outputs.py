"""What a run leaves for its user besides the model: eval during training, the best model, the
tensorboard events, and the two figures."""
import json
import os

import pytest
import torch

from metarm_fast.trainer import RewardTrainer
from tests.helpers import tiny_config


def _lines(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_eval_every_logs_eval_metrics_and_keeps_the_best_model(tmp_path):
    from transformers import AutoModelForSequenceClassification

    cfg = tiny_config(tmp_path, max_steps=7, eval_every=3, keep_best=True, method="metarm", log_every=5)
    summary = RewardTrainer(cfg).train()
    steps = [r for r in _lines(cfg.output_dir) if "step" in r]
    # logged steps: every 5th, the last, and every eval step -- each once
    assert [r["step"] for r in steps] == [3, 5, 6, 7]
    evals = {r["step"]: r["eval"] for r in steps if "eval" in r}
    assert sorted(evals) == [3, 6]
    for e in evals.values():
        assert e["pairs"] == 64 and 0.0 <= e["accuracy"] <= 1.0 and "loss" in e
    best = max(e["accuracy"] for e in evals.values())
    assert summary["best"]["eval_accuracy"] == best
    # the exported best model scores the eval pairs with the best accuracy it was chosen for
    tr = RewardTrainer(tiny_config(tmp_path / "probe", model=os.path.join(cfg.output_dir, "best"),
                                   tokenizer=os.path.join(cfg.output_dir, "best"), max_steps=1))
    assert tr.evaluate()["accuracy"] == pytest.approx(best, abs=1e-12)
    assert AutoModelForSequenceClassification.from_pretrained(os.path.join(cfg.output_dir, "best")).config.reward_std > 0


@pytest.mark.parametrize("method,packing", [("metarm", "share-prompt"), ("metarm", "none"), ("vanilla", "none")])
def test_each_step_line_counts_the_tokens_its_passes_ran_over(tmp_path, method, packing):
    cfg = tiny_config(tmp_path, max_steps=3, method=method, packing=packing)
    RewardTrainer(cfg).train()
    steps = [r for r in _lines(cfg.output_dir) if "step" in r]
    # counted independently: the same steps' inputs (the sampler is a function of the step) laid out
    # by a second trainer; pairs and meta groups, padding included
    probe = RewardTrainer(tiny_config(tmp_path / "probe", method=method, packing=packing))
    for r in steps:
        micro, groups = probe.step_inputs(r["step"] - 1)
        want = sum(probe.batcher.pairs(m).input_ids.numel() for m in micro)
        if method == "metarm":
            want += probe.batcher.groups(groups).input_ids.numel()
        assert r["tokens"] == want
        assert r["step_s"] > 0 and r["tokens_per_s"] == pytest.approx(r["tokens"] / r["step_s"], rel=1e-3)


def test_eval_every_needs_eval_pairs_and_keep_best_needs_eval_every(tmp_path):
    with pytest.raises(ValueError, match="keep_best needs eval_every"):
        tiny_config(tmp_path, keep_best=True).resolved()
    with pytest.raises(ValueError, match="eval_every must be >= 0"):
        tiny_config(tmp_path, eval_every=-1).resolved()
    with pytest.raises(ValueError, match="--eval-every needs eval pairs"):
        RewardTrainer(tiny_config(tmp_path, eval_every=2, eval_data=None, train_data="synthetic:shifted"))


def test_tensorboard_events_hold_the_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(tmp_path, max_steps=4, eval_every=2, report_to="tensorboard")
    RewardTrainer(cfg).train()
    acc = EventAccumulator(os.path.join(cfg.output_dir, "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/accuracy", "train/grad_norm", "eval/accuracy"} <= set(tags)
    steps = [r for r in _lines(cfg.output_dir) if "step" in r]
    events = acc.Scalars("train/loss")
    assert [e.step for e in events] == [r["step"] for r in steps]
    # tensorboard stores float32: the values agree to float32 rounding (relative 6e-8)
    assert [e.value for e in events] == pytest.approx([r["loss"] for r in steps], rel=1e-7)
    assert [e.step for e in acc.Scalars("eval/accuracy")] == [2, 4]


def test_tensorboard_after_a_resume_holds_each_step_once(tmp_path):
    """A run logs steps 1-5 and crashes; its checkpoint is step 3; the resumed run logs 4-6. Steps 1-3
    keep the first run's values, 4-6 the resumed run's, each once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from metarm_fast.tracking import Trackers

    first = Trackers(["tensorboard"], str(tmp_path), {}, start_step=0)
    for step in range(1, 6):
        first.log({"step": step, "loss": float(step)})
    first.close()
    again = Trackers(["tensorboard"], str(tmp_path), {}, start_step=3)
    for step in range(4, 7):
        again.log({"step": step, "loss": 10.0 + step})
    again.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0),
                                                                     (5, 15.0), (6, 16.0)]


def test_report_to_names_a_missing_backend_and_a_bad_value(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r"--report-to wandb: not installed; pip install 'metarm-fast\[wandb\]'"):
        RewardTrainer(tiny_config(tmp_path, report_to="tensorboard,wandb"))
    with pytest.raises(ValueError, match="report_to='tensorbord'"):
        tiny_config(tmp_path, report_to="tensorbord").resolved()


def test_figures_compare_against_the_initial_model_on_the_same_samples(tmp_path):
    from metarm_fast.plots import read_curves

    cfg = tiny_config(tmp_path, method="metarm", max_steps=5, eval_every=5)
    tr = RewardTrainer(cfg)
    before = tr.meta_gaps()
    summary = tr.train()
    out = cfg.output_dir
    for name in ("meta_reward_gaps.png", "training_curves.png"):
        with open(os.path.join(out, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
    saved = torch.load(os.path.join(out, "meta_reward_gaps_initial.pt"))
    assert torch.equal(saved, before)  # the baseline: the model before step 1, same meta samples
    assert summary["meta_gaps_initial"]["mean"] == pytest.approx(float(before.mean()))
    assert summary["meta_gaps"]["mean"] != pytest.approx(float(before.mean()))
    curves = read_curves(os.path.join(out, "metrics.jsonl"))
    assert [s for s, _ in curves["loss"]] == [1, 2, 3, 4, 5] and [s for s, _ in curves["eval_accuracy"]] == [5]


@pytest.mark.slow
def test_trackio_and_wandb_offline_get_the_metrics(tmp_path):
    """Where they are installed (optional extras; not in `make test`): a CLI run reporting to both,
    offline. trackio's local store is read back; wandb's offline run is found in the output folder."""
    import subprocess
    import sys

    pytest.importorskip("trackio")
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    env = dict(os.environ, TRACKIO_DIR=str(tmp_path / "trackio"), WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "metarm_fast.cli", "train", "--max-steps", "3", "--max-records", "32", "--threads", "1",
           "--tiny-hidden", "32", "--output-dir", str(out), "--no-progress", "--report-to", "trackio,wandb"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    read = ("import json; from trackio.sqlite_storage import SQLiteStorage as S; "
            "print(json.dumps([(x['step'], x['train/loss']) for x in S.get_logs('metarm-fast', 'run')]))")
    got = subprocess.run([sys.executable, "-c", read], env=env, capture_output=True, text=True)
    assert got.returncode == 0, got.stderr[-2000:]
    want = [(rec["step"], rec["loss"]) for rec in _lines(out) if "step" in rec]
    assert [tuple(x) for x in json.loads(got.stdout)] == want
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_gap_histogram_draws_before_and_after_in_panels_of_their_own(tmp_path):
    """The model before training in its own panel (overlaid, its spike near 0 hid under the trained
    model's first bin): the figure grows by a panel; an empty series draws no panel and no nan."""
    import struct

    import torch

    from metarm_fast.plots import save_gap_histogram

    def height(path):
        with open(path, "rb") as f:
            return struct.unpack(">II", f.read(24)[16:24])[1]  # the PNG's IHDR: width, height

    gaps, before = torch.rand(50) * 3, torch.rand(50) * 0.05
    one = save_gap_histogram(gaps, str(tmp_path / "one.png"))
    two = save_gap_histogram(gaps, str(tmp_path / "two.png"), baseline=before)
    empty = save_gap_histogram(gaps, str(tmp_path / "empty.png"), baseline=torch.zeros(0))
    assert height(two) > 1.5 * height(one) and height(empty) == height(one)
