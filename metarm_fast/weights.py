"""The trainable weights of a reward model, and where their fp32 truth lives.

``Weights`` owns the tensors every step touches: the trainable parameters (``params``), the fp32
master copies when the model computes in bf16 (``masters``), and the tensors the optimizer steps
(``opt_params``: the masters when there are any, else the parameters). It knows the master step,
the layout of the weights in a resume checkpoint and the state dict the export writes, so the loop,
the meta step, the memory accounting and the benches take this object, not a trainer.
"""
from __future__ import annotations

import torch

from metarm_fast.model import sparse_embedding_grad_

# Where a checkpoint's fp32 weights are: "masters" (one process, the bf16 compute copy re-cast from
# them) or "params" (the model's own parameters: fp32 runs, FSDP2's sharded masters).
MASTERS, PARAMS = "masters", "params"


class Weights:
    def __init__(self, module: torch.nn.Module, *, masters: bool = False):
        """``module``: the reward model (its trainable parameters are the weights). ``masters``: keep
        fp32 master weights, the module's own (bf16) parameters being their compute copy."""
        self.module = module
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.masters = [p.detach().float().clone().requires_grad_(True) for p in self.params] if masters else None

    @property
    def opt_params(self) -> list[torch.Tensor]:
        return self.masters if self.masters is not None else self.params

    @property
    def layout(self) -> str:
        return MASTERS if self.masters is not None else PARAMS

    def keep_grads_allocated(self) -> None:
        """Allocate every gradient buffer now (zeroed): the meta step keeps its exact-restore data in
        them, and a sparse embedding gradient is added into a dense buffer that must exist."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def sparse_embedding(self, hf: torch.nn.Module) -> None:
        """One process, no double backward: the embedding's gradient comes sparse and is added into a
        dense .grad allocated here (``sparse_embedding_grad_`` says why)."""
        if sparse_embedding_grad_(hf):
            self.keep_grads_allocated()

    def zero_grads(self) -> None:
        """Zero the gradient buffers, keeping them allocated (the meta step stores its restore data there)."""
        for p in self.params:
            if p.grad is not None:
                p.grad.zero_()

    def step(self, optimizer, scheduler=None, max_grad_norm: float = 0.0) -> float:
        """Clip (``max_grad_norm`` > 0) and step from the .grad buffers; returns the norm before clipping."""
        max_norm = max_grad_norm if max_grad_norm > 0 else float("inf")
        if self.masters is None:
            norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
            if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor norm over every rank's shards
                norm = norm.full_tensor()
            norm = float(norm)
            optimizer.step()
        else:
            norm = self._master_step(optimizer, max_norm)
        if scheduler is not None:
            scheduler.step()
        return norm

    @torch.no_grad()
    def _master_step(self, optimizer, max_norm: float) -> float:
        """Update the fp32 masters one tensor at a time from the bf16 gradients.

        Casting every gradient to fp32 at once would hold 4 more bytes per parameter during the step
        (26 GB for a 7B model). The optimizers used (torch AdamW, bitsandbytes' 8-bit AdamW) skip
        parameters whose .grad is None and keep per-parameter state, so stepping with one master
        gradient set at a time is the same update."""
        # The norm as torch's clip_grad_norm_ forms it (norm of per-tensor norms), one fp32 tensor at a time.
        norms = torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in self.params])
        total = torch.linalg.vector_norm(norms)
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p, mp in zip(self.params, self.masters):
            mp.grad = p.grad.float()
            mp.grad.mul_(scale)
            optimizer.step()
            mp.grad = None
            p.copy_(mp)  # the compute copy is always exactly round(master)
        return float(total)

    @torch.no_grad()
    def init_optimizer_state(self, optimizer) -> None:
        """Create the optimizer's per-parameter state (a step with zero gradients and lr 0), so that a
        checkpoint's state can be loaded into tensors of the right shapes. The weights do not move."""
        if optimizer.state:
            return
        lrs = [g["lr"] for g in optimizer.param_groups]
        for g in optimizer.param_groups:
            g["lr"] = 0.0
        for p in self.opt_params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        for p in self.opt_params:
            p.grad = None if self.masters is not None else p.grad.zero_()
        for g, lr in zip(optimizer.param_groups, lrs):
            g["lr"] = lr

    # -- checkpoints and export -------------------------------------------------------------------
    def state_dict(self) -> dict:
        """{"model": the module's state, "masters": the fp32 masters} (no masters: the module's state
        alone). With masters, the compute copy is round(master) exactly, so it is not saved."""
        model_state = self.module.state_dict()
        if self.masters is None:
            return {"model": model_state}
        for n in self.names:
            model_state.pop(n)
        return {"model": model_state, "masters": dict(zip(self.names, self.masters))}

    def adopt_layout(self, sd: dict, saved_layout: str) -> None:
        """Rearrange our ``state_dict()`` ``sd`` (in place) so a checkpoint written with
        ``saved_layout`` loads into it: its fp32 weights land where ours live."""
        if saved_layout == PARAMS and self.layout == MASTERS:  # e.g. FSDP2 bf16 -> one process
            sd["model"].update(sd.pop("masters"))
        elif saved_layout == MASTERS and self.layout == PARAMS:  # one process bf16-master -> FSDP2
            sd["masters"] = {n: sd["model"].pop(n) for n in self.names}

    @torch.no_grad()
    def after_load(self) -> None:
        """Once a checkpoint is loaded (in place, into the masters whichever layout it came in): the
        compute copy re-cast from them."""
        if self.masters is not None:
            for p, m in zip(self.params, self.masters):
                p.copy_(m)

    def export_state(self, prefix: str = "hf.") -> dict | None:
        """The state dict for the export when it must differ from the module's own: the fp32 masters,
        not their rounded bf16 compute copy. None: the module's own."""
        if self.masters is None:
            return None
        hf = getattr(self.module, "hf", self.module)
        sd = dict(hf.state_dict())
        sd.update({n.removeprefix(prefix): m.detach() for n, m in zip(self.names, self.masters)})
        return sd
