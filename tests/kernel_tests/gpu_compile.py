"""Compile kernels for an A100 (sm_80) and an H100 (sm_90) on a machine without a GPU.

The interpreter runs a kernel's Python semantics, not Triton's compiler: code can pass every
interpreter test and still fail to compile for a GPU (or compile into something else, e.g. with
FMA contraction). Triton's wheel carries the NVIDIA backend and ptxas, so the whole pipeline down
to a cubin runs here without a driver. It must run in a fresh process without TRITON_INTERPRET
(this test process defined the kernels as interpreted functions); ~1 s of imports, ~0.1 s per
kernel variant.

What the compiler emitted is counted in the PTX (``COUNTED``: FMA contractions, IEEE sqrt/div,
atomic and reduction instructions, by instruction, not by substring) and printed one line a variant
(``pytest -s`` shows it); the callers assert what their kernels promise.
"""
import json
import os
import subprocess
import sys

import pytest

ARCHS = (80, 90)  # A100, H100
COUNTED = ("fma.rn.f32", "fma.rn.f64", "sqrt.rn.f32", "div.rn.f32", "atom.", "red.")

_SCRIPT = r"""
import importlib, json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

arch = int(sys.argv[1])
target = GPUTarget("cuda", arch, 32)
# An instruction at the start of a line, optionally predicated (@%p1 / @!%p1).
INSTR = r"^\s*(?:@!?%\w+\s+)?{}"
for spec in json.loads(sys.stdin.read()):
    module = importlib.import_module(spec["module"])
    fn = getattr(module, spec["kernel"])
    src = ASTSource(fn=fn, signature=spec["signature"], constexprs=spec["constexprs"])
    compiled = triton.compile(src, target=target, options=spec.get("options") or None)
    ptx = compiled.asm["ptx"]
    count = {op: ptx.count(op) for op in ("fma.rn.f32", "fma.rn.f64", "sqrt.rn.f32", "div.rn.f32")}
    for op in ("atom.", "red."):
        count[op] = len(re.findall(INSTR.format(re.escape(op)), ptx, flags=re.M))
    found = re.search(r"^\s*\.target\s+(\S+)", ptx, flags=re.M)
    print(json.dumps({
        "kernel": spec["kernel"], "constexprs": spec["constexprs"], "arch": f"sm_{arch}",
        "target": found.group(1) if found else None, "cubin_bytes": len(compiled.asm["cubin"]), "count": count,
    }))
"""


def compile_for(specs, arch: int):
    """Compile each spec {module, kernel, signature, constexprs, options} for sm_<arch>; one dict each:
    kernel, constexprs, arch, target (the PTX's .target), cubin_bytes, count (of ``COUNTED``)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's notice; same default
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(arch)], input=json.dumps(specs), capture_output=True, text=True,
        env=env, timeout=300,
    )
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip(f"this triton has no ptxas to compile for sm_{arch}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(specs), proc.stdout
    for r in results:
        assert r["target"] and r["target"].startswith(f"sm_{arch}"), r  # sm_90 may come out as sm_90a
        print(f"{r['arch']} {r['kernel']} {json.dumps(r['constexprs'], sort_keys=True)}: {r['cubin_bytes']} B cubin; "
              + ", ".join(f"{op} {r['count'][op]}" for op in COUNTED))
    return results


def compile_for_sm80(specs):
    """``compile_for(specs, 80)``: an A100."""
    return compile_for(specs, 80)


def atomics(result) -> int:
    """Atomic and reduction instructions in a compiled variant's PTX (the losses promise none)."""
    return result["count"]["atom."] + result["count"]["red."]
