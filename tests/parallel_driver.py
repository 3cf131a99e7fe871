"""Run under torchrun by tests/test_parallel.py (not collected by pytest): the MetaRM step on every
rank of a DDP or FSDP2 run, checked from inside; or the CLI's main, after which the process group
must be gone (its gloo threads joined) before the interpreter exits.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/parallel_driver.py OUT [--fail-on-rank R]
    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/parallel_driver.py --cli train ...
"""
import argparse
import glob
import hashlib
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--fail-on-rank", type=int, default=None)
    ap.add_argument("--parallel", default="ddp")
    a = ap.parse_args()
    cfg = TrainConfig(method="metarm", eta=1e-2, max_steps=3, max_records=64, batch_size=4, meta_batch_size=4,
                      meta_k=3, max_length=48, tiny_hidden=32, progress=False, output_dir=a.out, overwrite=True,
                      parallel=a.parallel)
    tr = RewardTrainer(cfg)
    rank = tr.dist.rank
    for step in range(3):
        if a.fail_on_rank == rank and step == 1:
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
        if a.parallel == "ddp":  # replicas: the same bits everywhere
            assert len({s[:2] for s in seen}) == 1, f"step {step}: ranks differ in grad J or theta': {seen}"
            assert len({s[3] for s in seen}) == 1, f"step {step}: ranks differ in the reduced grad L: {seen}"
        else:  # shards: each rank its own part of the model
            assert stats.numel == sum(p.numel() for p in tr.weights.params), "the stats must cover the whole model"
        tr.optimizer_step()
    dist.barrier()
    if rank == 0:
        print(f"restore bitwise on every rank: ok ({a.parallel})")
    del tr
    shutdown_distributed()
    check_gloo_threads_gone(rank)


def main_cli(argv):
    rank = os.environ.get("RANK")
    rc = cli.main(argv)
    check_gloo_threads_gone(rank)
    return rc


if __name__ == "__main__":
    if sys.argv[1:2] == ["--cli"]:
        sys.exit(main_cli(sys.argv[2:]))
    main()
