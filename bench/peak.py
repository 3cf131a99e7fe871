"""The peak FLOP/s that MFU is measured against: datasheet values on GPUs, a measured GEMM on the CPU.

A CPU has no datasheet number that a training step can reach (turbo, AVX-512 licence levels and the
cores' sharing all move it), so the peak is measured here, on the device, by the operation that
carries the model's FLOPs: torch.mm at the reward model's own linear shapes (tokens x hidden times
hidden x out, for q, k/v, o, gate/up and down), forward-sized, in its precision, fastest of a few
runs. That is the rate the step's matmuls could reach if nothing else took time; MFU against it says
how much of the step is that work.

GPU values: dense (no structured sparsity) Tensor Core peaks from NVIDIA's data sheets:
- A100 (SXM/PCIe 80GB): "NVIDIA A100 Tensor Core GPU" datasheet: BF16 312 TFLOPS, TF32 156 TFLOPS,
  FP32 19.5 TFLOPS (the sheet prints 624 / 312 for BF16 / TF32 "with sparsity").
- H100 SXM: "NVIDIA H100 Tensor Core GPU" datasheet: BF16 1,979 and TF32 989 TFLOPS *with sparsity*,
  i.e. 989 and 494.5 dense; FP32 67 TFLOPS.
- H200 SXM: "NVIDIA H200 Tensor Core GPU" datasheet: the same compute as H100 SXM (BF16 1,979 /
  TF32 989 with sparsity, FP32 67).
"""
from __future__ import annotations

import time

import torch

# Dense peak FLOP/s by device-name fragment and math mode (see the module docstring for the sources).
PEAK_FLOPS = {
    "a100": {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "h100": {"bf16": 989e12, "tf32": 494.5e12, "fp32": 67e12},
    "h200": {"bf16": 989e12, "tf32": 494.5e12, "fp32": 67e12},
}


def math_mode(precision: str) -> str:
    if precision.startswith("bf16"):
        return "bf16"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


def datasheet_peak(device_name: str, precision: str) -> tuple[float | None, str]:
    """(peak FLOP/s, where it came from) for a GPU name, or (None, why) when the table has no entry."""
    name, mode = device_name.lower(), math_mode(precision)
    for key, table in PEAK_FLOPS.items():
        if key in name:
            return table[mode], f"{key} {mode} datasheet (dense)"
    return None, f"no datasheet entry for {device_name} (pass --peak-flops)"


def linear_shapes(config) -> list[tuple[int, int]]:
    """(in, out) of every linear layer of one decoder block of a Llama-shaped config, with repeats."""
    h = config.hidden_size
    inter = config.intermediate_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", heads) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    return [(h, heads * head_dim), (h, kv * head_dim), (h, kv * head_dim), (heads * head_dim, h),
            (h, inter), (h, inter), (inter, h)]


def measure_gemm_peak(config, tokens: int, dtype: torch.dtype = torch.float32, device: str = "cpu",
                      repeats: int = 5, min_seconds: float = 0.05) -> dict:
    """FLOP/s of torch.mm over one block's linear shapes at ``tokens`` rows: total FLOPs / total time,
    each shape timed by its fastest of ``repeats`` runs (each run at least ``min_seconds`` long)."""
    shapes = linear_shapes(config)
    gen = torch.Generator(device="cpu").manual_seed(0)
    total_flops = total_s = 0.0
    per_shape = {}
    for k, n in dict.fromkeys(shapes):
        a = torch.randn(tokens, k, generator=gen).to(device=device, dtype=dtype)
        b = torch.randn(k, n, generator=gen).to(device=device, dtype=dtype)
        torch.mm(a, b)  # warm-up (first-call set-up, caches)
        best = float("inf")
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            calls = 0
            while True:
                torch.mm(a, b)
                calls += 1
                _sync(device)
                if time.perf_counter() - t0 >= min_seconds:
                    break
            best = min(best, (time.perf_counter() - t0) / calls)
        count = shapes.count((k, n))
        flops = 2.0 * tokens * k * n
        per_shape[f"{tokens}x{k}x{n}"] = flops / best
        total_flops += count * flops
        total_s += count * best
    return {"flops_per_s": total_flops / total_s, "tokens": tokens, "per_shape": per_shape,
            "dtype": str(dtype).removeprefix("torch.")}


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
