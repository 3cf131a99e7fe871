"""Run under torchrun by tests/test_parallel.py (not collected by pytest).

Jobs, run one after another in the same ranks (one launch pays torchrun's and the imports' start-up
once); after each, the process group must be gone (its gloo threads joined), and the next job makes
a new one, as a fresh launch would:
- ``cli``: the CLI's main with these arguments (what ``python -m metarm_fast.cli`` runs) must return 0;
- ``check``: the MetaRM step on every rank of a DDP or FSDP2 run, checked from inside (with
  ``fail_on_rank``: that rank raises during its second step, which must end the launch).
Rank 0 prints ``job NAME: ok`` after each job that passed; any failure ends the launch.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/parallel_driver.py JOBS.json

JOBS.json: a list of {"name": ..., "cli": [argv...]} or
{"name": ..., "check": OUT, "parallel": "ddp"|"fsdp"[, "fail_on_rank": R][, "direction": "sgd"|"adam"|"optimizer-step"]}.
"""
import glob
import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from metarm_fast import cli  # noqa: E402
from metarm_fast.config import TrainConfig  # noqa: E402
from metarm_fast.parallel import shutdown_distributed  # noqa: E402
from metarm_fast.steps import j_pass, l_pass  # noqa: E402
from metarm_fast.trainer import RewardTrainer  # noqa: E402


def local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def digest(tensors) -> str:
    """Of this rank's tensors: the whole model under DDP, this rank's shards under FSDP2."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(local(t).detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def gloo_threads() -> list[str]:
    """The names of this process's gloo threads (Linux names its threads in /proc)."""
    names = [open(f).read().strip() for f in glob.glob("/proc/self/task/*/comm")]
    return [n for n in names if "gloo" in n]


def check_gloo_threads_gone(rank) -> None:
    # A group still alive at exit can abort the process there (see shutdown_distributed).
    left = gloo_threads()
    assert not left, f"rank {rank}: the process group outlived the shutdown: {left} still run"


def check_step(out, parallel="ddp", fail_on_rank=None, direction="sgd") -> None:
    """Three MetaRM steps; on every rank: theta' moved, the restore bitwise, the ranks agreeing."""
    cfg = TrainConfig(method="metarm", eta=1e-2, max_steps=3, max_records=64, batch_size=4, meta_batch_size=4,
                      meta_k=3, max_length=48, tiny_hidden=32, progress=False, output_dir=out, overwrite=True,
                      parallel=parallel, meta_direction=direction)
    tr = RewardTrainer(cfg)
    rank = tr.dist.rank
    for step in range(3):
        if fail_on_rank == rank and step == 1:
            raise RuntimeError(f"injected failure on rank {rank}")
        micro, groups = tr.step_inputs(step)
        before = [local(p).detach().clone() for p in tr.weights.params]
        tr.weights.zero_grads()
        j_pass(tr.model, tr.batcher.groups(groups), info=tr.dist, global_groups=cfg.meta_batch_size)
        gj = digest([p.grad for p in tr.weights.params])
        with tr.meta.perturbed() as stats:
            moved = digest(tr.weights.params)
            assert stats.changed > 0 and moved != digest(before)
            l_pass(tr.model, [tr.batcher.pairs(m) for m in micro], info=tr.dist, global_pairs=cfg.batch_size)
        restored = all(torch.equal(local(p).view(torch.uint8), b.view(torch.uint8)) for p, b in zip(tr.weights.params, before))
        seen = [None] * tr.dist.world_size
        dist.all_gather_object(seen, (gj, moved, restored, digest([p.grad for p in tr.weights.params]),
                                      (stats.numel, stats.changed, stats.realised_sq)))
        assert all(s[2] for s in seen), f"step {step}: the restore was not bitwise on every rank: {seen}"
        assert len({s[4] for s in seen}) == 1, f"step {step}: ranks disagree on the perturbation's stats: {seen}"
        if parallel == "ddp":  # replicas: the same bits everywhere
            assert len({s[:2] for s in seen}) == 1, f"step {step}: ranks differ in grad J or theta': {seen}"
            assert len({s[3] for s in seen}) == 1, f"step {step}: ranks differ in the reduced grad L: {seen}"
        else:  # shards: each rank its own part of the model
            assert stats.numel == sum(p.numel() for p in tr.weights.params), "the stats must cover the whole model"
        tr.optimizer_step()
    dist.barrier()
    del tr
    shutdown_distributed()


def fresh_group(i: int) -> None:
    """A new default process group for job ``i`` > 0, on keys of its own in torchrun's store: a group
    made again under the keys of the destroyed one would read that group's stale addresses. (Job 0
    leaves it to the trainer, as a fresh launch does.)"""
    if i == 0:
        return
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    dist.init_process_group("gloo", store=dist.PrefixStore(f"job-{i}", store), rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]))


def run_jobs(path) -> None:
    rank = os.environ.get("RANK")
    with open(path) as f:
        jobs = json.load(f)
    for i, job in enumerate(jobs):
        fresh_group(i)
        if "cli" in job:
            rc = cli.main(job["cli"])
            assert rc == 0, f"rank {rank}: job {job['name']}: the CLI returned {rc}"
        else:
            check_step(job["check"], job["parallel"], job.get("fail_on_rank"), job.get("direction", "sgd"))
        check_gloo_threads_gone(rank)
        if rank == "0":
            print(f"job {job['name']}: ok", flush=True)


if __name__ == "__main__":
    run_jobs(sys.argv[1])
