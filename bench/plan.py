"""Plan a reward-model run on a GPU: memory by item, FLOPs, step time and epoch time, per optimisation.

    python -m bench.plan --model llama-2-7b --gpu a100-80g --batch 16 --max-length 1024 [--gpus 8]
    python -m bench.plan --validate        # the memory model against a CPU measurement, exit 1 if > 15% off

The model behind every figure (memory items, activations, FLOPs, bytes moved, FSDP2) and the planned
7B results are in docs/plan-7b.md.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import asdict, dataclass, replace

GB = 1e9
MIB = 2**20
HH_RLHF_PAIRS = 161_000  # Anthropic HH-RLHF train split: 161k pairs


# -- model shapes and GPUs -----------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    params_override: float | None = None  # --params: N for the per-parameter items instead of the count

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layer_matmul_params(self) -> int:
        h, d = self.hidden, self.head_dim
        attn = h * self.heads * d * 2 + h * self.kv_heads * d * 2  # q, o; k, v
        return attn + 3 * h * self.intermediate  # gate, up, down

    def matmul_params(self) -> int:
        """Weights that multiply every token: the layers' projections (+ the 1-output head)."""
        return self.layers * self.layer_matmul_params() + self.hidden

    def counted_params(self) -> int:
        """Parameters of the reward model: embeddings, layers (with 2 norms each), final norm, score head."""
        h = self.hidden
        return self.vocab * h + self.layers * (self.layer_matmul_params() + 2 * h) + h + h

    def params(self) -> float:
        return self.params_override if self.params_override else self.counted_params()

    def largest_tensor(self) -> int:
        return max(self.vocab * self.hidden, self.hidden * self.intermediate, self.hidden * self.heads * self.head_dim)


MODELS = {
    # Published configs (config.json of each checkpoint).
    "llama-2-7b": Shape("Llama-2-7B", 4096, 32, 32, 32, 11008, 32000),
    "llama-2-13b": Shape("Llama-2-13B", 5120, 40, 40, 40, 13824, 32000),
    "llama-3-8b": Shape("Llama-3-8B", 4096, 32, 32, 8, 14336, 128256),
}


@dataclass(frozen=True)
class GPU:
    name: str
    memory: float  # bytes
    bf16_flops: float  # dense peak, FLOP/s
    hbm: float  # bytes/s


GPUS = {
    # NVIDIA data sheets: A100 SXM 312 TFLOP/s bf16 dense, 1.555 TB/s (40 GB) / 2.039 TB/s (80 GB);
    # H100 SXM5 989 TFLOP/s bf16 dense, 3.35 TB/s. "80 GB" cards hold 80 GiB.
    "a100-80g": GPU("A100-SXM-80GB", 80 * 2**30, 312e12, 2.039e12),
    "a100-40g": GPU("A100-SXM-40GB", 40 * 2**30, 312e12, 1.555e12),
    "h100-80g": GPU("H100-SXM-80GB", 80 * 2**30, 989e12, 3.35e12),
}


# -- geometry of one pass ------------------------------------------------------------------------
@dataclass(frozen=True)
class Geometry:
    """What a forward/backward pass computes: token positions, rewards, attention work, saved mask."""

    tokens: float  # token positions the layers compute (padding included)
    rewards: int  # sequences whose reward is read (B)
    qk: float  # sum over sequences of queries x keys attended (full attention): the attention FLOPs
    mask_elems: float = 0.0  # elements of the additive mask CPU SDPA saves per layer (padded batches)
    kv_repeated: bool = False  # k/v saved at all heads (transformers repeats them when it passes a mask)


def split_ratios(r_pack: float, r_share: float) -> tuple[float, float]:
    """Mean prompt and response lengths as fractions of the padded length, from the two pair ratios.

    A pair is 2 (P + R) tokens unpadded and P + 2R with its prompt once, out of 2 L padded:
    r_pack = (P + R) / L, r_share = (P + 2R) / (2L)  =>  P/L = 2 (r_pack - r_share), R/L = 2 r_share - r_pack.
    """
    p, r = 2 * (r_pack - r_share), 2 * r_share - r_pack
    if not (0 < r_share <= r_pack <= 1) or r <= 0 or p < 0:
        raise ValueError(
            f"token ratios: need 0 < shared ({r_share}) <= packed ({r_pack}) <= 1 and shared > packed/2 "
            "(a pair's prompt counted once cannot save more than half of its tokens)"
        )
    return p, r


def pass_geometry(groups: int, k: int, length: float, pack: bool, share: bool, r_pack: float, r_share: float) -> Geometry:
    """A pass over `groups` groups of k sequences (a pair: k = 2) padded to `length` (see module docstring)."""
    n = groups * k
    p, r = split_ratios(r_pack, r_share)
    P, R = p * length, r * length
    if share and pack:
        return Geometry(groups * (P + k * R), n, groups * (P * P + k * R * (P + R)))
    if share:
        row = length + (k - 1) * R  # [prompt | k responses], padded to the longest row (estimate)
        return Geometry(groups * row, n, groups * row * row)
    if pack:
        ell = r_pack * length  # mean sequence; sum of squares >= n * mean^2 (Jensen): a lower bound
        return Geometry(n * ell, n, n * ell * ell)
    return Geometry(n * length, n, n * length * length)


# -- activations ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Activations:
    saved: float  # bytes saved for backward when the backward starts (or, with checkpointing, at its peak)
    working: float  # backward working set on top of it at the peak
    detail: dict

    @property
    def total(self) -> float:
        return self.saved + self.working


def layer_saved_bytes(s: Shape, g: Geometry, e: int) -> dict:
    """Bytes one decoder layer saves for backward (module docstring: the per-layer formula)."""
    T, h, i, d = g.tokens, s.hidden, s.intermediate, s.head_dim
    kv = s.heads if g.kv_repeated else s.kv_heads
    norms = 2 * T * (4 * h + 2 * e * h + 4)
    attn = T * e * (2 * s.heads * d + 2 * kv * d) + T * 4 * s.heads + e * g.mask_elems
    mlp = T * e * 4 * i
    return {"norms": norms, "attention": attn, "mlp": mlp, "total": norms + attn + mlp}


def model_saved_bytes(s: Shape, g: Geometry, e: int) -> dict:
    """Everything a full (not checkpointed) forward saves: layers + embedding ids, RoPE, final norm, head."""
    T, h = g.tokens, s.hidden
    layer = layer_saved_bytes(s, g, e)["total"]
    shared = 8 * T + 2 * e * T * s.head_dim + g.rewards * (e * h + 2 * 8)  # ids, cos+sin, head input + indices
    final = T * (4 * h + e * h + 4)
    return {"layer": layer, "layers": s.layers * layer, "shared": shared, "final_norm": final,
            "total": s.layers * layer + shared + final}


def activation_bytes(s: Shape, g: Geometry, e: int, ckpt: bool) -> Activations:
    T, h, i = g.tokens, s.hidden, s.intermediate
    m = model_saved_bytes(s, g, e)
    w_norm = T * h * (e + (4 if e != 4 else 0) + 12)
    w_mlp = T * e * (h + 2 * i)
    if not ckpt:
        at_norm, at_mlp = w_norm, w_mlp - m["final_norm"]
        working = max(at_norm, at_mlp)
        return Activations(m["total"], working, {**m, "w_norm": w_norm, "w_mlp": w_mlp})
    checkpoints = s.layers * e * T * h + m["shared"]
    dup = 4 * T * h if e == 4 else 0
    at_norm = m["final_norm"] + w_norm
    at_mlp = m["layer"] - dup + w_mlp
    if at_norm >= at_mlp:
        saved, working = checkpoints + m["final_norm"], w_norm
    else:
        saved, working = checkpoints + m["layer"] - dup, w_mlp
    return Activations(saved, working, {**m, "checkpoints": checkpoints, "w_norm": w_norm, "w_mlp": w_mlp})


# -- FLOPs and time ------------------------------------------------------------------------------
def pass_flops(s: Shape, g: Geometry, ckpt: bool) -> dict:
    dense = (8 if ckpt else 6) * s.matmul_params() * g.tokens
    attention = (16 if ckpt else 12) * s.layers * s.heads * s.head_dim * g.qk
    return {"dense": dense, "attention": attention, "total": dense + attention}


OPT_BYTES = {"adamw": 60, "adamw8bit": 16}  # bytes moved per parameter by the optimizer itself
CAST_CLIP_REFRESH = 6 + 12 + 6  # bf16->fp32 grad cast, clip_grad_norm_ (norm + scale), bf16 refresh
META_BYTES = {"inplace": 12 + 6, "copy": 8 + 10 + 6 + 8 + 6}


# -- one combination -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Combo:
    step: str  # vanilla | metarm
    optimizer: str  # adamw | adamw8bit
    ckpt: bool
    pack: bool
    share: bool
    meta: str = "-"  # inplace | copy (metarm only)

    @property
    def label(self) -> str:
        return "vanilla" if self.step == "vanilla" else f"metarm-{self.meta}"


def combos() -> list[Combo]:
    out = []
    for step, meta in (("vanilla", "-"), ("metarm", "inplace"), ("metarm", "copy")):
        for opt, ckpt, pack, share in itertools.product(("adamw", "adamw8bit"), (False, True), (False, True), (False, True)):
            out.append(Combo(step, opt, ckpt, pack, share, meta))
    return out


def standing_items(s: Shape, optimizer: str, copy_backup: bool) -> dict:
    n = s.params()
    items = {
        "bf16 compute weights": 2 * n,
        "fp32 master weights": 4 * n,
        "bf16 gradients": 2 * n,
        "optimizer states": (8 if optimizer == "adamw" else 2) * n,
    }
    if optimizer == "adamw8bit":
        items["8-bit absmax (fp32 per 256)"] = 2 * 4 * n / 256
    if copy_backup:
        items["copy-based backup (fp32)"] = 4 * n
    return items


def optimizer_step_items(s: Shape, optimizer: str, cast: str) -> dict:
    big = s.largest_tensor()
    items = {"fp32 master gradients": 4 * (s.params() if cast == "all" else big)}
    if optimizer == "adamw":
        items["AdamW temporaries"] = 2 * 4 * big
    return items


def evaluate(c: Combo, s: Shape, gpu: GPU, a) -> dict:
    """Memory, FLOPs, time of one combination (a: the parsed arguments)."""
    e = 2
    passes = [("pairs", a.batch, 2)]
    if c.step == "metarm":
        passes.insert(0, ("meta", a.meta_prompts, a.meta_k))
    stand = standing_items(s, c.optimizer, c.meta == "copy")
    standing = sum(stand.values())
    acts = {name: activation_bytes(s, pass_geometry(g, k, a.max_length, c.pack, c.share, a.packed_ratio, a.shared_ratio), e, c.ckpt)
            for name, g, k in passes}
    worst = max(acts, key=lambda n: acts[n].total)
    backward_peak = standing + acts[worst].total
    opt = optimizer_step_items(s, c.optimizer, a.master_grad_cast)
    opt_peak = standing + sum(opt.values())
    peak = max(backward_peak, opt_peak)

    mean_len = min(a.mean_padded_length, a.max_length)
    flops = {name: pass_flops(s, pass_geometry(g, k, mean_len, c.pack, c.share, a.packed_ratio, a.shared_ratio), c.ckpt)
             for name, g, k in passes}
    total_flops = sum(f["total"] for f in flops.values())
    t_compute = total_flops / (a.mfu * gpu.bf16_flops)
    bw = a.hbm_efficiency * gpu.hbm
    t_opt = (OPT_BYTES[c.optimizer] + CAST_CLIP_REFRESH) * s.params() / bw
    t_meta = META_BYTES[c.meta] * s.params() / bw if c.step == "metarm" else 0.0
    t_step = t_compute + t_opt + t_meta
    pairs_s = a.batch / t_step
    return {
        "step": c.label, "optimizer": c.optimizer, "checkpointing": c.ckpt, "packing": c.pack,
        "prompt_sharing": c.share,
        "memory_items_GB": {k: v / GB for k, v in stand.items()}
        | {f"activations ({n}, saved)": act.saved / GB for n, act in acts.items()}
        | {f"backward working set ({n})": act.working / GB for n, act in acts.items()}
        | {f"optimizer step: {k}": v / GB for k, v in opt.items()},
        "backward_peak_GB": backward_peak / GB, "optimizer_step_peak_GB": opt_peak / GB,
        "memory_GB": peak / GB, "peak_phase": "backward" if backward_peak >= opt_peak else "optimizer step",
        "fits": peak <= usable_memory(gpu, a),
        "flops_per_step": total_flops, "flops_by_pass": flops,
        "step_s": t_step, "compute_s": t_compute, "optimizer_s": t_opt, "meta_s": t_meta,
        "pairs_per_s_1gpu": pairs_s,
        "hours_per_epoch_1gpu": a.epoch_pairs / pairs_s / 3600,
        "hours_per_epoch_8gpu": a.epoch_pairs / (8 * pairs_s) / 3600,
    }


def evaluate_fsdp(ckpt: bool, pack: bool, share: bool, s: Shape, gpu: GPU, a, gpus: int) -> dict:
    """Per-GPU memory and time of the in-place MetaRM step under FSDP2 on ``gpus`` GPUs (a planned
    figure: nothing here has run on a GPU).

    The trainer under FSDP2 (metarm_fast.parallel.apply_fsdp): fp32 sharded parameters (the masters),
    fp32 sharded gradients (reduced in fp32), torch AdamW's fp32 states on the shards (bitsandbytes'
    8-bit AdamW does not take DTensors), bf16 compute. Per GPU:
    - standing: (4 + 4 + 8) B/param / gpus;
    - the meta step's z, one local gradient shard during the L pass: 4 B/param / gpus;
    - unsharded while in use: the root module's bf16 weights (embedding, final norm, head: not
      resharded between forward and backward) and two decoder blocks in bf16 (the one computing and
      the one prefetched), with a block's bf16 gradient and its fp32 reduce-scatter input;
    - activations of this GPU's share of the global batch (``--batch`` pairs, ``--meta-prompts`` groups).
    Time: the FLOPs of this GPU's share at ``--mfu``; the optimizer and the meta step on the shards; and
    per pass an all-gather of the bf16 weights for the forward and again for the backward plus a
    reduce-scatter of fp32 gradients, (2 + 2 + 4) B/param x (gpus - 1) / gpus at ``--allreduce-gbps``.
    ``step_s`` assumes the communication overlaps the compute (FSDP2 prefetches), ``step_s_no_overlap``
    that it does not."""
    n, e = s.params(), 2
    block = s.layer_matmul_params() + 2 * s.hidden
    root = s.vocab * s.hidden + 2 * s.hidden
    per = lambda b: b * n / gpus  # noqa: E731
    items = {
        "fp32 sharded weights (masters)": per(4),
        "fp32 sharded gradients": per(4),
        "AdamW states (fp32, sharded)": per(8),
        "meta step: z, one local gradient shard": per(4),
        "unsharded root (bf16)": 2 * root,
        "unsharded blocks in use (2 x bf16) + a block's bf16 grad and fp32 reduce buffer": (2 * 2 + 2 + 4) * block,
    }
    standing = sum(items.values())
    passes = [("meta", max(1, a.meta_prompts // gpus), a.meta_k), ("pairs", max(1, a.batch // gpus), 2)]
    acts = {name: activation_bytes(s, pass_geometry(g, k, a.max_length, pack, share, a.packed_ratio, a.shared_ratio), e, ckpt)
            for name, g, k in passes}
    worst = max(acts, key=lambda k: acts[k].total)
    peak = standing + acts[worst].total
    mean_len = min(a.mean_padded_length, a.max_length)
    flops = sum(pass_flops(s, pass_geometry(g, k, mean_len, pack, share, a.packed_ratio, a.shared_ratio), ckpt)["total"]
                for _, g, k in passes)
    t_compute = flops / (a.mfu * gpu.bf16_flops)
    bw = a.hbm_efficiency * gpu.hbm
    t_local = (OPT_BYTES["adamw"] + META_BYTES["inplace"]) * n / gpus / bw
    t_comm = len(passes) * (2 + 2 + 4) * n * (gpus - 1) / gpus / (a.allreduce_gbps * GB)
    t_step = max(t_compute, t_comm) + t_local
    pairs_s = (a.batch // gpus) * gpus / t_step
    return {
        "gpus": gpus, "checkpointing": ckpt, "packing": pack, "prompt_sharing": share,
        "memory_items_GB": {k: v / GB for k, v in items.items()}
        | {f"activations ({k}, this GPU's share)": v.total / GB for k, v in acts.items()},
        "memory_GB": peak / GB, "fits": peak <= usable_memory(gpu, a),
        "compute_s": t_compute, "comm_s": t_comm, "local_s": t_local,
        "step_s": t_step, "step_s_no_overlap": t_compute + t_comm + t_local,
        "pairs_per_s": pairs_s, "hours_per_epoch": a.epoch_pairs / pairs_s / 3600,
    }


def fsdp_plan(a, s: Shape, gpu: GPU) -> dict:
    rows = [evaluate_fsdp(ckpt, pack, share, s, gpu, a, a.gpus)
            for ckpt, pack, share in itertools.product((False, True), (False, True), (False, True))]
    fitting = [r for r in rows if r["fits"]]
    rec = min(fitting, key=lambda r: (r["step_s"], r["memory_GB"])) if fitting else None
    return {"rows": rows, "recommended": rec}


def print_fsdp_plan(fp: dict, s: Shape, gpu: GPU, a, out=print) -> None:
    out(f"\n{a.gpus} x {gpu.name}, FSDP2 (planned): global batch {a.batch} pairs ({a.batch // a.gpus} per GPU), "
        f"meta batch {a.meta_prompts} x {a.meta_k}; fp32 sharded masters, bf16 compute, torch AdamW; "
        f"{a.allreduce_gbps:g} GB/s collective bandwidth")
    out(f"  {'ckpt':<4} {'pack':<4} {'share':<5} | {'GB/GPU':>7} {'fits':<4} | {'compute s':>9} {'comm s':>7} "
        f"{'step s':>7} {'(no overlap)':>12} {'pairs/s':>8} {'h/epoch':>8}")
    for r in fp["rows"]:
        mark = "*" if r is fp["recommended"] else " "
        out(f"{mark} {_yn(r['checkpointing']):<4} {_yn(r['packing']):<4} {_yn(r['prompt_sharing']):<5} | "
            f"{r['memory_GB']:7.1f} {'yes' if r['fits'] else 'no':<4} | {r['compute_s']:9.3f} {r['comm_s']:7.3f} "
            f"{r['step_s']:7.3f} {r['step_s_no_overlap']:12.3f} {r['pairs_per_s']:8.2f} {r['hours_per_epoch']:8.2f}")
    rec = fp["recommended"]
    if rec:
        opts = [k for k, on in (("activation checkpointing", rec["checkpointing"]), ("packing", rec["packing"]),
                                ("prompt sharing", rec["prompt_sharing"])) if on]
        out(f"Recommended for {a.gpus} x {gpu.name}: FSDP2 (`torchrun --nproc_per_node={a.gpus} ... --precision "
            f"bf16-master`), torch AdamW" + (", " + ", ".join(opts) if opts else "") +
            f": {rec['memory_GB']:.1f} GB per GPU, {rec['step_s']:.2f} s/step, {rec['hours_per_epoch']:.2f} h per epoch "
            f"({rec['step_s_no_overlap']:.2f} s/step if no communication overlaps).")
    else:
        out(f"Nothing fits on {a.gpus} x {gpu.name} under FSDP2.")


def usable_memory(gpu: GPU, a) -> float:
    return (gpu.memory - a.reserve_gb * GB) * (1 - a.headroom)


def recommend(rows: list[dict]) -> dict | None:
    fitting = [r for r in rows if r["step"].startswith("metarm") and r["fits"]]
    return min(fitting, key=lambda r: (r["step_s"], r["memory_GB"])) if fitting else None


def plan(a) -> dict:
    s = resolve_shape(a)
    gpu = GPUS[a.gpu]
    rows = [evaluate(c, s, gpu, a) for c in combos()]
    rec = recommend(rows)
    for r in rows:
        r["recommended"] = r is rec
    alt = None
    if rec is None and a.master_grad_cast == "all":
        alt = recommend([evaluate(c, s, gpu, replace_ns(a, master_grad_cast="per-tensor")) for c in combos()])
    return {"shape": s, "gpu": gpu, "rows": rows, "recommended": rec, "recommended_per_tensor_cast": alt}


def replace_ns(a, **kw):
    b = argparse.Namespace(**vars(a))
    for k, v in kw.items():
        setattr(b, k, v)
    return b


def resolve_shape(a) -> Shape:
    fields = ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab")
    given = {f: getattr(a, f) for f in fields if getattr(a, f) is not None}
    if a.model == "custom":
        missing = [f"--{f.replace('_', '-')}" for f in fields if f not in given and f != "kv_heads"]
        if missing:
            raise SystemExit(f"--model custom needs {', '.join(missing)}")
        given.setdefault("kv_heads", given["heads"])
        s = Shape("custom", **given)
    else:
        s = replace(MODELS[a.model], **given)
    if s.hidden % s.heads or s.heads % s.kv_heads:
        raise SystemExit(f"shape: hidden ({s.hidden}) must divide by heads ({s.heads}), heads by kv heads ({s.kv_heads})")
    return replace(s, params_override=a.params) if a.params else s


# -- printing ------------------------------------------------------------------------------------
def _yn(b: bool) -> str:
    return "on" if b else "-"


def print_plan(p: dict, a, out=print) -> None:
    s, gpu, rows = p["shape"], p["gpu"], p["rows"]
    n = s.params()
    usable = usable_memory(gpu, a)
    mean_len = min(a.mean_padded_length, a.max_length)
    out(f"{s.name} reward model: hidden {s.hidden}, {s.layers} layers, {s.heads} heads ({s.kv_heads} kv), "
        f"intermediate {s.intermediate}, vocab {s.vocab}")
    out(f"  N = {n:.4g} parameters" + (f" (--params; the shape counts {s.counted_params():.4g})" if s.params_override
                                        else " (embeddings + layers + final norm + score head; no LM head)")
        + f"; matmul weights {s.matmul_params():.4g}")
    out(f"{gpu.name}: {gpu.memory / GB:.1f} GB, usable {usable / GB:.1f} GB (minus {a.reserve_gb} GB reserve, "
        f"{a.headroom:.0%} allocator headroom); {gpu.bf16_flops / 1e12:.0f} TFLOP/s bf16 dense; HBM {gpu.hbm / 1e12:.2f} TB/s")
    out(f"Step: {a.batch} pairs; MetaRM meta batch {a.meta_prompts} prompts x {a.meta_k} responses. bf16 compute, fp32 masters.")
    out(f"  memory at the worst step (padded to --max-length {a.max_length}); time at the mean step "
        f"(padded length {mean_len:g}); packed/shared tokens: x{a.packed_ratio} / x{a.shared_ratio} of padded")

    out("\nMemory by item (GB)")
    items = standing_items(s, "adamw", True)
    items8 = standing_items(s, "adamw8bit", False)
    lines = [
        ("bf16 compute weights", "2 B/param", items["bf16 compute weights"]),
        ("fp32 master weights", "4 B/param", items["fp32 master weights"]),
        ("bf16 gradients", "2 B/param", items["bf16 gradients"]),
        ("optimizer states, torch AdamW fp32", "8 B/param", items["optimizer states"]),
        ("optimizer states, 8-bit AdamW", "2 B/param", items8["optimizer states"]),
        ("  + 8-bit absmax per 256 elements", "0.03 B/param", items8["8-bit absmax (fp32 per 256)"]),
        ("copy-based meta step: fp32 backup", "4 B/param", items["copy-based backup (fp32)"]),
        (f"optimizer step: fp32 master grads ({a.master_grad_cast})", "4 B/param" if a.master_grad_cast == "all" else "1 tensor",
         optimizer_step_items(s, "adamw8bit", a.master_grad_cast)["fp32 master gradients"]),
        ("optimizer step: torch AdamW temporaries", "2 tensors", optimizer_step_items(s, "adamw", a.master_grad_cast)["AdamW temporaries"]),
    ]
    for name, unit, v in lines:
        out(f"  {name:<46} {unit:>12} {v / GB:8.2f}")
    out("  activations of one pass (saved for backward + backward working set):")
    out(f"    {'pass':<6} {'layout':<14} {'tokens':>8} {'no checkpointing':>18} {'checkpointing':>15}")
    passes = [("pairs", a.batch, 2), ("meta", a.meta_prompts, a.meta_k)]
    if (a.meta_prompts, a.meta_k) == (a.batch, 2):
        passes = passes[:1]
    for name, g, k in passes:
        for pack, share in ((False, False), (True, False), (False, True), (True, True)):
            geo = pass_geometry(g, k, a.max_length, pack, share, a.packed_ratio, a.shared_ratio)
            full, ck = activation_bytes(s, geo, 2, False), activation_bytes(s, geo, 2, True)
            lay = {(0, 0): "padded", (1, 0): "packed", (0, 1): "shared,padded", (1, 1): "shared,packed"}[(pack, share)]
            out(f"    {name:<6} {lay:<14} {geo.tokens:8.0f} {full.saved / GB:9.2f} + {full.working / GB:5.2f}"
                f" {ck.saved / GB:7.2f} + {ck.working / GB:5.2f}")
    if len(passes) == 1:
        out(f"    (the meta pass has the same shape: {a.meta_prompts} prompts x 2 responses)")

    out("\nFLOPs per step at the mean step (dense 6N_mm*T, 8N_mm*T with checkpointing; attention "
        "12 (16) * layers * nh*d * sum q*k)")
    out(f"    {'layout':<14} {'ckpt':<5} {'tokens/pass':>11} {'vanilla':>10} {'MetaRM':>10}   time at MFU {a.mfu}: vanilla / MetaRM (compute only)")
    for pack, share in ((False, False), (True, False), (False, True), (True, True)):
        for ckpt in (False, True):
            gp = pass_geometry(a.batch, 2, mean_len, pack, share, a.packed_ratio, a.shared_ratio)
            gm = pass_geometry(a.meta_prompts, a.meta_k, mean_len, pack, share, a.packed_ratio, a.shared_ratio)
            fv = pass_flops(s, gp, ckpt)["total"]
            fm = fv + pass_flops(s, gm, ckpt)["total"]
            lay = {(0, 0): "padded", (1, 0): "packed", (0, 1): "shared,padded", (1, 1): "shared,packed"}[(pack, share)]
            rate = a.mfu * gpu.bf16_flops
            out(f"    {lay:<14} {_yn(ckpt):<5} {gp.tokens:11.0f} {fv:10.3g} {fm:10.3g}   {fv / rate:7.2f} s / {fm / rate:6.2f} s")

    out(f"\nCombinations (memory = peak of the backward and optimizer-step phases; time at MFU {a.mfu}; "
        f"epoch = {a.epoch_pairs / 1000:.0f}k pairs; * = recommended)")
    hdr = (f"  {'step':<15} {'optimizer':<10} {'ckpt':<4} {'pack':<4} {'share':<5} | {'bwd GB':>7} {'opt GB':>7} {'peak GB':>7} "
           f"{'fits':<4} | {'step s':>7} {'pairs/s':>8} {'h/ep 1GPU':>10} {'h/ep 8GPU':>10}")
    out(hdr)
    out("  " + "-" * (len(hdr) - 2))
    for r in rows:
        mark = "*" if r["recommended"] else " "
        out(f"{mark} {r['step']:<15} {r['optimizer']:<10} {_yn(r['checkpointing']):<4} {_yn(r['packing']):<4} "
            f"{_yn(r['prompt_sharing']):<5} | {r['backward_peak_GB']:7.1f} {r['optimizer_step_peak_GB']:7.1f} "
            f"{r['memory_GB']:7.1f} {'yes' if r['fits'] else 'no':<4} | {r['step_s']:7.2f} {r['pairs_per_s_1gpu']:8.2f} "
            f"{r['hours_per_epoch_1gpu']:10.1f} {r['hours_per_epoch_8gpu']:10.2f}")

    rec = p["recommended"]
    out("")
    if rec:
        out("Recommended for one " + gpu.name + ": " + describe(rec) + ".")
        out("  " + reason(rec, rows, usable))
    else:
        worst = min((r for r in rows if r["step"].startswith("metarm")), key=lambda r: r["memory_GB"])
        out(f"Recommended for one {gpu.name}: none -- no MetaRM combination fits in {usable / GB:.1f} GB "
            f"(the smallest needs {worst['memory_GB']:.1f} GB, in its {worst['peak_phase']} phase).")
        alt = p["recommended_per_tensor_cast"]
        if alt:
            out(f"  The optimizer step is what does not fit: the trainer casts all {n:.3g} bf16 gradients to fp32 at once "
                f"(+{4 * n / GB:.1f} GB). With each gradient cast just before its own update (--master-grad-cast per-tensor),")
            out(f"  the recommendation would be: {describe(alt)}, peak {alt['memory_GB']:.1f} GB, {alt['step_s']:.2f} s/step, "
                f"{alt['pairs_per_s_1gpu']:.2f} pairs/s, {alt['hours_per_epoch_1gpu']:.1f} h/epoch (1 GPU), "
                f"{alt['hours_per_epoch_8gpu']:.2f} h (8 GPUs).")
    allreduce = 2 * 7 / 8 * 2 * n / (a.allreduce_gbps * GB)
    out(f"8 GPUs: data parallel, same per-GPU batch, communication ignored (assumed overlapped). If it were not: one "
        f"bf16 gradient all-reduce (ring, {a.allreduce_gbps:g} GB/s bus bandwidth) takes {allreduce:.2f} s; "
        f"vanilla needs 1 per step, MetaRM 2.")


def describe(r: dict) -> str:
    opts = ["8-bit AdamW" if r["optimizer"] == "adamw8bit" else "torch AdamW"]
    opts += [name for name, on in (("activation checkpointing", r["checkpointing"]), ("packing", r["packing"]),
                                   ("prompt sharing", r["prompt_sharing"])) if on]
    return f"{r['step']} step with " + ", ".join(opts)


def reason(rec: dict, rows: list[dict], usable: float) -> str:
    faster = sorted((r for r in rows if r["step"].startswith("metarm") and r["step_s"] < rec["step_s"]), key=lambda r: r["step_s"])
    why = f"The fastest MetaRM step that fits: peak {rec['memory_GB']:.1f} GB of {usable / GB:.1f} GB usable, " \
          f"{rec['step_s']:.2f} s/step, {rec['pairs_per_s_1gpu']:.2f} pairs/s, {rec['hours_per_epoch_1gpu']:.1f} h/epoch."
    if faster:
        f = faster[0]
        why += f" The fastest overall ({describe(f)}, {f['step_s']:.2f} s) needs {f['memory_GB']:.1f} GB."
    return why


# -- validation against a CPU measurement ----------------------------------------------------------
VALIDATE_CHECKS = {
    # name: (precision, activation checkpointing, batch override)
    "fp32": ("fp32", False, None),  # bench/memory.py's default configuration: the required check
    "fp32+ckpt": ("fp32", True, None),
    "bf16-master": ("bf16-master", False, None),
    "bf16-master,batch1": ("bf16-master", False, 1),  # small activations: the optimizer-step phase peaks
}


def geometry_of(batch, rows_repeat_kv: bool) -> Geometry:
    """The geometry of a padded batch (a RewardBatch, or the dict ``collate`` returns)."""
    if isinstance(batch, dict):
        ids, mask = batch["input_ids"], batch["attention_mask"]
    else:
        ids, mask = batch.input_ids, batch.attention_mask
    b, t = ids.shape
    padded = bool((mask == 0).any())
    # Transformers passes no mask for an unpadded causal batch: SDPA is then causal, with native GQA.
    return Geometry(tokens=b * t, rewards=b, qk=b * t * t, mask_elems=b * t * t if padded else 0,
                    kv_repeated=padded and rows_repeat_kv)


def predict_cpu(shape: Shape, precision: str, ckpt: bool, geos: dict[str, Geometry], step: str) -> dict:
    """Peak bytes the CPU trainer should reach for one step (fp32 or bf16-master, torch AdamW)."""
    n = shape.counted_params()
    e = 4 if precision == "fp32" else 2
    standing = {"weights": e * n, "gradients": e * n, "AdamW states (fp32)": 8 * n}
    if precision == "bf16-master":
        standing["fp32 masters"] = 4 * n
    st = sum(standing.values())
    passes = ["pairs"] if step == "vanilla" else ["meta", "pairs"]
    acts = {p: activation_bytes(shape, geos[p], e, ckpt) for p in passes}
    backward = st + max(a.total for a in acts.values())
    big = shape.largest_tensor()
    # AdamW's two temporaries, and with masters one fp32 gradient: the trainer steps one tensor at a time.
    opt = 2 * 4 * big + (4 * big if precision == "bf16-master" else 0)
    peak = max(backward, st + opt)
    if step == "copy-based":
        # The reference (metarm_fast/reference.py) deep-copies the model (weights in their dtype); its J
        # and L gradients are new tensors that fill up as the activations are freed.
        copy = e * n
        peak = max(backward + copy, st + 2 * copy)
    return {"standing": st, "activations": max(a.saved for a in acts.values()),
            "working": max(a.working for a in acts.values()), "optimizer_step": st + opt, "peak": peak}


def validate(hidden: int = 256, layers: int = 4, batch: int = 8, max_length: int = 128, checks=None,
             tol: float = 0.15, log=print) -> list[dict]:
    """Measure vanilla / MetaRM (/ copy-based) peaks as bench/memory.py does and compare with the model."""
    import tempfile

    from metarm_fast.memory import standing_bytes, step_peak_bytes as peak
    from metarm_fast.config import TrainConfig
    from metarm_fast.reference import copy_based_meta_step
    from metarm_fast.trainer import RewardTrainer

    rows = []
    for name in checks or list(VALIDATE_CHECKS):
        precision, ckpt, b_override = VALIDATE_CHECKS[name]
        bsz = b_override or batch
        # The configuration of bench/memory.py (its main() builds it inline).
        cfg = TrainConfig(
            packing="none",  # padded: the geometry the plan models
            method="metarm", tiny_hidden=hidden, tiny_layers=layers, batch_size=bsz, max_records=256,
            max_length=max_length, precision=precision, optimizer="adamw", eta=1e-3, progress=False,
            activation_checkpointing=ckpt, output_dir=tempfile.mkdtemp(),
        )
        tr = RewardTrainer(cfg, log=lambda *x: None)
        micro, _ = tr.step_inputs(0)
        groups = [[it.chosen, it.rejected] for it in micro[0]]
        tr.train_step(micro, groups)  # warm-up: optimizer states and gradient buffers exist from here on

        mc = tr.model.config
        shape = Shape("tiny-llama", mc.hidden_size, mc.num_hidden_layers, mc.num_attention_heads,
                      mc.num_key_value_heads, mc.intermediate_size, tr.rm.hf.get_input_embeddings().num_embeddings)
        counted = sum(p.numel() for p in tr.weights.params)
        if counted != shape.counted_params():
            raise AssertionError(f"parameter count of the shape ({shape.counted_params()}) != the model's ({counted})")
        cpu_sdpa_repeats = mc.num_key_value_heads < mc.num_attention_heads
        geos = {"pairs": geometry_of(tr.batcher.pairs(micro[0]), cpu_sdpa_repeats),
                "meta": geometry_of(tr.batcher.groups(groups), cpu_sdpa_repeats)}
        measured = {}
        measured["vanilla"] = peak(tr.weights, tr.optimizer, lambda: tr.train_step(micro))
        measured["metarm"] = peak(tr.weights, tr.optimizer, lambda: tr.train_step(micro, groups))
        if name == "fp32":
            measured["copy-based"] = peak(tr.weights, tr.optimizer, lambda: copy_based_meta_step(
                tr.model, tr.weights, tr.optimizer, tr.batcher, micro, groups, eta=cfg.eta))
        sb = standing_bytes(tr.weights, tr.optimizer)
        for step, m in measured.items():
            pr = predict_cpu(shape, precision, ckpt, geos, step)
            rows.append({
                "check": name, "step": step, "params": counted, "batch_shape": list(tr.batcher.pairs(micro[0]).input_ids.shape),
                "measured_MiB": m / MIB, "predicted_MiB": pr["peak"] / MIB, "error": pr["peak"] / m - 1,
                "standing_measured_MiB": sb / MIB, "standing_predicted_MiB": pr["standing"] / MIB,
                "activations_predicted_MiB": pr["activations"] / MIB, "working_predicted_MiB": pr["working"] / MIB,
                "optimizer_step_predicted_MiB": pr["optimizer_step"] / MIB,
            })
    log(f"validate: tiny Llama, hidden {hidden}, {layers} layers, intermediate {shape.intermediate}, {shape.heads} heads "
        f"({shape.kv_heads} kv), vocab {shape.vocab}, {rows[0]['params']} params; max_length {max_length}; torch AdamW; "
        "CPU SDPA; peaks by AllocationTracker (bench/memory.py)")
    log(f"  {'check':<20} {'batch':<9} {'step':<11} {'measured MiB':>12} {'predicted MiB':>13} {'error':>7}   "
        "predicted = standing + activations + working set (or the optimizer step)")
    for r in rows:
        log(f"  {r['check']:<20} {'x'.join(map(str, r['batch_shape'])):<9} {r['step']:<11} {r['measured_MiB']:12.3f} "
            f"{r['predicted_MiB']:13.3f} {r['error']:+7.1%}   = {r['standing_predicted_MiB']:.2f} (measured "
            f"{r['standing_measured_MiB']:.2f}) + {r['activations_predicted_MiB']:.2f} + {r['working_predicted_MiB']:.2f}"
            f" | opt step {r['optimizer_step_predicted_MiB']:.2f}")
    worst = max(abs(r["error"]) for r in rows)
    log(f"  largest error {worst:.1%} (limit {tol:.0%}): {'PASS' if worst <= tol else 'FAIL'}")
    return rows


# -- command line --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.plan", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="llama-2-7b", choices=sorted(MODELS) + ["custom"],
                    help="a published shape, or custom (give --hidden --layers --heads --intermediate --vocab)")
    for f, h in (("hidden", "hidden size"), ("layers", "decoder layers"), ("heads", "attention heads"),
                 ("kv-heads", "key/value heads (GQA); custom default: --heads"), ("intermediate", "MLP size"),
                 ("vocab", "vocabulary size")):
        ap.add_argument(f"--{f}", type=int, help=f"{h} (overrides the preset)")
    ap.add_argument("--params", type=float, help="use this N for the per-parameter items (e.g. 6.74e9, Llama-2-7B's "
                                                 "published count, which includes its LM head); default: counted from the shape")
    ap.add_argument("--gpu", default="a100-80g", choices=sorted(GPUS))
    ap.add_argument("--batch", type=int, default=16, help="preference pairs per step per GPU (the paper: global batch 16)")
    ap.add_argument("--max-length", type=int, default=1024, help="tokens per sequence; memory is planned for a step padded to it")
    ap.add_argument("--mean-padded-length", type=float, default=400.0,
                    help="mean padded sequence length of a step, for the time (capped at --max-length). Default from "
                         "/work/shared/data/README.md (HH-RLHF harmless-base test, BERT WordPiece tokens): a pair is "
                         "2*110 + 41 + 51 = 312 tokens, 39%% of its padded size in batches of 8 pairs -> 800 per pair, 400 per sequence")
    ap.add_argument("--packed-ratio", type=float, default=0.39,
                    help="unpadded / padded tokens: from /work/shared/data/README.md (HH-RLHF, batches of 8 pairs padded to the "
                         "longest: the unpadded tokens are 39%% of the padded ones); put your own measurement here")
    ap.add_argument("--shared-ratio", type=float, default=0.25,
                    help="tokens with each prompt counted once / padded tokens: from /work/shared/data/README.md (HH-RLHF, same "
                         "batches: 25%%)")
    ap.add_argument("--meta-prompts", type=int, help="prompts in the MetaRM meta batch (default: --batch)")
    ap.add_argument("--meta-k", type=int, default=2, help="responses per meta prompt (2: the bench's meta batch, the pairs' own "
                                                          "prompts and responses; the paper samples 5)")
    ap.add_argument("--mfu", type=float, default=0.4, help="utilisation of the bf16 peak by the executed FLOPs")
    ap.add_argument("--hbm-efficiency", type=float, default=0.8, help="fraction of the HBM bandwidth the elementwise "
                                                                      "optimizer and meta-step kernels reach")
    ap.add_argument("--master-grad-cast", default="per-tensor", choices=("all", "per-tensor"),
                    help="per-tensor: each bf16 gradient cast to fp32 just before its own update (the trainer as "
                         "written); all: every one cast before the step (+4 B/param)")
    ap.add_argument("--reserve-gb", type=float, default=1.5, help="GPU memory torch's allocator cannot use (CUDA context, "
                                                                  "cuBLAS and NCCL workspaces)")
    ap.add_argument("--headroom", type=float, default=0.05, help="fraction kept free for allocator fragmentation")
    ap.add_argument("--epoch-pairs", type=int, default=HH_RLHF_PAIRS, help="pairs in an epoch (HH-RLHF train: 161k)")
    ap.add_argument("--allreduce-gbps", type=float, default=200.0, help="NCCL all-reduce bus bandwidth, GB/s, for the "
                                                                        "printed communication bound (8 GPUs, NVLink)")
    ap.add_argument("--gpus", type=int, default=1, help="with > 1: also plan the FSDP2 run on this many GPUs (per-GPU memory and time)")
    ap.add_argument("--json", help="write the rows (and the assumptions) to this file")
    ap.add_argument("--validate", action="store_true", help="measure the tiny model's peaks on the CPU (bench/memory.py's "
                                                            "configuration) and compare with this memory model; exit 1 if > 15%% off")
    ap.add_argument("--validate-hidden", type=int, default=256)
    ap.add_argument("--validate-layers", type=int, default=4)
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.validate:
        rows = validate(a.validate_hidden, a.validate_layers)
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"validate": rows}, f, indent=2)
        return 0 if max(abs(r["error"]) for r in rows) <= 0.15 else 1
    if a.meta_prompts is None:
        a.meta_prompts = a.batch
    split_ratios(a.packed_ratio, a.shared_ratio)  # checks them
    p = plan(a)
    print_plan(p, a)
    if a.gpus > 1:
        p["fsdp"] = fsdp_plan(a, p["shape"], p["gpu"])
        print_fsdp_plan(p["fsdp"], p["shape"], p["gpu"], a)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": asdict(p["shape"]), "params": p["shape"].params(), "gpu": asdict(p["gpu"]),
                       "usable_memory_GB": usable_memory(p["gpu"], a) / GB,
                       "assumptions": {k: v for k, v in vars(a).items() if k != "json"},
                       "rows": p["rows"], "fsdp": p.get("fsdp")}, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
