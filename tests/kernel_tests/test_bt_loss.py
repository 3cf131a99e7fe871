"""bt_loss: the Triton kernel (under the interpreter on CPU) against the torch reference and fp64."""
import math

import pytest
import torch

from metarm_fast.kernels import bt_loss, bt_loss_reference
from metarm_fast.kernels._dispatch import check_triton_device, is_interpreted
from metarm_fast.kernels.bt_loss import BTLossFunction, _bt_loss_fwd_bwd_kernel, bt_loss_fwd_bwd
from tests.kernel_tests.gpu_compile import ARCHS, atomics, compile_for
from tests.kernel_tests.tolerances import (
    DTYPES,
    GRAD_RTOL,
    LOSS_RTOL,
    assert_close_to_reference,
    assert_error_within_factor,
)

# The Triton path is exercised on CPU tensors under the interpreter, which tests/conftest.py turns
# on when there is no GPU. On a GPU machine run `TRITON_INTERPRET=1 pytest tests/kernel_tests`.
pytestmark = pytest.mark.skipif(
    not is_interpreted(_bt_loss_fwd_bwd_kernel),
    reason="kernel tests need TRITON_INTERPRET=1 (set by tests/conftest.py when there is no GPU)",
)


SIZES = (1, 3, 257, 4097)


def _inputs(n, dtype, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    chosen = (torch.randn(n, generator=g) * scale).to(dtype)
    rejected = (torch.randn(n, generator=g) * scale).to(dtype)
    margin = torch.rand(n, generator=g)
    return chosen, rejected, margin


def _run(chosen, rejected, margin, center_coef, impl):
    """(loss, dchosen, drejected); impl 'fp64' is the float64 reference on upcast inputs."""
    if impl == "fp64":
        chosen, rejected = chosen.double(), rejected.double()
    c = chosen.detach().clone().requires_grad_()
    r = rejected.detach().clone().requires_grad_()
    if impl == "fp64":
        loss = bt_loss_reference(c, r, margin, center_coef, compute_dtype=torch.float64)
    else:
        loss = bt_loss(c, r, margin, center_coef, impl=impl)
    loss.backward()
    return loss.detach(), c.grad, r.grad


MARGIN_CASES = {
    "plain": (None, 0.0),
    "float-margin": (0.5, 0.0),
    "tensor-margin+center": ("tensor", 0.01),
}


@pytest.mark.parametrize("case", list(MARGIN_CASES))
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference_and_fp64(dtype, n, case):
    chosen, rejected, margin_t = _inputs(n, dtype)
    margin, center_coef = MARGIN_CASES[case]
    margin = margin_t if margin == "tensor" else margin
    kernel = _run(chosen, rejected, margin, center_coef, "triton")
    reference = _run(chosen, rejected, margin, center_coef, "torch")
    truth = _run(chosen, rejected, margin, center_coef, "fp64")

    assert kernel[0].dtype == torch.float32 and kernel[0].dim() == 0
    assert kernel[1].dtype == dtype and kernel[2].dtype == dtype  # grads in the input dtype
    for name, k, ref, t, rtol in zip(
        ("loss", "d/dchosen", "d/drejected"), kernel, reference, truth, (LOSS_RTOL, GRAD_RTOL[dtype], GRAD_RTOL[dtype])
    ):
        assert_close_to_reference(k, ref, rtol, f"{dtype} n={n} {case} {name}")
        assert_error_within_factor(k, ref, t, f"{dtype} n={n} {case} {name}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_gaps_and_ties(dtype):
    # Gaps of +1e4, -1e4 and 0: softplus must not overflow and its slope must be exact.
    chosen = torch.tensor([1e4, -1e4, 0.5], dtype=dtype)
    rejected = torch.tensor([0.0, 0.0, 0.5], dtype=dtype)
    n = 3
    for impl in ("triton", "torch"):
        loss, dc, dr = _run(chosen, rejected, None, 0.0, impl)
        gap = chosen.float()[1].item()  # -1e4 as stored in this dtype (bf16 holds -9984)
        assert torch.isfinite(loss) and torch.isfinite(dc).all() and torch.isfinite(dr).all()
        assert math.isclose(loss.item(), (-gap + math.log(2.0)) / n, rel_tol=1e-6), impl
        expected = torch.tensor([0.0, -1.0 / n, -0.5 / n])
        torch.testing.assert_close(dc.float(), expected, rtol=GRAD_RTOL[dtype], atol=0.0)
        torch.testing.assert_close(dr.float(), -expected, rtol=GRAD_RTOL[dtype], atol=0.0)


def test_center_term_value():
    # loss = softplus(-(c - r)) + c * (c + r)^2 for one pair, by hand.
    c, r, coef = torch.tensor([1.5]), torch.tensor([0.25]), 0.01
    expected = math.log1p(math.exp(-1.25)) + coef * 1.75**2
    for impl in ("triton", "torch"):
        assert math.isclose(bt_loss(c, r, center_coef=coef, impl=impl).item(), expected, rel_tol=1e-6)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_repeat_runs_are_bitwise_equal(dtype):
    chosen, rejected, margin = _inputs(4097, dtype, seed=3)
    first = _run(chosen, rejected, margin, 0.01, "triton")
    for _ in range(2):
        again = _run(chosen, rejected, margin, 0.01, "triton")
        for a, b in zip(first, again):
            assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def test_strided_inputs():
    # Rewards of interleaved pairs: chosen = r[0::2] is not contiguous; the kernel takes strides.
    rewards = torch.randn(2 * 257)
    pairs = rewards.view(-1, 2)
    kernel = _run(pairs[:, 0], pairs[:, 1], None, 0.0, "triton")
    reference = _run(pairs[:, 0].contiguous(), pairs[:, 1].contiguous(), None, 0.0, "torch")
    for k, ref in zip(kernel, reference):
        assert_close_to_reference(k, ref, 1e-6, "strided")


def test_no_grad_and_single_input_grad():
    chosen, rejected, _ = _inputs(5, torch.float32)
    with torch.no_grad():
        loss = bt_loss(chosen, rejected, impl="triton")
    assert loss.grad_fn is None
    c = chosen.clone().requires_grad_()
    bt_loss(c, rejected, impl="triton").backward()
    assert c.grad is not None and torch.isfinite(c.grad).all()


def test_dispatch(monkeypatch):
    chosen, rejected, _ = _inputs(4, torch.float32)
    c = chosen.clone().requires_grad_()
    monkeypatch.delenv("METARM_FAST_KERNELS", raising=False)
    assert "BTLossFunction" not in type(bt_loss(c, rejected).grad_fn).__name__  # CPU: reference
    assert "BTLossFunction" in type(bt_loss(c, rejected, impl="triton").grad_fn).__name__
    monkeypatch.setenv("METARM_FAST_KERNELS", "triton")
    assert "BTLossFunction" in type(bt_loss(c, rejected).grad_fn).__name__
    assert "BTLossFunction" not in type(bt_loss(c, rejected, impl="torch").grad_fn).__name__
    monkeypatch.setenv("METARM_FAST_KERNELS", "cuda")
    with pytest.raises(ValueError, match="METARM_FAST_KERNELS"):
        bt_loss(chosen, rejected)
    with pytest.raises(ValueError, match="impl must be one of"):
        bt_loss(chosen, rejected, impl="fast")


def test_cpu_tensor_without_interpreter_is_refused():
    chosen = torch.zeros(3)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        check_triton_device("bt_loss", [chosen], interpreted=False)
    check_triton_device("bt_loss", [chosen], interpreted=True)  # under the interpreter: fine
    with pytest.raises(ValueError, match="CUDA tensors"):
        check_triton_device("bt_loss", [torch.zeros(3, device="meta")], interpreted=True)
    with pytest.raises(ValueError, match="one device"):
        check_triton_device("bt_loss", [chosen, torch.zeros(3, device="meta")], interpreted=True)


BAD_INPUTS = {
    "empty": (lambda: (torch.zeros(0), torch.zeros(0)), {}, ValueError, "empty batch"),
    "lengths": (lambda: (torch.zeros(3), torch.zeros(4)), {}, ValueError, "same length"),
    "2-D": (lambda: (torch.zeros(2, 3), torch.zeros(2, 3)), {}, ValueError, "1-D"),
    "int dtype": (lambda: (torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64)), {}, ValueError, "dtype"),
    "fp64": (lambda: (torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)), {}, ValueError, "dtype"),
    "mixed dtypes": (lambda: (torch.zeros(3), torch.zeros(3, dtype=torch.bfloat16)), {}, ValueError, "one dtype"),
    "not a tensor": (lambda: ([1.0, 2.0], torch.zeros(2)), {}, TypeError, "torch.Tensor"),
    "margin length": (lambda: (torch.zeros(3), torch.zeros(3)), {"margin": torch.zeros(4)}, ValueError, "margin"),
    "margin int": (lambda: (torch.zeros(3), torch.zeros(3)), {"margin": torch.zeros(3, dtype=torch.int32)}, ValueError, "floating"),
    "margin nan": (lambda: (torch.zeros(3), torch.zeros(3)), {"margin": float("nan")}, ValueError, "finite"),
    "margin str": (lambda: (torch.zeros(3), torch.zeros(3)), {"margin": "1"}, TypeError, "margin"),
    "center negative": (lambda: (torch.zeros(3), torch.zeros(3)), {"center_coef": -0.1}, ValueError, "center_coef"),
    "center inf": (lambda: (torch.zeros(3), torch.zeros(3)), {"center_coef": float("inf")}, ValueError, "center_coef"),
}


@pytest.mark.parametrize("impl", ("torch", "triton"))
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs(case, impl):
    make, kwargs, error, match = BAD_INPUTS[case]
    chosen, rejected = make()
    with pytest.raises(error, match=match):
        bt_loss(chosen, rejected, impl=impl, **kwargs)


def test_launcher_checks_inputs_itself():
    # The host launcher is usable on its own and validates too.
    with pytest.raises(ValueError, match="empty batch"):
        bt_loss_fwd_bwd(torch.zeros(0), torch.zeros(0), None, 0.0)
    with pytest.raises(ValueError, match="same length"):
        BTLossFunction.apply(torch.zeros(2), torch.zeros(3), None, 0.0)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
def test_compiles_for_gpu(arch):
    """Every variant compiles to a cubin for an A100 (sm_80) and an H100 (sm_90); the PTX holds what the
    kernel promises (printed per variant: pytest -s)."""
    specs = []
    for dtype in ("fp32", "fp16", "bf16"):
        for has_margin in (False, True):
            specs.append({
                "module": "metarm_fast.kernels.bt_loss",
                "kernel": "_bt_loss_fwd_bwd_kernel",
                "signature": {
                    "C_ptr": f"*{dtype}", "C_stride": "i64", "R_ptr": f"*{dtype}", "R_stride": "i64",
                    "M_ptr": "*bf16", "M_stride": "i64", "margin_value": "fp32", "center_coef": "fp32",
                    "inv_n": "fp32", "DC_ptr": "*fp32", "DR_ptr": "*fp32", "PARTIAL_ptr": "*fp32", "n": "i32",
                    "HAS_MARGIN_TENSOR": "constexpr", "BLOCK_SIZE": "constexpr",
                },
                "constexprs": {"HAS_MARGIN_TENSOR": has_margin, "BLOCK_SIZE": 1024},
            })
    specs.append({
        "module": "metarm_fast.kernels._partial_sum",
        "kernel": "_partial_sum_kernel",
        "signature": {"PARTIAL_ptr": "*fp32", "OUT_ptr": "*fp32", "num_partials": "i32", "scale": "fp32",
                      "BLOCK_SIZE": "constexpr"},
        "constexprs": {"BLOCK_SIZE": 1024},
    })
    for result in compile_for(specs, arch):
        assert result["cubin_bytes"] > 0
        assert atomics(result) == 0, result  # deterministic reduction: no atomics
