"""Data parallel training for real: torchrun with 2 gloo ranks on the CPU, against one process with
the same global batch; the restore bitwise on every rank; resume across world sizes; a rank that
fails ends the job; the settings 2 ranks cannot run, refused.

The 2-rank runs share one torchrun launch (tests/parallel_driver.py runs them one after another in
the same ranks, each with a process group of its own, checking that it is gone afterwards); the
one-process runs are the session's reference runs (tests/cli_runs.py)."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from metarm_fast.build import check_parallel
from metarm_fast.cli import build_parser, config_from_args
from metarm_fast.config import TrainConfig
from metarm_fast.trainer import RewardTrainer
from tests.cli_runs import BASE, ENV, STEPS, checkpoint, losses, max_weight_diff

DRIVER = os.path.join(os.path.dirname(__file__), "parallel_driver.py")

# setting -> (the reference run it is compared with, the flags of the 2-rank run)
SETTINGS = {
    "ddp fp32": ("fp32", ["--parallel", "ddp"]),
    "ddp bf16-master": ("bf16-master", ["--parallel", "ddp", "--precision", "bf16-master"]),
    "ddp grad_accum 2": ("grad_accum 2", ["--parallel", "ddp", "--grad-accum", "2", "--batch-size", "2"]),
    "fsdp fp32": ("fp32", ["--parallel", "fsdp"]),
    "fsdp bf16 mixed": ("bf16-master", ["--parallel", "fsdp", "--precision", "bf16-master"]),
    "fsdp grad_accum 2": ("grad_accum 2", ["--parallel", "fsdp", "--grad-accum", "2", "--batch-size", "2"]),
}
RESUME_AT = 3  # the step a run on another number of ranks continues from
RESUMED = ["fsdp fp32", "fsdp bf16 mixed"]  # FSDP2's shards resharded on load, both layouts
FAILING = "check ddp, rank 1 failing"

# (loss relative, final weights max abs): about twice the largest error measured (see the test below).
TOLERANCES = {"fp32": (5e-6, 5e-6), "bf16": (2e-3, 8e-3)}


def _torchrun(args, log_dir=None):
    logs = ["--log-dir", str(log_dir), "--redirects", "3"] if log_dir else []
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *logs,
                           *args], env=ENV, capture_output=True, text=True, timeout=300)


def _extra(setting):
    return SETTINGS[setting][1]


def _precision_flags(setting):
    return ["--precision", "bf16-master"] if "bf16" in setting else []


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, reference_runs):
    """One torchrun launch: every setting's 2-rank run, the 2-rank continuations of one-process
    checkpoints, the in-rank checks of the meta step, and last a job one rank of which fails.
    Returns (folders, the launch)."""
    root = tmp_path_factory.mktemp("two_ranks")
    out, jobs = {}, []
    for name in SETTINGS:
        out[name] = root / name.replace(" ", "_")
        jobs.append({"name": name, "cli": [*BASE, *_extra(name), "--save-every", "3", "--output-dir", str(out[name])]})
    for name in RESUMED:
        key = f"{name} from 1 rank"
        out[key] = root / key.replace(" ", "_")
        start = checkpoint(reference_runs[SETTINGS[name][0]], RESUME_AT)
        jobs.append({"name": key, "cli": [*BASE, *_precision_flags(name), "--output-dir", str(out[key]),
                                          "--resume", start]})
    for parallel in ("ddp", "fsdp"):
        jobs.append({"name": f"check {parallel}", "check": str(root / f"check_{parallel}"), "parallel": parallel})
        jobs.append({"name": f"check {parallel} optimizer-step", "check": str(root / f"check_{parallel}_os"),
                     "parallel": parallel, "direction": "optimizer-step"})
    # last: it ends the launch
    jobs.append({"name": FAILING, "check": str(root / "failing"), "parallel": "ddp", "fail_on_rank": 1})
    with open(root / "jobs.json", "w") as f:
        json.dump(jobs, f)
    return out, _torchrun([DRIVER, str(root / "jobs.json")])


def _job_ok(launch, name):
    assert f"job {name}: ok" in launch.stdout, f"job {name} did not finish: {launch.stderr[-4000:]}"


def _tolerances(setting):
    return TOLERANCES["bf16" if "bf16" in setting else "fp32"]


@pytest.mark.slow
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_two_ranks_equal_one_process_with_the_same_global_batch(two_ranks, reference_runs, setting):
    out, launch = two_ranks
    _job_ok(launch, setting)
    one, two = reference_runs[SETTINGS[setting][0]], out[setting]
    la, lb = losses(one), losses(two)
    assert len(la) == len(lb) == STEPS  # each step once: rank 0 alone writes the metrics
    # Rounding only: the 2 ranks sum the same per-pair terms in another order, and AdamW amplifies the
    # differences over the steps. Measured over these 6 steps (loss relative / final weights max abs):
    # fp32 2.1e-6 / 7.2e-7 (ddp, fsdp), 2.0e-6 / 5.6e-7 (ddp accum), 0 / 3.6e-7 (fsdp accum); bf16
    # compute 3.3e-4 / 2.0e-3 (ddp), 6.0e-4 / 3.8e-3 (fsdp), a bf16 ulp at 0.5 being 2e-3. (Over 12
    # steps the fp32 losses part by 4e-5 at step 11, both world sizes agreeing with each other: these
    # tolerances hold for these 6 steps, which is why the reference runs have 6.)
    loss_rtol, weight_atol = _tolerances(setting)
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=loss_rtol, atol=0)
    assert max_weight_diff(one, two) <= weight_atol


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
@pytest.mark.parametrize("direction", ["sgd", "optimizer-step"])
def test_every_rank_perturbs_and_restores_the_same_bits(two_ranks, parallel, direction):
    # The driver's check (tests/parallel_driver.py, check_step): three MetaRM steps, after each the
    # restore bitwise on every rank and the ranks agreeing on grad J, theta' and the reduced grad L
    # (DDP) or on the whole model's perturbation stats (FSDP2); then no gloo thread left. The
    # optimizer-step direction steps the sharded optimizer (FSDP2) on every rank at once.
    _, launch = two_ranks
    _job_ok(launch, f"check {parallel}" + ("" if direction == "sgd" else f" {direction}"))


def _continued(out, one, setting):
    # steps RESUME_AT+1.. of the one-process run, to rounding (measured, loss relative / weights max
    # abs: 1 -> 2 ranks fp32 8.2e-8 / 7.5e-9, bf16 1.6e-4 / 5.4e-5; 2 ranks -> 1 fp32 2.1e-6 / 7.2e-7,
    # bf16 7.0e-4 / 3.8e-3)
    loss_rtol, weight_atol = _tolerances(setting)
    torch.testing.assert_close(torch.tensor(losses(out)), torch.tensor(losses(one)[RESUME_AT:]), rtol=loss_rtol, atol=0)
    assert max_weight_diff(out, one) <= weight_atol


@pytest.mark.slow
@pytest.mark.parametrize("setting", RESUMED)
def test_a_one_process_checkpoint_continues_on_2_ranks(two_ranks, reference_runs, setting):
    # With bf16 compute the fp32 weights are the masters beside a bf16 copy in one process and FSDP2's
    # parameters on 2 ranks: each run loads the other's layout.
    out, launch = two_ranks
    _job_ok(launch, f"{setting} from 1 rank")
    _continued(out[f"{setting} from 1 rank"], reference_runs[SETTINGS[setting][0]], setting)


@pytest.mark.slow
@pytest.mark.parametrize("setting", RESUMED)
def test_a_2_rank_checkpoint_continues_in_one_process(tmp_path, two_ranks, reference_runs, setting):
    """In this process: the trainer the CLI builds, resuming a 2-rank run's checkpoint."""
    out, launch = two_ranks
    _job_ok(launch, setting)
    args = [*BASE, *_precision_flags(setting), "--output-dir", str(tmp_path / "continued"),
            "--resume", checkpoint(out[setting], RESUME_AT)]
    cfg = config_from_args(build_parser().parse_args(args))
    tr = RewardTrainer(cfg, log=lambda *a, **k: None)
    assert tr.train()["steps"] == STEPS
    _continued(tmp_path / "continued", reference_runs[SETTINGS[setting][0]], setting)


@pytest.mark.slow
def test_a_rank_that_fails_ends_the_job_with_its_message(two_ranks):
    # the launch's last job: rank 1 raises in its second step, rank 0 is left in the step's collectives
    _, launch = two_ranks
    _job_ok(launch, "check fsdp")  # the jobs before it ran
    assert launch.returncode != 0 and f"job {FAILING}: ok" not in launch.stdout
    assert "RuntimeError: injected failure on rank 1" in launch.stderr


@pytest.mark.slow
def test_a_setting_2_ranks_cannot_run_is_refused_by_every_rank_without_a_traceback(tmp_path):
    """End to end: torchrun and the CLI; the rules themselves are tested below, in this process."""
    logs = tmp_path / "logs"
    r = _torchrun(["-m", "metarm_fast.cli", *BASE, "--batch-size", "1", "--output-dir", str(tmp_path / "run")], logs)
    assert r.returncode != 0
    errs = sorted(logs.rglob("stderr.log"))
    assert len(errs) == 2, errs  # one per rank
    for rank, path in enumerate(sorted(errs, key=lambda p: p.parent.name)):
        text = path.read_text()
        assert f"metarm-fast train (rank {rank}): error: --batch-size 1 and --meta-batch-size 4" in text, text
        assert "split across the 2 ranks" in text and "Traceback" not in text, text
    assert not (tmp_path / "run").exists()  # refused before anything was written


# -- the rules, in this process ---------------------------------------------------------------------
def _cfg(**kw):
    return TrainConfig(**{"method": "metarm", "batch_size": 4, "meta_batch_size": 4, **kw})


REFUSED = [
    # (settings, world size, what the message must say)
    (dict(batch_size=1), 2, "split across the 2 ranks: each must be at least 2"),
    (dict(meta_batch_size=3), 4, "split across the 4 ranks: each must be at least 4"),
    (dict(second_order=True), 2, "--second-order is single-process only"),
    (dict(optimizer="adamw8bit"), 2, "DTensor"),  # auto is FSDP2 with several ranks
    (dict(optimizer="adamw8bit", parallel="fsdp"), 2, "DTensor"),
    (dict(parallel="fsdp"), 1, "--parallel fsdp needs several ranks"),
    (dict(parallel="none"), 2, "--parallel none, but torchrun started 2 ranks"),
    (dict(lora_r=8), 2, "--lora-r with FSDP2 is not supported yet"),
    (dict(lora_r=8, parallel="fsdp"), 2, "--lora-r with FSDP2 is not supported yet"),
]
ALLOWED = [
    (dict(), 1), (dict(), 2), (dict(parallel="ddp"), 2), (dict(parallel="fsdp"), 2),
    (dict(batch_size=2, meta_batch_size=2), 2),  # exactly one of each per rank
    (dict(batch_size=1, meta_batch_size=1), 1),
    (dict(method="vanilla", meta_batch_size=1), 2),  # a vanilla run has no meta batch to split
    (dict(second_order=True), 1), (dict(optimizer="adamw8bit"), 1),
    (dict(optimizer="adamw8bit", parallel="ddp"), 2),  # replicated parameters: bitsandbytes steps them
    (dict(lora_r=8, parallel="ddp"), 2), (dict(lora_r=8), 1),
    (dict(parallel="none"), 1),
]


@pytest.mark.parametrize("settings,world,message", REFUSED)
def test_settings_a_world_cannot_run_are_refused(settings, world, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_parallel(_cfg(**settings), world)


@pytest.mark.parametrize("settings,world", ALLOWED)
def test_settings_a_world_can_run_pass(settings, world):
    check_parallel(_cfg(**settings), world)  # no error: nothing else to look at


def test_the_trainer_applies_the_rules(tmp_path):
    """The rules above are the trainer's: one process asked for FSDP2 is refused."""
    with pytest.raises(ValueError, match="--parallel fsdp needs several ranks"):
        RewardTrainer(TrainConfig(parallel="fsdp", output_dir=str(tmp_path), progress=False))


@pytest.mark.slow
def test_fsdp2_is_given_what_it_expects_no_warning_of_wrong_gradients(two_ranks):
    """FSDP2 warns when a wrapped module returns a view ("can cause backward to fail or produce wrong
    gradients"): the reward model returns rewards of their own storage. (The warning came back in
    every FSDP job of this launch when RewardModel returned the squeezed view.)"""
    _, launch = two_ranks
    _job_ok(launch, "fsdp fp32")
    assert "returned a view tensor" not in launch.stderr, launch.stderr[-3000:]
