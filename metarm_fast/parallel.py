"""Data parallelism, applied to a reward model from outside (the model knows nothing of it).

A run started by ``torchrun --nproc_per_node=N -m metarm_fast.cli train ...`` has N ranks; each
holds the whole model and a 1/N share of every step's pairs and meta groups. ``--batch-size`` and
``--meta-batch-size`` stay the global numbers per step.

How the MetaRM step stays exact on every rank (Algorithm 1 over the global batch):
- the J pass: each rank's J over its m/N prompts is weighted by its share, and DDP's all-reduce
  (an average) of the gradients gives grad J of the global meta batch, the same bits on every rank;
- every rank then perturbs and restores its own copy identically (same weights, same grad J), so
  no rank ever holds weights the others do not;
- the L pass likewise: one all-reduce of grad L(theta'); with gradient accumulation the earlier
  micro-batches skip theirs (``no_sync``), so each pass reduces once;
- non-finite losses are agreed across ranks before any backward, so no rank skips a step the others
  take, and no rank waits in an all-reduce the others left.
NCCL on GPUs (each rank on its LOCAL_RANK device), gloo on the CPU.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


# The device meshes apply_fsdp made, for shutdown_distributed to free their process groups.
_MESHES: list = []


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed() -> DistInfo:
    """The process group of a torchrun launch (or a single process when there is none)."""
    world = launched_world_size()
    cuda = torch.cuda.is_available()
    if world <= 1:
        return DistInfo(device=torch.device("cuda" if cuda else "cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return DistInfo(rank, world, local_rank, device)


def apply_ddp(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """Wrap the reward model in DistributedDataParallel.

    DDP's buckets are a copy of the gradients (one gradient of memory), filled from and written back to
    the .grad buffers after each all-reduce. Not ``gradient_as_bucket_view``: the meta step replaces
    .grad with a side buffer under gradient accumulation, which a bucket view does not allow."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.local_rank] if info.device.type == "cuda" else None
    return DDP(model, device_ids=ids, broadcast_buffers=False)


def apply_fsdp(model: torch.nn.Module, info: DistInfo, *, bf16_compute: bool) -> torch.nn.Module:
    """Shard the reward model with FSDP2 (``fully_shard``), in place: each decoder block, then the root.

    With ``bf16_compute`` the sharded parameters stay fp32 (they are the master weights the optimizer
    and the meta step work on), each block is all-gathered in bf16 for compute, and gradients are
    reduced in fp32 (``MixedPrecisionPolicy``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    _MESHES.append(mesh)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16_compute else MixedPrecisionPolicy()
    blocks = set(getattr(model.hf, "_no_split_modules", None) or [])
    for module in model.hf.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def no_sync(model, last: bool):
    """Skip the gradient reduction of every micro-batch but the last (DDP's ``no_sync``, FSDP2's
    ``set_requires_gradient_sync``); a no-op for a model that is not distributed."""
    if last:
        return contextlib.nullcontext()
    if hasattr(model, "set_requires_gradient_sync"):
        return _fsdp_no_sync(model)
    if hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def full_state_dict(model: torch.nn.Module) -> dict:
    """The whole model's state dict on every rank, on the CPU (gathers FSDP2's shards; a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def all_finite(x: torch.Tensor, info: DistInfo | None) -> bool:
    """Whether ``x`` is finite on every rank (one small all-reduce when distributed)."""
    ok = torch.isfinite(x.detach()).all()
    if info is None or not info.distributed:
        return bool(ok)
    flag = ok.to(torch.float32).reshape(1).to(info.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def sum_over_ranks(values: list[float], info: DistInfo | None) -> list[float]:
    if info is None or not info.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.tolist()


def shard(items: list, info: DistInfo | None) -> list:
    """This rank's share of a global batch: every N-th item from its rank on (sizes differ by at most 1)."""
    if info is None or not info.distributed:
        return items
    return items[info.rank :: info.world_size]


def broadcast_object(obj, info: DistInfo):
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when ``flag`` is true on any (one small all-reduce when distributed)."""
    if not info.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier(info: DistInfo | None) -> None:
    if info is not None and info.distributed:
        dist.barrier()


def shutdown_distributed() -> None:
    """Destroy the process group and free it while the interpreter is still whole; a no-op when there
    is none. Call it once the model is dropped.

    A process group that outlives ``destroy_process_group`` lives on into interpreter exit. There a
    gloo worker thread that releases a finished collective's tensors needs the GIL, which exit no
    longer hands out, and the process aborts ("terminate called without an active exception"; 3 of
    61 runs of tests/parallel_driver.py under DDP before this, none of 60 after). Two things keep
    the group alive: a DDP model in a reference cycle (the collect frees it), and FSDP2's device
    mesh, which DTensor's sharding caches keep to exit (its references to the groups are dropped).
    With the last reference gone, the group's threads are joined here."""
    import gc

    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for mesh in _MESHES:
        getattr(mesh, "_pg_registry", {}).clear()
    _MESHES.clear()
    gc.collect()
