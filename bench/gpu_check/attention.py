"""Section ``attention``: the packed layouts' attention backends against padded SDPA, forward and backward.

For each backend (GPU: FlexAttention for ``pack`` and ``share-prompt``; FlashAttention 2 varlen for
``pack`` when flash-attn is installed) and each compute dtype (fp32, bf16; FlashAttention: bf16
only), a small Llama's rewards on a packed batch of groups with odd lengths, and the gradients of
sum_i w_i r_i (fixed random w) for every weight, are compared with

- the truth: the same weights (rounded to bf16, so every precision holds the same model), padded,
  SDPA in fp64;
- the reference: padded SDPA in the same dtype.

The rule is the kernel tests' (tests/kernel_tests/tolerances.py): the backend's error against the
truth is at most ERR_FACTOR times the reference's, plus a floor; both errors, their ratio and the
difference backend - reference are recorded. On a GPU it also measures what a new batch length
costs FlexAttention (transformers compiles it with static shapes: a new length recompiles).

On a CPU (dry run) FlexAttention has no backward and FlashAttention no kernel: the block-wise SDPA
(the CPU's packed backend) stands in, so that the comparison itself runs, and both are recorded as
skipped with the reason.
"""
from __future__ import annotations

import importlib.util
import time

import torch

from bench.gpu_check.model import build_llama
from bench.plan import Shape

# Measured on the CPU (torch 2.13, the block-wise SDPA as the backend, the dry run's toy model; every
# report records its own under "ratios"): backend error / padded SDPA's error 0.80-1.03 in fp32 and
# 0.77-1.02 in bf16, rewards and gradients. A GPU's packed layouts run other GEMM shapes and other
# attention kernels than its padded SDPA, hence the margin; its own ratios are in its first report.
ERR_FACTOR = 4.0
FLOOR_ULPS = 2.0  # fp32 ulps of the truth's largest |value|

GPU_SHAPE = Shape("attention-check", 256, 2, 4, 2, 512, 128)
TOY_SHAPE = Shape("attention-check-toy", 64, 2, 4, 2, 128, 64)


def groups_of(vocab: int, lengths, seed: int = 0):
    """Groups of EncodedSeq: (prompt length, [response lengths]) each, token ids in [3, vocab)."""
    from metarm_fast.data import EncodedSeq

    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    out = []
    for p, rs in lengths:
        prompt = ids(p)
        out.append([EncodedSeq(prompt, ids(r)) for r in rs])
    return out


GPU_LENGTHS = [(131, (67, 203)), (7, (1, 45, 300)), (250, (33,)), (64, (64, 64, 9)), (1, (129, 5))]
TOY_LENGTHS = [(7, (3, 5)), (12, (4, 1, 6)), (5, (9, 2, 2, 3)), (20, (1, 8))]


def rewards_and_grads(rm, batch, w):
    """rewards (fp32) and every weight's gradient of sum(w * rewards), as fp64 CPU tensors."""
    rm.zero_grad(set_to_none=True)
    r = rm(batch)
    (r.float() * w).sum().backward()
    grads = [p.grad.detach().double().cpu() if p.grad is not None else torch.zeros(p.shape, dtype=torch.float64)
             for p in rm.parameters()]
    return r.detach().double().cpu(), grads


def rel_error(x, truth) -> float:
    """max |x - truth| / max |truth| (tensors, or lists of tensors: the worst tensor)."""
    if isinstance(x, list):
        return max(rel_error(a, b) for a, b in zip(x, truth))
    scale = truth.abs().max().item()
    return (x - truth).abs().max().item() / scale if scale > 0 else (x - truth).abs().max().item()


def run(ctx, rec) -> None:
    from metarm_fast.batch import meta_batch
    from metarm_fast.model import RewardModel, has_flex_attention
    from metarm_fast.packing import register_blockwise_sdpa

    dev = ctx.device
    shape = GPU_SHAPE if ctx.cuda and not ctx.dry_run else TOY_SHAPE
    lengths = GPU_LENGTHS if ctx.cuda and not ctx.dry_run else TOY_LENGTHS
    backends = []  # (attn implementation, layouts, dtypes)
    if ctx.cuda:
        if has_flex_attention():
            backends.append(("flex_attention", ("pack", "share-prompt"), (torch.float32, torch.bfloat16)))
        else:
            rec.skip_part("flex_attention", "this torch has no FlexAttention")
        if importlib.util.find_spec("flash_attn") is not None:
            backends.append(("flash_attention_2", ("pack",), (torch.bfloat16,)))
        else:
            rec.skip_part("flash_attention_2", "flash-attn is not installed (pip install -e .[flash])")
    else:
        rec.skip_part("flex_attention", "no CUDA: FlexAttention has no CPU backward (its CPU forward is "
                                        "tests/test_flex.py's); the block-wise SDPA stands in")
        rec.skip_part("flash_attention_2", "no CUDA")
        backends.append((register_blockwise_sdpa(), ("pack", "share-prompt"), (torch.float32, torch.bfloat16)))
    rec.tolerance("ERR_FACTOR", ERR_FACTOR, "backend error vs fp64 <= factor x padded SDPA's error + floor; "
                                            "CPU-measured ratios <= 1.4 (block-wise SDPA), see the module docstring")
    rec.tolerance("FLOOR_ULPS", FLOOR_ULPS, "fp32 ulps of the truth's largest |value|")

    base = build_llama(shape, 0, dev, dtype=torch.bfloat16, attn="sdpa").float()  # weights exactly bf16 values
    state = base.state_dict()
    groups = groups_of(shape.vocab, lengths)
    w = torch.randn(sum(len(g) for g in groups), generator=torch.Generator().manual_seed(1)).to(dev)
    padded = meta_batch(groups, "none", 0).to(dev)

    def model(attn, dtype):
        m = build_llama(shape, 0, dev, dtype=torch.float32, attn=attn)
        m.load_state_dict(state)
        return RewardModel(m.to(dtype)).to(dev).train()

    truth = rewards_and_grads(model("sdpa", torch.float64), padded, w)
    rec.measure(model=dict(shape.__dict__), sequences=padded.num_sequences, padded_tokens=padded.num_tokens)
    ratios = {}
    for dtype in (torch.bfloat16, torch.float32):  # bf16 first: what training computes in
        name = str(dtype).removeprefix("torch.")
        ref = rewards_and_grads(model("sdpa", dtype), padded, w)
        ref_err = [rel_error(ref[0], truth[0]), rel_error(ref[1], truth[1])]
        floor = FLOOR_ULPS * 2.0**-23
        for attn, layouts, dtypes in backends:
            if dtype not in dtypes:
                continue
            for layout in layouts:
                key = f"{attn} {layout} {name}"
                if rec.time_left() < 25:  # a compile may take that long: stop cleanly, recorded
                    rec.skip_part(key, f"{rec.time_left():.0f} s left in the section")
                    continue
                t0 = time.perf_counter()
                try:
                    batch = meta_batch(groups, layout, 0, dense_mask=False).to(dev)
                    got = rewards_and_grads(model(attn, dtype), batch, w)
                except Exception as e:  # noqa: BLE001 - the other backends and layouts still run
                    rec.check(f"{key}: runs forward and backward", False, f"{type(e).__name__}: {str(e)[:300]}")
                    continue
                seconds = time.perf_counter() - t0
                for i, what in enumerate(("rewards", "gradients")):
                    err = rel_error(got[i], truth[i])
                    limit = ERR_FACTOR * ref_err[i] + floor
                    ratios[f"{key} {what}"] = {"error": err, "reference_error": ref_err[i], "ratio": err / max(ref_err[i], floor),
                                   "vs_reference": rel_error(got[i], ref[i]), "first_call_s": round(seconds, 3),
                                   "tokens": batch.num_tokens}
                    rec.check(f"{key} {what}: error vs fp64 within {ERR_FACTOR:g}x padded SDPA's", err <= limit,
                              f"{err:.3g}", f"{limit:.3g}", f"padded SDPA {name}: {ref_err[i]:.3g}")
                rec.measure(ratios=ratios)
    ctx.log("  " + "; ".join(f"{k}: {v['error']:.2g} ({v['ratio']:.2f}x SDPA)" for k, v in ratios.items()))
    rec.check("at least one packed backend compared", bool(ratios), len(ratios))
    if ctx.cuda and any(b[0] == "flex_attention" for b in backends):
        measure_flex_recompile(ctx, rec, shape, state, groups, lengths)
    worst = max((v["ratio"] for v in ratios.values()), default=None)
    rec.measure(worst_ratio=worst, _headline=["worst_ratio"])


def measure_flex_recompile(ctx, rec, shape, state, groups, lengths) -> None:
    """Seconds of a forward+backward at a batch length FlexAttention has not seen, then again at it."""
    from metarm_fast.batch import meta_batch
    from metarm_fast.model import RewardModel

    if rec.time_left() < 60:
        rec.skip_part("flex recompile timing", f"{rec.time_left():.0f} s left in the section")
        return
    m = build_llama(shape, 0, ctx.device, dtype=torch.float32, attn="flex_attention")
    m.load_state_dict(state)
    rm = RewardModel(m.to(torch.bfloat16)).train()
    longer = groups_of(shape.vocab, [(p + 1, rs) for p, rs in lengths], seed=2)  # every prompt one token longer
    out = {}
    for label, g in (("new length", longer), ("same length again", longer)):
        batch = meta_batch(g, "share-prompt", 0, dense_mask=False).to(ctx.device)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        rm(batch).sum().backward()
        torch.cuda.synchronize()
        out[label] = round(time.perf_counter() - t0, 3)
    rec.measure(flex_new_length_s=out)
