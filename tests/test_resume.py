"""Resume after any crash, through the real command line: kill -9 at random moments (saves included),
SIGTERM / SIGINT, and the rules of the output folder. Every resumed run must end with the weights of
the same run never interrupted, bit for bit, and metrics.jsonl must hold each step once."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from metarm_fast.checkpoint import complete_checkpoints

STEPS = 12
BASE = ["train", "--max-steps", str(STEPS), "--max-records", "64", "--batch-size", "4", "--meta-batch-size", "3",
        "--meta-k", "3", "--max-length", "48", "--tiny-hidden", "32", "--save-every", "1", "--keep-last", "2",
        "--no-progress", "--method", "metarm", "--eta", "1e-2"]
SETTINGS = {
    "fp32": [],
    "bf16-master, 8-bit AdamW": ["--precision", "bf16-master", "--optimizer", "adamw8bit"],
    "grad_accum 2": ["--grad-accum", "2", "--batch-size", "2"],
}
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def _cmd(out, extra):
    return [sys.executable, "-m", "metarm_fast.cli", *BASE, *extra, "--output-dir", str(out)]


def _run(out, extra, **kw):
    return subprocess.run(_cmd(out, extra), env=ENV, capture_output=True, text=True, timeout=300, **kw)


def _metric_steps(out):
    steps = []
    with open(out / "metrics.jsonl") as f:
        for line in f:
            rec = json.loads(line)
            if "step" in rec:
                steps.append(rec["step"])
    return steps


def _lines(out):
    try:
        with open(out / "metrics.jsonl") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def _assert_same_model(a, b):
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k].view(torch.uint8), wb[k].view(torch.uint8)), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    refs = {}
    for name, extra in SETTINGS.items():
        out = tmp_path_factory.mktemp("ref")
        r = _run(out, extra)
        assert r.returncode == 0, r.stderr
        refs[name] = out
    return refs


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_kill_9_at_random_moments_then_resume_gives_the_uninterrupted_run(tmp_path, reference, setting):
    rng = random.Random(setting)
    out = tmp_path / "run"
    extra = SETTINGS[setting] + ["--resume", "auto"]
    kills = 0
    for _ in range(6):
        p = subprocess.Popen(_cmd(out, extra), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        target = _lines(out) + rng.randint(1, 3)  # a step or a few into training, then a random instant
        while p.poll() is None and _lines(out) < target:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.03))
        if p.poll() is not None:
            break
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
    assert kills >= 2, "the runs ended before they could be killed"
    r = _run(out, extra)  # to the end
    assert r.returncode == 0, r.stderr
    _assert_same_model(out, reference[setting])
    assert _metric_steps(out) == list(range(1, STEPS + 1))  # each step once
    assert len(complete_checkpoints(out / "checkpoints")) == 2  # --keep-last 2


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_and_exits_0_then_the_run_continues(tmp_path, reference, sig):
    out = tmp_path / "run"
    extra = ["--save-every", "0"]  # the checkpoint comes from the signal alone
    p = subprocess.Popen(_cmd(out, extra), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while p.poll() is None and _lines(out) < 3:
        time.sleep(0.002)
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "--resume auto" in stdout and sig.name in stdout
    (step, _), = complete_checkpoints(out / "checkpoints")
    assert 3 <= step < STEPS
    r = _run(out, extra + ["--resume", "auto"])
    assert r.returncode == 0, r.stderr
    _assert_same_model(out, reference["fp32"])
    assert _metric_steps(out) == list(range(1, STEPS + 1))


def test_a_second_sigint_stops_at_once_without_a_traceback(tmp_path):
    out = tmp_path / "run"
    # Steps of ~0.2 s, so that the second SIGINT lands inside the step the first one lets finish
    # (two signals sent back to back would merge into one: the kernel does not queue them).
    p = subprocess.Popen(_cmd(out, ["--max-steps", "100000", "--save-every", "0", "--tiny-hidden", "512",
                                    "--tiny-layers", "4"]), env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while p.poll() is None and _lines(out) < 3:
        time.sleep(0.002)
    p.send_signal(signal.SIGINT)
    time.sleep(0.03)
    p.send_signal(signal.SIGINT)
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr
    assert "stopped at once" in stderr and "weights were restored" in stderr
    assert "Traceback" not in stderr


def test_resume_refuses_changed_settings_and_a_missing_checkpoint(tmp_path, reference):
    out = reference["fp32"]
    r = _run(out, ["--resume", "auto", "--eta", "1e-3", "--batch-size", "2"])
    assert r.returncode == 2
    assert "eta=0.01 (now 0.001)" in r.stderr and "batch_size=4 (now 2)" in r.stderr
    assert "Traceback" not in r.stderr
    r = _run(tmp_path / "new", ["--resume", str(tmp_path / "nothing")])
    assert r.returncode == 2 and "no complete checkpoint" in r.stderr


def test_a_new_run_into_another_runs_folder_stops_unless_overwrite(tmp_path):
    out = tmp_path / "run"
    assert _run(out, ["--max-steps", "2"]).returncode == 0
    r = _run(out, ["--max-steps", "3"])
    assert r.returncode == 2 and "--overwrite" in r.stderr and "metrics.jsonl" in r.stderr
    assert _metric_steps(out) == [1, 2]  # nothing of the old run was touched
    r = _run(out, ["--max-steps", "3", "--overwrite"])
    assert r.returncode == 0, r.stderr
    assert _metric_steps(out) == [1, 2, 3]
    assert [s for s, _ in complete_checkpoints(out / "checkpoints")] == [2, 3]
