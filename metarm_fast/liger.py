"""``--liger``: Liger-Kernel's fused Triton RMSNorm, SwiGLU and RoPE in a Llama reward model (GPU only).

On a GPU each of these is several kernel launches and round trips through memory in eager
transformers; Liger fuses each into one (``apply_liger_kernel_to_llama`` patches a loaded model's
modules in place). Its loss kernels (cross entropy, fused linear cross entropy) are not used: a
reward model's loss is metarm-fast's own Bradley-Terry and difference kernels.

Liger's RoPE replaces transformers' ``apply_rotary_pos_emb`` in the Llama modelling module, so every
Llama built later in the same process uses it too.

Guarded: Liger's kernels are Triton GPU kernels (no CPU backend) and an optional extra
(``pip install -e .[liger]``); either missing stops the run with a message instead of an ImportError.
"""
from __future__ import annotations

import importlib.util

import torch
from torch import nn


def liger_unavailable(model: nn.Module) -> str | None:
    """Why --liger cannot be used here, or None when it can."""
    if not torch.cuda.is_available():
        return ("--liger needs a CUDA GPU: Liger-Kernel's fused RMSNorm/SwiGLU/RoPE are Triton GPU kernels with "
                "no CPU backend; on the CPU use --compile (torch.compile fuses the same element-wise work)")
    if importlib.util.find_spec("liger_kernel") is None:
        return "--liger needs Liger-Kernel: pip install -e .[liger] (or drop --liger)"
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind != "llama":
        return f"--liger is wired for Llama models (apply_liger_kernel_to_llama); this one is {kind!r}: drop --liger"
    return None


def apply_liger_(model: nn.Module) -> None:
    """Patch ``model`` (a loaded Llama reward model) with Liger's RMSNorm, SwiGLU and RoPE, in place."""
    why = liger_unavailable(model)
    if why:
        raise ValueError(why)
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False, model=model)
