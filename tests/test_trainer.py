"""The vanilla trainer: gradient accumulation, repeatability, checkpoints, the command line."""
import json

import pytest
import torch

from metarm_fast.cli import main
from metarm_fast.config import TrainConfig
from metarm_fast.scoring import score_pairs as score_pairs_in_training
from metarm_fast.train_data import encode_pairs
from metarm_fast.trainer import RewardTrainer
from tests.helpers import assert_bitwise_equal, l_grads, tiny_config


def test_grad_accumulation_equals_the_big_batch(tmp_path):
    big = RewardTrainer(tiny_config(tmp_path / "a", batch_size=8, grad_accum=1, max_steps=3))
    acc = RewardTrainer(tiny_config(tmp_path / "b", batch_size=2, grad_accum=4, max_steps=3))
    for s in range(3):
        mb_big, mb_acc = big.step_inputs(s)[0], acc.step_inputs(s)[0]
        assert [p for m in mb_big for p in m] == [p for m in mb_acc for p in m]  # same pairs per step
        lb, la = l_grads(big, mb_big), l_grads(acc, mb_acc)
        assert la["loss"] == pytest.approx(lb["loss"], rel=1e-6) and la["accuracy"] == lb["accuracy"]
        for a, b in zip(big.weights.params, acc.weights.params):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
        # The accumulated gradient is the claim; parameters are not compared after the step, since
        # Adam turns a 1e-9 difference in a near-zero gradient element into a step of ~lr.
        big.optimizer_step()
        acc.optimizer_step()


def test_cpu_run_repeats_exactly_with_a_seed(tmp_path):
    a = RewardTrainer(tiny_config(tmp_path / "a"))
    b = RewardTrainer(tiny_config(tmp_path / "b"))
    a.train()
    b.train()
    assert_bitwise_equal(list(a.model.parameters()), list(b.model.parameters()))
    c = RewardTrainer(tiny_config(tmp_path / "c", seed=1))
    c.train()
    assert not torch.equal(next(a.model.parameters()), next(c.model.parameters()))


def test_tiny_default_learns_the_synthetic_preference(tmp_path):
    tr = RewardTrainer(tiny_config(tmp_path, max_records=None, max_steps=150, batch_size=16, eval_batch_size=64))
    before = tr.evaluate()["accuracy"]
    s = tr.train()
    assert s["eval"]["accuracy"] > 0.8 > before + 0.1, (before, s["eval"])


def test_checkpoint_round_trip_gives_the_same_rewards(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from metarm_fast.evaluate import load_checkpoint, score_pairs
    from metarm_fast.synthetic import SyntheticTask

    tr = RewardTrainer(tiny_config(tmp_path))
    summary = tr.train()
    out = tr.cfg.output_dir
    model, tok = load_checkpoint(out)
    pairs = SyntheticTask(0).pairs("eval", n=32)
    rc, rr, _ = score_pairs(model, tok, pairs, max_length=48)
    tc, trr = score_pairs_in_training(tr.rm, tr.batcher, encode_pairs(tr.encoder, pairs), tr.cfg.eval_batch_size)
    torch.testing.assert_close(rc, tc, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rr, trr, rtol=1e-5, atol=1e-6)
    # transformers' own head agrees on right-padded batches: the saved pad id is not the eos id.
    hf = AutoModelForSequenceClassification.from_pretrained(out)
    assert hf.config.pad_token_id != tok.eos_token_id
    enc = tok([p.prompt + " " + p.chosen for p in pairs[:4]], padding=True, return_tensors="pt")
    assert hf(**enc).logits.shape == (4, 1)
    cfgd = json.load(open(f"{out}/config.json"))
    assert cfgd["reward_mean"] == pytest.approx(summary["eval"]["reward_mean"])
    lines = [json.loads(x) for x in open(f"{out}/metrics.jsonl")]
    assert [x["step"] for x in lines[:-1]] == [1, 2, 3] and "final" in lines[-1]
    assert not (tmp_path / "run" / ".partial").exists()


def test_cli_train_and_eval(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["train", "--output-dir", str(out), "--max-steps", "2", "--max-records", "32", "--no-progress"]) == 0
    assert "eval accuracy" in capsys.readouterr().out
    assert main(["eval", "--model", str(out), "--data", "synthetic:eval", "--max-records", "16"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["pairs"] == 16 and 0.0 <= result["accuracy"] <= 1.0


def test_cli_yaml_config_and_flag_precedence(tmp_path):
    from metarm_fast.cli import build_parser, config_from_args

    y = tmp_path / "c.yaml"
    y.write_text("batch_size: 3\nlr: 0.01\nmethod: metarm\n")
    cfg = config_from_args(build_parser().parse_args(["train", "--config", str(y), "--lr", "0.02"]))
    assert (cfg.batch_size, cfg.lr, cfg.method) == (3, 0.02, "metarm")
    y.write_text("batch_sise: 3\n")
    with pytest.raises(ValueError, match="batch_sise"):
        config_from_args(build_parser().parse_args(["train", "--config", str(y)]))


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0).resolved()
    with pytest.raises(ValueError, match="meta-data"):
        TrainConfig(method="metarm", train_data="pairs.jsonl").resolved()


@pytest.mark.parametrize("optimizer,precision", [("adamw8bit", "fp32"), ("adamw", "bf16"), ("adamw8bit", "bf16-master")])
def test_optimizers_and_precisions_train(tmp_path, optimizer, precision):
    tr = RewardTrainer(tiny_config(tmp_path, optimizer=optimizer, precision=precision, max_steps=40, batch_size=8, lr=3e-3))
    first = tr.evaluate()
    s = tr.train()
    assert s["eval"]["accuracy"] > first["accuracy"] + 0.05, (first, s["eval"])
    assert all(torch.isfinite(p).all() for p in tr.weights.params)


def test_cli_metarm_run_with_a_meta_set_file(tmp_path, capsys):
    from metarm_fast.synthetic import SyntheticTask

    task = SyntheticTask(0)
    train = tmp_path / "pairs.jsonl"
    train.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                             for p in task.pairs("train", n=24)))
    meta = tmp_path / "meta.jsonl"
    groups = task.meta_groups(m=6, k=3)
    # k may differ from prompt to prompt
    rows = [{"prompt": g.prompt, "responses": list(g.responses[: 1 + i % 3])} for i, g in enumerate(groups)]
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    code = main(["train", "--method", "metarm", "--train-data", str(train), "--eval-data", str(train),
                 "--meta-data", str(meta), "--tokenizer", "", "--output-dir", str(out), "--max-steps", "3",
                 "--batch-size", "4", "--meta-batch-size", "3", "--eta", "1e-3", "--no-progress"])
    assert code == 0
    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    step = lines[0]
    for key in ("loss", "J", "accuracy", "meta_frac_changed", "meta_realised_ratio", "meta_gaps"):
        assert key in step, key
    assert step["meta_perturb_ms"] > 0 and step["meta_restore_ms"] > 0  # the machinery times itself
    assert (out / "meta_reward_gaps.png").stat().st_size > 1000
    assert "meta reward gap" in capsys.readouterr().out


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_master_update_one_tensor_at_a_time_equals_the_whole_step(tmp_path, optimizer):
    """bf16-master steps one master at a time (no full fp32 gradient copy); same update as all at once."""
    cfgs = dict(precision="bf16-master", optimizer=optimizer, max_grad_norm=0.05)
    a = RewardTrainer(tiny_config(tmp_path / "a", **cfgs))
    b = RewardTrainer(tiny_config(tmp_path / "b", **cfgs))
    for s in range(2):
        micro = a.step_inputs(s)[0]
        for tr in (a, b):
            l_grads(tr, micro)
        a.optimizer_step()
        with torch.no_grad():
            for p, mp in zip(b.weights.params, b.weights.masters):
                mp.grad = p.grad.float()
            torch.nn.utils.clip_grad_norm_(b.weights.masters, 0.05)
            b.optimizer.step()
            for p, mp in zip(b.weights.params, b.weights.masters):
                p.copy_(mp)
                mp.grad = None
        b.scheduler.step()
    for ma, mb in zip(a.weights.masters, b.weights.masters):
        torch.testing.assert_close(ma, mb, rtol=1e-6, atol=1e-7)
