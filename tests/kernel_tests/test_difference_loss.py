"""difference_loss: the Triton kernel (under the interpreter on CPU) against the torch reference."""
import math

import pytest
import torch

from metarm_fast.kernels import difference_loss, difference_loss_reference
from metarm_fast.kernels._dispatch import is_interpreted
from metarm_fast.kernels.difference_loss import (
    DifferenceLossFunction,
    _difference_loss_fwd_bwd_kernel,
    difference_loss_fwd_bwd,
)
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
    not is_interpreted(_difference_loss_fwd_bwd_kernel),
    reason="kernel tests need TRITON_INTERPRET=1 (set by tests/conftest.py when there is no GPU)",
)


def _offsets(sizes):
    return torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist(), dtype=torch.int64)


def _run(rewards, offsets, impl):
    """(J, dJ/dr); impl 'fp64' is the float64 reference on upcast rewards."""
    r = (rewards.double() if impl == "fp64" else rewards).detach().clone().requires_grad_()
    if impl == "fp64":
        j = difference_loss_reference(r, offsets, compute_dtype=torch.float64)
    else:
        j = difference_loss(r, offsets, impl=impl)
    j.backward()
    return j.detach(), r.grad


GROUPINGS = {
    "k=1": [1, 1, 1],
    "k=2": [2, 2, 2],
    "k=5": [5, 5, 5],
    "k=17": [17, 17, 17],
    "mixed": [1, 2, 5, 17, 3, 1, 5],
    "k=100 (two tiles)": [100, 64, 65],
}


@pytest.mark.parametrize("grouping", list(GROUPINGS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference_and_fp64(dtype, grouping):
    sizes = GROUPINGS[grouping]
    offsets = _offsets(sizes)
    g = torch.Generator().manual_seed(len(sizes))
    rewards = (torch.randn(sum(sizes), generator=g) * 2.0).to(dtype)
    kernel = _run(rewards, offsets, "triton")
    reference = _run(rewards, offsets, "torch")
    truth = _run(rewards, offsets, "fp64")
    assert kernel[0].dtype == torch.float32 and kernel[0].dim() == 0
    assert kernel[1].dtype == dtype
    for name, k, ref, t, rtol in zip(("J", "dJ/dr"), kernel, reference, truth, (LOSS_RTOL, GRAD_RTOL[dtype])):
        assert_close_to_reference(k, ref, rtol, f"{dtype} {grouping} {name}")
        assert_error_within_factor(k, ref, t, f"{dtype} {grouping} {name}")


def test_value_by_hand():
    # Prompt 1: k=1 -> 0. Prompt 2: k=2, gap 1 -> 2/4 * sigmoid(1). Mean over the 2 prompts.
    rewards = torch.tensor([3.0, 0.5, -0.5])
    offsets = torch.tensor([0, 1, 3])
    sig = 1.0 / (1.0 + math.exp(-1.0))
    expected_j = 0.5 * (0.0 + 0.5 * sig)
    dsig = sig * (1.0 - sig)
    expected_grad = torch.tensor([0.0, 0.5 * 0.5 * dsig, -0.5 * 0.5 * dsig])
    for impl in ("triton", "torch"):
        j, grad = _run(rewards, offsets, impl)
        assert math.isclose(j.item(), expected_j, rel_tol=1e-6), impl
        torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_give_zero_gradient(dtype):
    # Group 1: all equal (J_g = (k-1)/(2k), gradient exactly 0). Group 2: a tied pair plus one.
    rewards = torch.tensor([0.7, 0.7, 0.7, 0.7, 1.0, 1.0, 3.0], dtype=dtype)
    offsets = torch.tensor([0, 4, 7])
    for impl in ("triton", "torch"):
        j, grad = _run(rewards, offsets, impl)
        assert torch.equal(grad[:4], torch.zeros(4, dtype=dtype)), impl
        # The tied pair only feels the third response: equal gradients, opposite to r_3's.
        assert grad[4] == grad[5] and grad[4] < 0 < grad[6], impl
        assert math.isclose(grad[6].float().item(), -2 * grad[4].float().item(), rel_tol=GRAD_RTOL[dtype])
        # J = mean(J_1, J_2): J_1 = (k-1)/(2k) = 3/8 (all pairs tied), J_2 = 2/9 (0.5 + 2 sigmoid(2)).
        sig2 = 1.0 / (1.0 + math.exp(-2.0))
        assert math.isclose(j.item(), 0.5 * (3.0 / 8.0 + 2.0 / 9.0 * (0.5 + 2.0 * sig2)), rel_tol=1e-6), impl


@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_gaps(dtype):
    rewards = torch.tensor([1e4, -1e4, 0.0, 5e3, -5e3], dtype=dtype)
    offsets = torch.tensor([0, 2, 5])
    for impl in ("triton", "torch"):
        j, grad = _run(rewards, offsets, impl)
        # sigmoid(huge) == 1 in fp32: J = mean(2/4 * 1, 2/9 * 3 * 1), gradients 0 (flat).
        assert math.isclose(j.item(), 0.5 * (0.5 + 6.0 / 9.0), rel_tol=1e-6), impl
        assert torch.isfinite(grad).all() and (grad == 0).all(), impl


def test_only_singletons():
    rewards = torch.randn(4).requires_grad_()
    for impl in ("triton", "torch"):
        j, grad = _run(rewards, torch.arange(5), impl)
        assert j.item() == 0.0 and torch.equal(grad, torch.zeros(4)), impl


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_repeat_runs_are_bitwise_equal(dtype):
    sizes = [5] * 40 + [17, 1, 2]
    offsets = _offsets(sizes)
    rewards = torch.randn(sum(sizes), generator=torch.Generator().manual_seed(7)).to(dtype)
    first = _run(rewards, offsets, "triton")
    again = _run(rewards, offsets, "triton")
    for a, b in zip(first, again):
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def test_strided_rewards():
    rewards = torch.randn(24)[::2]  # 12 rewards, stride 2
    offsets = _offsets([5, 7])
    kernel = _run(rewards, offsets, "triton")
    reference = _run(rewards.contiguous(), offsets, "torch")
    for k, ref in zip(kernel, reference):
        assert_close_to_reference(k, ref, 1e-6, "strided")


def test_dispatch(monkeypatch):
    rewards = torch.randn(6).requires_grad_()
    offsets = _offsets([3, 3])
    monkeypatch.delenv("METARM_FAST_KERNELS", raising=False)
    assert "DifferenceLossFunction" not in type(difference_loss(rewards, offsets).grad_fn).__name__
    monkeypatch.setenv("METARM_FAST_KERNELS", "triton")
    assert "DifferenceLossFunction" in type(difference_loss(rewards, offsets).grad_fn).__name__
    monkeypatch.setenv("METARM_FAST_KERNELS", "torch")
    assert "DifferenceLossFunction" in type(difference_loss(rewards, offsets, impl="triton").grad_fn).__name__


BAD_INPUTS = {
    "empty": (torch.zeros(0), torch.tensor([0]), "empty batch"),
    "2-D rewards": (torch.zeros(2, 3), torch.tensor([0, 3, 6]), "1-D"),
    "int rewards": (torch.zeros(3, dtype=torch.int64), torch.tensor([0, 3]), "dtype"),
    "offsets int32": (torch.zeros(3), torch.tensor([0, 3], dtype=torch.int32), "int64"),
    "offsets float": (torch.zeros(3), torch.tensor([0.0, 3.0]), "int64"),
    "offsets 2-D": (torch.zeros(3), torch.tensor([[0, 3]]), "1-D"),
    "offsets too short": (torch.zeros(3), torch.tensor([0]), "m\\+1 >= 2"),
    "offsets not from 0": (torch.zeros(3), torch.tensor([1, 3]), "offsets\\[0\\] must be 0"),
    "offsets not to N": (torch.zeros(3), torch.tensor([0, 2]), "must equal len\\(rewards\\) = 3"),
    "offsets repeat": (torch.zeros(3), torch.tensor([0, 1, 1, 3]), "strictly increasing.*offsets\\[1\\] = 1"),
    "offsets decrease": (torch.zeros(3), torch.tensor([0, 2, 1, 3]), "strictly increasing"),
    "offsets list": (torch.zeros(3), [0, 3], "offsets must be a torch.Tensor"),
}


@pytest.mark.parametrize("impl", ("torch", "triton"))
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs(case, impl):
    rewards, offsets, match = BAD_INPUTS[case]
    error = TypeError if case == "offsets list" else ValueError
    with pytest.raises(error, match=match):
        difference_loss(rewards, offsets, impl=impl)


def test_launcher_checks_inputs_itself():
    with pytest.raises(ValueError, match="offsets\\[0\\] must be 0"):
        difference_loss_fwd_bwd(torch.zeros(3), torch.tensor([1, 3]))
    with pytest.raises(ValueError, match="strictly increasing"):
        DifferenceLossFunction.apply(torch.zeros(3), torch.tensor([0, 0, 3]))


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
def test_compiles_for_gpu(arch):
    """Every variant compiles to a cubin for an A100 (sm_80) and an H100 (sm_90); the PTX holds what the
    kernel promises (printed per variant: pytest -s)."""
    specs = [
        {
            "module": "metarm_fast.kernels.difference_loss",
            "kernel": "_difference_loss_fwd_bwd_kernel",
            "signature": {"R_ptr": f"*{dtype}", "R_stride": "i64", "OFFSETS_ptr": "*i64", "DR_ptr": "*fp32",
                          "PARTIAL_ptr": "*fp32", "inv_m": "fp32", "BLOCK_K": "constexpr"},
            "constexprs": {"BLOCK_K": block_k},
        }
        for dtype in ("fp32", "fp16", "bf16")
        for block_k in (16, 64)
    ]
    specs.append({
        "module": "metarm_fast.kernels._partial_sum",
        "kernel": "_partial_sum_kernel",
        "signature": {"PARTIAL_ptr": "*fp32", "OUT_ptr": "*fp32", "num_partials": "i32", "scale": "fp32",
                      "BLOCK_SIZE": "constexpr"},
        "constexprs": {"BLOCK_SIZE": 1024},
    })
    for result in compile_for(specs, arch):
        assert result["cubin_bytes"] > 0 and atomics(result) == 0, result
