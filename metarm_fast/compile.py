"""``--compile``: torch.compile of the reward model's element-wise-heavy modules, with dynamic shapes.

What is compiled: every RMSNorm and every gated MLP (gate/up projections, SiLU, product, down
projection) of a Llama-family model, each in place (``nn.Module.compile``: parameter names, the
state dict and the export stay as they are), with ``dynamic=True`` so that packed rows of any length
reuse one graph instead of recompiling per batch. Inductor fuses the norm's pow/mean/rsqrt/mul chain
and the SiLU-times-up product into single loops; the matmuls stay library GEMMs.

What is not, and why:
- attention: the block-wise SDPA of prompt sharing loops in Python over a per-batch list of block
  boundaries; traced, those ints would be guarded on and every batch would recompile. It stays
  eager (on a GPU FlexAttention compiles the attention itself, see ``model.choose_attention``).
- the whole model in one graph: transformers' mask and position code and the packed layout's
  ``.tolist()`` calls break the graph anyway, and the rest is what is compiled here.
- the meta step: ``metarm_fast/kernels/perturb*.py`` and ``metarm_fast/meta_step.py`` are never compiled (the
  perturbation's exactness argument is about eager IEEE arithmetic; no relaxed float flags touch
  it). The compiled modules read the weights as graph inputs on every call, so they see theta'
  after the in-place perturbation and theta after the bitwise restore (tests/test_compile.py).
"""
from __future__ import annotations

from torch import nn

COMPILED_SUFFIXES = ("RMSNorm", "MLP")


def compile_blocks_(model: nn.Module) -> int:
    """Compile ``model``'s RMSNorm and MLP modules in place; returns how many. Raises if there are none
    (a model family this does not know: --compile would silently do nothing)."""
    n = 0
    for module in model.modules():
        if type(module).__name__.endswith(COMPILED_SUFFIXES):
            module.compile(dynamic=True)
            n += 1
    if n == 0:
        raise ValueError(f"--compile: {type(model).__name__} has no RMSNorm or MLP modules to compile "
                         "(Llama-family decoders have them); drop --compile")
    return n
