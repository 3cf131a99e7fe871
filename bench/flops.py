"""FLOP and MFU accounting of bench.throughput.

  FLOPs per step = 6 * N * tokens computed + attention, N = parameters without the input embedding
                   (a lookup, no multiply-adds); attention = 12 * heads * head_dim * layers * the
                   (query, key) pairs the layout attends causally (padding and masked pairs are no
                   model FLOPs); the meta step's element-wise perturb/restore are left out
  MFU            = FLOPs per step / step time / peak FLOP/s (``peak_flops``)
"""
from __future__ import annotations

import torch

from bench.peak import datasheet_peak, measure_gemm_peak


def flop_params(model) -> int:
    """N of 6*N*tokens: every parameter but the input embedding table (a lookup, no multiply-adds)."""
    emb = model.get_input_embeddings().weight
    return sum(p.numel() for p in model.parameters()) - emb.numel()


def attention_pairs(groups, packing: str) -> int:
    """(query, key) pairs a causal pass attends over `groups` in layout `packing`: L(L+1)/2 per sequence;
    shared, a group's prompt once (P(P+1)/2) and each response r its prompt and itself (r*P + r(r+1)/2).
    Padding and masked-out pairs are not counted: they are no model FLOPs."""
    n = 0
    for g in groups:
        if packing == "share-prompt":
            p = len(g[0].prompt_ids)
            n += p * (p + 1) // 2 + sum(len(s.response_ids) * p + len(s.response_ids) * (len(s.response_ids) + 1) // 2
                                        for s in g)
        else:
            n += sum(len(s) * (len(s) + 1) // 2 for s in g)
    return n


def attention_flops(pairs: int, config) -> float:
    """fwd + bwd attention FLOPs of one pass: per layer and attended pair, QK^T and PV take 2 * d each per
    head (4 * heads * head_dim forward), the backward twice that: 12 * heads * head_dim * pairs."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 12.0 * config.num_attention_heads * head_dim * config.num_hidden_layers * pairs


def step_flops(nflop: int, tokens: int, pairs: int, config) -> float:
    """FLOPs of a step that computed `tokens` tokens and attended `pairs` (query, key) pairs, all passes."""
    return 6 * nflop * tokens + attention_flops(pairs, config)


def mfu(flops: float, seconds: float, peak: float) -> float:
    """Model FLOPs utilisation: the FLOP rate a step reached over the peak FLOP/s."""
    return flops / seconds / peak


def peak_flops(precision: str, override: float | None, config=None, tokens: int = 0) -> tuple[float | None, str]:
    """The peak MFU is against: --peak-flops; a GPU's datasheet value; on the CPU a GEMM measured at the
    model's own linear shapes and ``tokens`` rows (bench.peak)."""
    if override:
        return override, "--peak-flops"
    if torch.cuda.is_available():
        return datasheet_peak(torch.cuda.get_device_name(), precision)
    if config is None or tokens < 1:
        return None, "unknown for the CPU (no model shapes to measure at)"
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float32
    m = measure_gemm_peak(config, tokens, dtype)
    return m["flops_per_s"], (f"measured: torch.mm at this model's linear shapes, {tokens} rows, "
                              f"{m['dtype']}, {torch.get_num_threads()} threads = {m['flops_per_s'] / 1e9:.1f} GFLOP/s")
