"""Does the CPU attention kernel skip work for a causal mask at the block sizes prompt sharing makes?

    python -m bench.sdpa_tiles [--lengths 128,300,600,1200,2400] [--heads 4] [--head-dim 64] [--reps 30]

Times torch's scaled_dot_product_attention, forward and backward, on one block of T tokens (the
bench model's 4 heads of 64) with no mask, ``is_causal``, an all-True bool mask and a lower-triangular
bool mask. A causal call that costs what an unmasked one costs computes the masked-out tiles too: a
split of a prompt-sharing block into a causal call over the prompt and its first response plus
masked calls for the other responses (about half the query-key pairs of one masked call over the
block) only pays off where ``is_causal`` is cheaper than the full block.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def median_ms(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="128,300,600,1200,2400")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    print(f"fwd + bwd ms, median of {a.reps}, {torch.get_num_threads()} threads, {a.heads} heads x {a.head_dim}")
    print(f"{'T':>6} {'no mask':>9} {'is_causal':>10} {'full mask':>10} {'tril mask':>10} {'causal / none':>14}")
    for T in (int(x) for x in a.lengths.split(",")):
        q, k, v = (torch.randn(1, a.heads, T, a.head_dim, requires_grad=True) for _ in range(3))
        full = torch.ones(T, T, dtype=torch.bool)[None, None]
        variants = {"none": {}, "is_causal": dict(is_causal=True), "full": dict(attn_mask=full),
                    "tril": dict(attn_mask=full.tril())}
        row = {"T": T}
        for name, kw in variants.items():
            row[name] = median_ms(lambda kw=kw: F.scaled_dot_product_attention(q, k, v, **kw).sum().backward(), a.reps)
        rows.append(row)
        print(f"{T:>6} {row['none']:9.3f} {row['is_causal']:10.3f} {row['full']:10.3f} {row['tril']:10.3f} "
              f"{row['is_causal'] / row['none']:14.2f}")
    return rows


if __name__ == "__main__":
    main()
