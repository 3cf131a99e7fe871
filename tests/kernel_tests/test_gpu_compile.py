"""gpu_compile's PTX counts see what they count: a probe kernel with an atomic add and a multiply-add,
compiled for sm_80 and sm_90 (the kernels' own compile tests assert those counts are 0)."""
import pytest

from tests.kernel_tests.gpu_compile import ARCHS, atomics, compile_for, compile_for_sm80

PROBE = {"module": "tests.kernel_tests.atomic_probe", "kernel": "_atomic_probe_kernel",
         "signature": {"X_ptr": "*fp32", "OUT_ptr": "*fp32", "a": "fp32", "b": "fp32", "BLOCK": "constexpr"},
         "constexprs": {"BLOCK": 128}}


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
def test_counts_see_atomics_and_fma(arch):
    (fused,) = compile_for([PROBE], arch)
    assert fused["target"].startswith(f"sm_{arch}")
    assert atomics(fused) >= 1 and fused["count"]["fma.rn.f32"] >= 1, fused
    (unfused,) = compile_for([dict(PROBE, options={"enable_fp_fusion": False})], arch)
    assert unfused["count"]["fma.rn.f32"] == 0, unfused  # what the perturbation kernels rely on


def test_compile_for_sm80_is_sm80():
    (r,) = compile_for_sm80([PROBE])
    assert r["arch"] == "sm_80" and r["target"] == "sm_80"
