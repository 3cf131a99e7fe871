"""Benchmark of the MetaRM kernels: Triton against the torch path.

    python -m bench.kernels [--numel N] [--repeats R] [--warmup W] [--out results.json]

On a GPU it times both paths of every op; on a CPU it says that Triton cannot be timed here (the
interpreter would measure Python, not the kernel) and times the torch path only. Warm-up
runs are left out; each row gives the median and the spread (min, quartiles, max) over the
repeats, and GB/s from the bytes the op must move (formulas in ``_perturb_bytes`` and next to
each op, the same as in bench/KERNELS_PLAN.md). The environment (device, versions, git commit) is
printed and written with the results.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import time

import torch
import triton

from metarm_fast.kernels import bt_loss, difference_loss, perturb_, restore_

ELT = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


# ----------------------------------------------------------------------------------------------
# Environment and timing
# ----------------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "HEAD") or "unknown"
    if git("status", "--porcelain"):
        commit += "+dirty"
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "git_commit": commit,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
    return env


def time_op(fn, device, *, setup=None, repeats=20, warmup=5) -> dict:
    """Seconds per call of fn(): median and spread over ``repeats`` runs after ``warmup`` runs.

    ``setup`` runs before each call, outside the timed region (e.g. to undo an in-place op).
    On CUDA the time is taken with events around the call; the op's own host syncs count.
    """
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        if setup:
            setup()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "p25_s": q[0],
        "p75_s": q[2],
        "max_s": max(times),
        "repeats": repeats,
    }


# ----------------------------------------------------------------------------------------------
# Byte counts (what each op must read and write; masked writes counted in full)
# ----------------------------------------------------------------------------------------------
def _perturb_bytes(p_elt: int, g_elt: int, master: bool, with_v: bool) -> tuple[int, int]:
    """(perturb_, restore_) bytes per parameter.

    perturb_, no master:  read p + read g (+ read v: 4) + write g + write p   = 2P + 2G (+4)
    perturb_, master:     read w: 4 + read p (the check) + read g (+4) + write p = 4 + 2P + G (+4)
    restore_, no master:  read z + read p + write p                          = G + 2P
    restore_, master:     read w: 4 + write p                                = 4 + P
    The writes of p (and the reads of p in restore_, no master) are masked to the weights that
    moved, so with bf16 most of them never reach memory; they are counted in full here.
    """
    v = 4 if with_v else 0
    if master:
        return 4 + 2 * p_elt + g_elt + v, 4 + p_elt
    return 2 * p_elt + 2 * g_elt + v, g_elt + 2 * p_elt


def llama_like_sizes(total: int, layers: int = 4) -> list[int]:
    """Tensor sizes shaped like Llama blocks (4 h^2 attention, 3 x h x 8h/3 MLP, 2 norms of h)."""
    h = max(64, int(math.sqrt(total / (layers * 12))) // 64 * 64)
    ffn = (8 * h // 3 + 63) // 64 * 64
    block = [h * h] * 4 + [h * ffn] * 3 + [h, h]
    return block * layers


# ----------------------------------------------------------------------------------------------
# Benchmarks
# ----------------------------------------------------------------------------------------------
def bench_bt_loss(device, impls, n, dtype, args):
    g = torch.Generator(device="cpu").manual_seed(0)
    c = torch.randn(n, generator=g).to(device=device, dtype=dtype).requires_grad_()
    r = torch.randn(n, generator=g).to(device=device, dtype=dtype).requires_grad_()
    # forward: read c, r (2E) + write dc, dr (8, fp32); backward: read dc, dr (8) + write grads (2E)
    nbytes = n * (4 * ELT[dtype] + 16)
    rows = []
    for impl in impls:
        def run():
            bt_loss(c, r, None, 0.0, impl=impl).backward()

        def reset():
            c.grad = r.grad = None

        rows.append({"op": "bt_loss fwd+bwd", "case": f"n={n} {str(dtype)[6:]}", "impl": impl, "bytes": nbytes,
                     **time_op(run, device, setup=reset, repeats=args.repeats, warmup=args.warmup)})
    return rows


def bench_difference_loss(device, impls, m, k, dtype, args):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(m * k, generator=g).to(device=device, dtype=dtype).requires_grad_()
    offsets = torch.arange(0, m * k + 1, k, dtype=torch.int64, device=device)
    # read r (E) + offsets (8/k) + write dJ/dr (4); backward read 4 + write E. Tiny: latency-bound.
    nbytes = m * k * (2 * ELT[dtype] + 8) + 8 * (m + 1)
    rows = []
    for impl in impls:
        def run():
            difference_loss(x, offsets, impl=impl).backward()

        def reset():
            x.grad = None

        rows.append({"op": "difference_loss fwd+bwd", "case": f"m={m} k={k} {str(dtype)[6:]}", "impl": impl,
                     "bytes": nbytes, **time_op(run, device, setup=reset, repeats=args.repeats, warmup=args.warmup)})
    return rows


PERTURB_CASES = {
    # name: (param dtype, grads dtype, master, exp_avg_sq)
    "fp32, no master": (torch.float32, torch.float32, False, False),
    "fp32, no master, exp_avg_sq": (torch.float32, torch.float32, False, True),
    "bf16, no master": (torch.bfloat16, torch.bfloat16, False, False),
    "bf16 + fp32 master": (torch.bfloat16, torch.bfloat16, True, False),
    "bf16 + fp32 master, exp_avg_sq": (torch.bfloat16, torch.bfloat16, True, True),
}


def bench_perturb(device, impls, total, args):
    sizes = llama_like_sizes(total)
    numel = sum(sizes)
    rows = []
    for name, (p_dtype, g_dtype, master, with_v) in PERTURB_CASES.items():
        gen = torch.Generator(device="cpu").manual_seed(0)
        w = [(torch.randn(n, generator=gen) * 0.02).to(device) for n in sizes]
        params = [t.to(p_dtype) for t in w]
        grads0 = [(torch.randn(n, generator=gen) * 0.01).to(device=device, dtype=g_dtype) for n in sizes]
        grads = [t.clone() for t in grads0]
        masters = w if master else None
        vs = [t.float() ** 2 + 1e-12 for t in grads0] if with_v else None
        if not master:
            del w
        p_bytes, r_bytes = _perturb_bytes(ELT[p_dtype], ELT[g_dtype], master, with_v)
        for impl in impls:
            last = {}

            def do_perturb():
                last["stats"] = perturb_(params, grads, 5e-6, masters=masters, exp_avg_sq=vs, impl=impl).stats

            def fresh_state():
                # Undo the previous call outside the timed region, and give back the J gradient.
                restore_(params, None if master else grads, masters=masters, impl=impl)
                for g, g0 in zip(grads, grads0):
                    g.copy_(g0)

            def perturbed_state():
                fresh_state()
                do_perturb()

            def do_restore():
                restore_(params, None if master else grads, masters=masters, impl=impl)

            t_p = time_op(do_perturb, device, setup=fresh_state, repeats=args.repeats, warmup=args.warmup)
            stats = last["stats"]
            t_r = time_op(do_restore, device, setup=perturbed_state, repeats=args.repeats, warmup=args.warmup)
            extra = {"numel": numel, "tensors": len(sizes), "frac_changed": stats.frac_changed, "ratio": stats.ratio}
            rows.append({"op": "perturb_", "case": name, "impl": impl, "bytes": p_bytes * numel,
                         "bytes_per_param": p_bytes, **extra, **t_p})
            rows.append({"op": "restore_", "case": name, "impl": impl, "bytes": r_bytes * numel,
                         "bytes_per_param": r_bytes, **extra, **t_r})
        del params, grads, grads0, masters, vs
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", type=int, default=None,
                        help="parameters in the perturb_ benchmark (default 2^27 on GPU, 2^22 on CPU)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=None, help="write environment and results as JSON here")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device)
    print("environment:", json.dumps(env))
    if device.type == "cuda":
        impls = ["triton", "torch"]
    else:
        impls = ["torch"]
        print("no GPU: Triton kernels cannot be timed here (the interpreter would time Python, not the "
              "kernel); timing the torch path only, on the CPU.")
    total = args.numel or (1 << 27 if device.type == "cuda" else 1 << 22)

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        rows += bench_bt_loss(device, impls, 1 << 16, dtype, args)
    rows += bench_difference_loss(device, impls, 16, 5, torch.bfloat16, args)  # the paper's meta batch
    rows += bench_difference_loss(device, impls, 1024, 16, torch.float32, args)
    rows += bench_perturb(device, impls, total, args)

    print(f"\n{'op':<24} {'case':<32} {'impl':<7} {'median ms':>10} {'[min, p25, p75, max] ms':>34} {'GB/s':>8}")
    for row in rows:
        row["gb_per_s"] = row["bytes"] / row["median_s"] / 1e9
        spread = ", ".join(f"{row[k] * 1e3:.3f}" for k in ("min_s", "p25_s", "p75_s", "max_s"))
        print(f"{row['op']:<24} {row['case']:<32} {row['impl']:<7} {row['median_s'] * 1e3:>10.3f} "
              f"{'[' + spread + ']':>34} {row['gb_per_s']:>8.2f}")
    result = {"environment": env, "results": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
