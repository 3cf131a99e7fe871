"""Resume after any crash. Through the real command line: kill -9 at random moments (saves included),
SIGTERM / SIGINT, a second SIGINT, and the output folder's refusal reaching the user. In this
process: a checkpoint continues the run bit for bit in every precision, layout and optimizer, and
the rules of the output folder and of --resume.

Every resumed run must end with the weights of the same run never interrupted, bit for bit, and
metrics.jsonl must hold each step once. The uninterrupted CLI runs are the session's reference runs
(tests/cli_runs.py)."""
import json
import os
import random
import shutil
import signal
import subprocess
import time

import pytest
import torch

from metarm_fast.checkpoint import complete_checkpoints
from metarm_fast.cli import build_parser, config_from_args
from metarm_fast.run_dir import prepare_output_dir
from metarm_fast.trainer import RewardTrainer
from tests.cli_runs import BASE, ENV, SETTINGS, STEPS, assert_same_model, checkpoint, cli_command, \
    metric_records, metric_steps, run_cli
from tests.helpers import assert_bitwise_equal, run_steps, tiny_config


def _cmd(out, extra):
    return cli_command([*BASE, *extra, "--output-dir", str(out)])


def _lines(out):
    try:
        with open(out / "metrics.jsonl") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def _partial_saves(out):
    root = out / "checkpoints"
    return [n for n in os.listdir(root) if n.endswith(".partial")] if root.is_dir() else []


def _wait_for_lines(p, out, n):
    while p.poll() is None and _lines(out) < n:
        time.sleep(0.002)


# -- through the command line -----------------------------------------------------------------------
# kill -9 in one setting: bf16 compute with fp32 masters, the checkpoint with the most state (the
# masters, the optimizer's over them, the compute copy re-cast on load). What a kill leaves (a
# partial save, metrics past the checkpoint) does not depend on the precision: the fp32 run is
# resumed through the CLI by the signal test below, and every precision, layout and optimizer
# continues bit for bit from a checkpoint in this process (test_a_checkpoint_continues_...).
KILLED = ["bf16-master"]


@pytest.mark.slow
@pytest.mark.parametrize("setting", KILLED)
def test_kill_9_at_random_moments_then_resume_gives_the_uninterrupted_run(tmp_path, reference_runs, setting):
    """Killed twice, each time a step or two after the last metrics line: first at a random instant
    of the next 30 ms (the line's flush, the step's save, the next step), then at a random instant
    inside a save (its partial folder there; a checkpoint is written every step, in about 25 ms).
    A third kill is made only if the second missed the save."""
    rng = random.Random(setting)
    out = tmp_path / "run"
    cmd = cli_command([*BASE, *SETTINGS[setting], "--keep-last", "2", "--resume", "auto", "--output-dir", str(out)])
    kills, mid_save = 0, 0
    for _ in range(3):
        if kills >= 2 and mid_save:
            break
        p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _wait_for_lines(p, out, _lines(out) + rng.randint(1, 2))  # a step or two into training (of 6)
        if kills == 0:
            time.sleep(rng.uniform(0.0, 0.03))
        else:
            while p.poll() is None and not _partial_saves(out):
                time.sleep(0.001)
            time.sleep(rng.uniform(0.0, 0.01))
        if p.poll() is not None:
            break
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
        mid_save += bool(_partial_saves(out))
    assert kills >= 2, "the runs ended before they could be killed"
    assert mid_save, "no kill landed in the middle of a save"
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)  # to the end
    assert r.returncode == 0, r.stderr
    assert_same_model(out, reference_runs[setting])
    assert metric_steps(out) == list(range(1, STEPS + 1))  # each step once
    assert len(complete_checkpoints(out / "checkpoints")) == 2  # --keep-last 2
    assert not _partial_saves(out)  # what a kill left mid-save was cleared


def _stop_with(sig, out, extra, after_lines):
    """Start the fp32 run, send ``sig`` once ``after_lines`` metrics lines are written; it must save
    and exit 0 with the command that continues it. Returns the step it saved."""
    p = subprocess.Popen(_cmd(out, ["--save-every", "0", *extra]), env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    _wait_for_lines(p, out, after_lines)
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "--resume auto" in stdout and sig.name in stdout
    step, path = complete_checkpoints(out / "checkpoints")[-1]
    assert f"saved step {step} to {path}" in stdout
    return step


@pytest.mark.slow
def test_sigterm_then_sigint_each_save_and_exit_0_then_the_run_continues(tmp_path, reference_runs):
    out = tmp_path / "run"
    # --save-every 0: the checkpoints come from the signals alone
    first = _stop_with(signal.SIGTERM, out, [], after_lines=2)
    assert [s for s, _ in complete_checkpoints(out / "checkpoints")] == [first] and 2 <= first < STEPS
    second = _stop_with(signal.SIGINT, out, ["--resume", "auto"], after_lines=first + 1)
    assert [s for s, _ in complete_checkpoints(out / "checkpoints")] == [first, second] and second < STEPS
    r = run_cli([*BASE, "--save-every", "0", "--output-dir", out, "--resume", "auto"])
    assert r.returncode == 0, r.stderr
    assert_same_model(out, reference_runs["fp32"])
    assert metric_steps(out) == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_a_second_sigint_stops_at_once_without_a_traceback(tmp_path):
    out = tmp_path / "run"
    # Steps of ~0.2 s, so that the second SIGINT lands inside the step the first one lets finish
    # (two signals sent back to back would merge into one: the kernel does not queue them).
    p = subprocess.Popen(_cmd(out, ["--max-steps", "100000", "--save-every", "0", "--tiny-hidden", "512",
                                    "--tiny-layers", "4"]), env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_lines(p, out, 3)
    p.send_signal(signal.SIGINT)
    time.sleep(0.03)
    p.send_signal(signal.SIGINT)
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr
    assert "stopped at once" in stderr and "weights were restored" in stderr
    assert "Traceback" not in stderr


@pytest.mark.slow
def test_a_new_run_into_another_runs_folder_is_refused_with_a_message(tmp_path, reference_runs):
    """The CLI's side of the output folder's rules (tested in this process below): the refusal
    reaches the user as a message, exit 2, no traceback, and nothing of the old run is touched."""
    out = tmp_path / "run"
    shutil.copytree(reference_runs["fp32"], out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    r = run_cli([*BASE, "--max-steps", "3", "--output-dir", out])
    assert r.returncode == 2, r.stderr
    assert "error: output dir" in r.stderr and "--overwrite" in r.stderr and "metrics.jsonl" in r.stderr
    assert "Traceback" not in r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert metric_steps(out) == list(range(1, STEPS + 1))


# -- in this process ---------------------------------------------------------------------------------
IN_PROCESS = {
    "fp32": dict(),
    "bf16": dict(precision="bf16"),
    "bf16-master": dict(precision="bf16-master"),
    # hidden 64: tensors of at least 4096 elements, which bitsandbytes keeps in 8 bits (blockwise,
    # with their absmax and code book: the nested state a checkpoint must carry)
    "8-bit AdamW": dict(optimizer="adamw8bit", tiny_hidden=64),
    "bf16-master, 8-bit AdamW": dict(precision="bf16-master", optimizer="adamw8bit", tiny_hidden=64),
    "grad_accum 2": dict(grad_accum=2, batch_size=2),
    "vanilla": dict(method="vanilla"),
}


def _assert_same_optimizer_state(a, b):
    """Every entry of the optimizer's state of every stepped tensor, bit for bit (8-bit codes too)."""
    for i, (pa, pb) in enumerate(zip(a.weights.opt_params, b.weights.opt_params)):
        sa, sb = a.optimizer.state[pa], b.optimizer.state[pb]
        assert sa.keys() == sb.keys(), i
        for k in sa:
            x, y = sa[k], sb[k]
            if isinstance(x, torch.Tensor):
                assert x.dtype == y.dtype and x.shape == y.shape, (i, k)
                assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), (i, k)
            else:
                assert x == y, (i, k)


@pytest.mark.parametrize("setting", list(IN_PROCESS))
def test_a_checkpoint_continues_the_run_bit_for_bit(tmp_path, setting):
    """Steps 1-3, a checkpoint, a new trainer loading it for steps 4-6: the weights, the masters and
    the optimizer's state end as those of the 6 steps taken at once, bit for bit."""
    kw = dict(dict(method="metarm", eta=1e-2, max_steps=6, warmup_ratio=0.5), **IN_PROCESS[setting])
    whole = RewardTrainer(tiny_config(tmp_path / "whole", **kw))
    run_steps(whole)
    first = RewardTrainer(tiny_config(tmp_path / "first", **kw))
    run_steps(first, 3)
    path = first.checkpointer.save()
    assert path == checkpoint(tmp_path / "first" / "run", 3)
    then = RewardTrainer(tiny_config(tmp_path / "then", **kw))
    then.checkpointer.load(path)
    assert then.step == 3 and then.scheduler.get_last_lr() == first.scheduler.get_last_lr()
    run_steps(then)
    assert then.step == whole.step == 6
    assert_bitwise_equal(then.weights.params, whole.weights.params)
    if whole.weights.masters is not None:
        assert_bitwise_equal(then.weights.masters, whole.weights.masters)
    _assert_same_optimizer_state(then, whole)
    assert then.scheduler.get_last_lr() == whole.scheduler.get_last_lr()
    if "8-bit" in setting:  # the quantized state really was in the checkpoint
        assert any(st["state2"].dtype == torch.uint8 for st in then.optimizer.state.values())
    # and the continuation is not the trivial one: the weights moved after the checkpoint
    assert any(not torch.equal(a, b) for a, b in zip(first.weights.params, then.weights.params))


def _cli_config(*args):
    """The TrainConfig the command line builds from these arguments."""
    return config_from_args(build_parser().parse_args([*BASE, *map(str, args)]))


def test_resume_refuses_changed_settings(tmp_path, reference_runs):
    out = tmp_path / "run"
    shutil.copytree(checkpoint(reference_runs["fp32"], 3), checkpoint(out, 3))
    tr = RewardTrainer(_cli_config("--output-dir", out, "--resume", "auto", "--eta", "1e-3", "--batch-size", "2"),
                       log=lambda *a, **k: None)
    with pytest.raises(ValueError) as e:
        tr.train()
    assert "eta=0.01 (now 0.001)" in str(e.value) and "batch_size=4 (now 2)" in str(e.value)
    assert tr.step == 0 and os.listdir(out) == ["checkpoints"]  # nothing loaded, nothing written
    # the settings that do not change what a run computes may change
    tr = RewardTrainer(_cli_config("--output-dir", out, "--resume", "auto", "--log-every", "2", "--keep-last", "1"),
                       log=lambda *a, **k: None)
    assert tr.train()["steps"] == STEPS
    assert metric_steps(out) == [4, 6]  # from the checkpoint on, every 2nd step


def test_resume_finds_the_checkpoint_it_is_given(tmp_path, reference_runs):
    ref = reference_runs["fp32"]
    # a checkpoint, the run folder (its latest), the checkpoints folder (its latest)
    assert prepare_output_dir(_cli_config("--output-dir", tmp_path / "a", "--resume", checkpoint(ref, 2))) \
        == checkpoint(ref, 2)
    assert prepare_output_dir(_cli_config("--output-dir", tmp_path / "b", "--resume", ref)) == checkpoint(ref, STEPS)
    assert prepare_output_dir(_cli_config("--output-dir", tmp_path / "c", "--resume", os.path.join(ref, "checkpoints"))) \
        == checkpoint(ref, STEPS)
    with pytest.raises(ValueError, match="no complete checkpoint"):
        prepare_output_dir(_cli_config("--output-dir", tmp_path / "d", "--resume", tmp_path / "nothing"))
    # --resume auto: the latest complete checkpoint of the output folder
    assert prepare_output_dir(_cli_config("--output-dir", ref, "--resume", "auto")) == checkpoint(ref, STEPS)


def _a_finished_run(out, steps=2):
    cfg = _cli_config("--output-dir", out, "--max-steps", steps, "--save-every", "0")
    RewardTrainer(cfg, log=lambda *a, **k: None).train()
    return cfg


def test_the_output_folder_rules(tmp_path):
    out = tmp_path / "run"
    fresh = _cli_config("--output-dir", out, "--max-steps", "3")
    assert prepare_output_dir(fresh) is None  # no folder yet: a fresh start
    _a_finished_run(out)  # steps 1-2, one checkpoint (the last step's)
    (out / "notes.txt").write_text("the user's")
    files = sorted(os.listdir(out))
    # a new run into it stops, naming what is there, and touches nothing
    with pytest.raises(ValueError, match="holds another run's files") as e:
        prepare_output_dir(fresh)
    assert "metrics.jsonl" in str(e.value) and "--overwrite" in str(e.value) and "notes.txt" not in str(e.value)
    assert sorted(os.listdir(out)) == files and metric_steps(out) == [1, 2]
    # --resume auto continues it
    assert prepare_output_dir(_cli_config("--output-dir", out, "--max-steps", "2", "--resume", "auto")) \
        == checkpoint(out, 2)
    # --overwrite removes the run's files (only those) and starts fresh
    RewardTrainer(_cli_config("--output-dir", out, "--max-steps", "3", "--overwrite"), log=lambda *a, **k: None).train()
    assert metric_steps(out) == [1, 2, 3]
    assert [s for s, _ in complete_checkpoints(out / "checkpoints")] == [1, 2, 3]
    assert (out / "notes.txt").read_text() == "the user's"


def test_resume_auto_over_a_run_that_crashed_before_its_first_checkpoint(tmp_path):
    """No checkpoint: the same settings start again from scratch; other settings are refused."""
    out = tmp_path / "run"
    _a_finished_run(out, steps=3)
    # what a crash during step 3 leaves: the config, two metrics lines (marked), no checkpoint, no model
    shutil.rmtree(out / "checkpoints")
    (out / "model.safetensors").unlink()
    lines = [dict(r, loss=123.0) for r in metric_records(out)[:2]]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    other = RewardTrainer(_cli_config("--output-dir", out, "--max-steps", "3", "--eta", "1e-3", "--resume", "auto"),
                          log=lambda *a, **k: None)
    with pytest.raises(ValueError, match="holds another run's files"):
        other.train()
    assert metric_records(out) == lines and not (out / "model.safetensors").exists()
    same = RewardTrainer(_cli_config("--output-dir", out, "--max-steps", "3", "--resume", "auto"),
                         log=lambda *a, **k: None)
    assert same.train()["steps"] == 3
    assert metric_steps(out) == [1, 2, 3]  # from scratch: the crashed run's lines were cleared
    assert all(r["loss"] != 123.0 for r in metric_records(out) if "step" in r)


def test_a_checkpoint_from_before_a_setting_existed_resumes(tmp_path):
    """An upgrade mid-run: the saved config lacks a setting added since (compared as not saved), and
    the run continues bit for bit instead of failing on the missing key."""
    from metarm_fast import checkpoint as ckpt

    tr = RewardTrainer(tiny_config(tmp_path, max_steps=4))
    run_steps(tr, 2)
    sd = tr.checkpointer.state_dict()
    del sd["train"]["config"]["meta_diagnostic_every"]  # as an older version wrote it
    ckpt.save_checkpoint(str(tmp_path / "ck"), 2, sd)
    fresh = RewardTrainer(tiny_config(tmp_path, max_steps=4))
    fresh.checkpointer.load(ckpt.step_dir(str(tmp_path / "ck"), 2))
    assert fresh.step == 2
    run_steps(tr)
    run_steps(fresh)
    assert_bitwise_equal(fresh.weights.params, tr.weights.params)
