"""Peak-memory accounting that works on the CPU, where torch keeps no allocator statistics.

`AllocationTracker` is a TorchDispatchMode: every tensor an op creates (forward, backward, optimizer)
is recorded by its storage, and a weak reference drops it when the storage is freed. Tensors that
already existed when tracking started (weights, gradient buffers, optimizer states) are counted once
as the baseline the caller passes in. On a GPU, `torch.cuda.max_memory_allocated` measures the same.
torch's own MemTracker does this per module but refuses repeated iterations of one model (checked
with torch 2.13), which is exactly what comparing a vanilla step to a meta step needs.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storage(t: torch.Tensor) -> tuple[int, int]:
    """(key, bytes) of what a tensor holds: its storage; for a sparse COO tensor (the embedding's
    gradient, see model.sparse_embedding_grad_), which has no storage of its own, its values' and
    indices' (``_values``/``_indices``: the uncoalesced accessors torch's sparse docs give)."""
    if t.layout == torch.sparse_coo:
        v, i = t._values().untyped_storage(), t._indices().untyped_storage()
        return v.data_ptr(), v.nbytes() + i.nbytes()
    st = t.untyped_storage()
    return st.data_ptr(), st.nbytes()


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        key, nbytes = _storage(t)
        if key not in seen:
            seen.add(key)
            total += nbytes
    return total


class AllocationTracker(TorchDispatchMode):
    """Live and peak bytes of the tensors created while active (plus a fixed baseline)."""

    def __init__(self, baseline: int = 0):
        super().__init__()
        self.baseline = baseline
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}
        self._refs = []

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Outputs that share storage with an input (in-place ops, views) allocate nothing.
        inputs = {_storage(t)[0] for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                key, nbytes = _storage(t)
                if key and key not in self._live and key not in inputs:
                    self._live[key] = nbytes
                    self.current += nbytes
                    self.peak = max(self.peak, self.current)
                    st = t._values().untyped_storage() if t.layout == torch.sparse_coo else t.untyped_storage()
                    self._refs.append(weakref.ref(st, lambda _r, k=key: self._free(k)))
        return out

    @property
    def peak_bytes(self) -> int:
        return self.baseline + self.peak


def standing_bytes(weights, optimizer) -> int:
    """Bytes held between steps: the module's weights (frozen ones too: LoRA's base), gradient
    buffers, optimizer states, fp32 masters. ``weights``: a ``metarm_fast.weights.Weights``."""
    states = [t for st in optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    return tensor_bytes(list(weights.module.parameters()) + [p.grad for p in weights.params] + states
                        + (weights.masters or []))


def step_peak_bytes(weights, optimizer, fn) -> int:
    """Peak bytes while `fn` (one step) runs: the CUDA allocator's figure on a GPU, else accounting."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    with AllocationTracker(standing_bytes(weights, optimizer)) as t:
        fn()
    return t.peak_bytes


def compare_step_peaks(weights, optimizer, batcher, micro, groups, *, vanilla_step, meta_step, eta: float,
                       center_coef: float = 0.0) -> dict:
    """Peak bytes of a vanilla, an in-place MetaRM and a copy-based MetaRM step on the same batch.

    ``vanilla_step()`` and ``meta_step()`` take one step each (the trainer's ``train_step`` on ``micro``,
    without and with ``groups``). One warm-up step first, so that optimizer states and gradient buffers
    exist (they are the standing bytes of every step)."""
    from metarm_fast.reference import copy_based_meta_step

    meta_step()
    vanilla = step_peak_bytes(weights, optimizer, vanilla_step)
    meta = step_peak_bytes(weights, optimizer, meta_step)
    copy_based = step_peak_bytes(weights, optimizer, lambda: copy_based_meta_step(
        weights.module, weights, optimizer, batcher, micro, groups, eta=eta, center_coef=center_coef))
    return {"param_bytes": tensor_bytes(weights.params), "vanilla": vanilla, "metarm": meta, "copy_based": copy_based}
