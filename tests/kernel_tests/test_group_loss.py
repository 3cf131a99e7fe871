"""group_loss: the Triton kernels (under the interpreter on CPU) against the torch reference, fp64
and hand computations, for both kinds (all-pairs Bradley-Terry and Plackett-Luce)."""
import math

import pytest
import torch

from metarm_fast.kernels import group_loss, group_loss_reference
from metarm_fast.kernels._dispatch import is_interpreted
from metarm_fast.kernels.group_loss import GroupLossFunction, _group_bt_kernel, group_loss_fwd_bwd
from tests.kernel_tests.gpu_compile import compile_for_sm80

try:  # gpu_compile with an arch argument (sm_80 and sm_90); an older one compiles for sm_80 only
    from tests.kernel_tests.gpu_compile import ARCHS, compile_for
except ImportError:
    ARCHS = (80,)

    def compile_for(specs, arch):
        return compile_for_sm80(specs)
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
    not is_interpreted(_group_bt_kernel),
    reason="kernel tests need TRITON_INTERPRET=1 (set by tests/conftest.py when there is no GPU)",
)

# Tolerances: the shared ones of tests/kernel_tests/tolerances.py, with one change of scale. L and
# dL/dr come out of differences of O(1) quantities (lse_i - r_i; p_aa - 1 + sum p_ia, each term
# over |V| |P_g|), so both paths carry rounding errors of that size even when the result is tiny:
# a PL loss of 0.0089 (one response far ahead) differs from fp64 by 6e-8 in the torch reference
# and by 3e-9 in the kernel. So the comparison with the reference is relative to
# max(max |reference|, floor), floor = 1 for L and 1/(|V| max_g |P_g|) for dL/dr (``_scales``);
# the fp64 check (kernel error <= 2 x reference error + 1 fp32 ulp) is unchanged.
# Measured over seeds 0-7 of every grouping, mode and dtype below: L vs reference <= 2.2e-7 of that
# scale (limit LOSS_RTOL 1e-6); dL/dr fp32 <= 2.1e-7 (limit 1e-6), fp16 and bf16 0 (limits one ulp
# of the dtype); against fp64 the kernel's error was at most 0.91 of its limit (L, fp32, bt).
MODES = {"bt": ("bt", 0.0), "bt+margin": ("bt", 0.5), "pl": ("pl", 0.0)}


def _offsets(sizes):
    return torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist(), dtype=torch.int64)


def _scales(scores, sizes):
    """The scales of the rounding errors: 1 for L, 1/(|V| * max_g |P_g|) for dL/dr (see the note above)."""
    groups = scores.split(list(sizes))
    n_valid = sum(int(g.max() > g.min()) for g in groups)
    n_pairs = max(int((g[:, None] > g[None, :]).sum()) for g in groups)
    return 1.0, (1.0 / (max(n_valid, 1) * max(n_pairs, 1)))


def _assert_close_to_reference(kernel, reference, rtol, floor, what):
    """max |kernel - reference| <= rtol * max(max |reference|, floor)."""
    assert_close_to_reference(kernel, reference, rtol * max(1.0, floor / max(reference.abs().max().item(), 1e-30)),
                              what)


def _run(r, scores, offsets, impl, kind="bt", margin_scale=0.0):
    """(L, dL/dr); impl 'fp64' is the float64 reference on upcast rewards."""
    x = (r.double() if impl == "fp64" else r).detach().clone().requires_grad_()
    if impl == "fp64":
        loss = group_loss_reference(x, scores, offsets, kind=kind, margin_scale=margin_scale,
                                    compute_dtype=torch.float64)
    else:
        loss = group_loss(x, scores, offsets, kind=kind, margin_scale=margin_scale, impl=impl)
    loss.backward()
    return loss.detach(), x.grad


GROUPINGS = {
    "k=1": [1, 1, 1],
    "k=2": [2, 2, 2],
    "odd k (1,2,3,5,7 mixed)": [3, 1, 7, 2, 5, 3, 7, 1, 2],
    "k=70 (two tiles)": [70, 3],
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("grouping", list(GROUPINGS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference_and_fp64(dtype, grouping, mode):
    kind, margin_scale = MODES[mode]
    sizes = GROUPINGS[grouping]
    offsets = _offsets(sizes)
    g = torch.Generator().manual_seed(len(sizes))
    r = (torch.randn(sum(sizes), generator=g) * 2.0).to(dtype)
    scores = torch.randint(0, 4, (sum(sizes),), generator=g).float()  # 4 levels: many ties
    kernel = _run(r, scores, offsets, "triton", kind, margin_scale)
    reference = _run(r, scores, offsets, "torch", kind, margin_scale)
    truth = _run(r, scores, offsets, "fp64", kind, margin_scale)
    assert kernel[0].dtype == torch.float32 and kernel[0].dim() == 0
    assert kernel[1].dtype == dtype
    loss_scale, grad_scale = _scales(scores, sizes)
    for name, k, ref, t, rtol, floor in zip(("L", "dL/dr"), kernel, reference, truth,
                                            (LOSS_RTOL, GRAD_RTOL[dtype]), (loss_scale, grad_scale)):
        what = f"{dtype} {grouping} {mode} {name}"
        _assert_close_to_reference(k, ref, rtol, floor, what)
        assert_error_within_factor(k, ref, t, what)


def test_bt_by_hand():
    # Group 0: scores (2, 1, 1), rewards (1, 0, 0.5): pairs (0,1) gap 1 and (0,2) gap 0.5; the tie
    # (1,2) is no pair. Group 1: scores tied (0, 0): no pair, so not in the mean. Group 2: k=1.
    r = torch.tensor([1.0, 0.0, 0.5, 3.0, -3.0, 9.0])
    scores = torch.tensor([2.0, 1.0, 1.0, 0.0, 0.0, 5.0])
    offsets = torch.tensor([0, 3, 5, 6])
    # L = (softplus(-1) + softplus(-0.5)) / 2 = (0.3132616875 + 0.4740769842) / 2
    # dL/dr0 = -(sigmoid(-1) + sigmoid(-0.5)) / 2, dL/dr1 = sigmoid(-1) / 2, dL/dr2 = sigmoid(-0.5) / 2
    expected = 0.3936693358
    expected_grad = torch.tensor([-0.3232410451, 0.1344707107, 0.1887703344, 0.0, 0.0, 0.0])
    # margin_scale 0.5: both margins 0.5 * (2 - 1) = 0.5, gaps become 0.5 and 0:
    # L = (softplus(-0.5) + log 2) / 2; grads -(sigmoid(-0.5) + 1/2)/2, sigmoid(-0.5)/2, 1/4.
    expected_m = 0.5836120824
    expected_grad_m = torch.tensor([-0.4387703344, 0.1887703344, 0.25, 0.0, 0.0, 0.0])
    for impl in ("triton", "torch"):
        loss, grad = _run(r, scores, offsets, impl)
        assert math.isclose(loss.item(), expected, rel_tol=1e-6), impl
        torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-9)
        loss, grad = _run(r, scores, offsets, impl, margin_scale=0.5)
        assert math.isclose(loss.item(), expected_m, rel_tol=1e-6), impl
        torch.testing.assert_close(grad, expected_grad_m, rtol=1e-6, atol=1e-9)


def test_pl_by_hand():
    # Group 0, a strict ranking: scores (3, 2, 1), rewards (1, 0, -1).
    #   term_0 = log(e^1 + e^0 + e^-1) - 1 = 0.4076059644, term_1 = log(e^0 + e^-1) - 0 = 0.3132616875,
    #   item 2 has no worse item: no term. L_0 = (term_0 + term_1) / 2 = 0.3604338260.
    #   dL/dr0 = (p_00 - 1)/2; dL/dr1 = (p_11 - 1 + p_01)/2; dL/dr2 = (p_02 + p_12)/2, with
    #   p_0. = softmax(1, 0, -1) = (0.6652, 0.2447, 0.0900), p_1. = softmax(0, -1) = (0.7311, 0.2689).
    r = torch.tensor([1.0, 0.0, -1.0])
    scores = torch.tensor([3.0, 2.0, 1.0])
    for impl in ("triton", "torch"):
        loss, grad = _run(r, scores, torch.tensor([0, 3]), impl, kind="pl")
        assert math.isclose(loss.item(), 0.3604338260, rel_tol=1e-6), impl
        # dL/dr1 is -0.0121 from terms near 0.7 (p_11 - 1 + p_01): their fp32 rounding, ~6e-8, is its
        # error (measured 2.7e-8), hence atol 1e-7.
        torch.testing.assert_close(grad, torch.tensor([-0.1673795221, -0.0121064752, 0.1794859973]),
                                   rtol=1e-6, atol=1e-7)
    # Ties: scores (1, 1, 0), rewards (0.5, -0.5, 2). The tied pair are not in each other's denominators:
    #   term_0 = log(e^0.5 + e^2) - 0.5, term_1 = log(e^-0.5 + e^2) + 0.5; L = (term_0 + term_1)/2 = 2.1401515061.
    #   dL/dr0 = (sigmoid(0.5 - 2) - 1)/2, dL/dr1 = (sigmoid(-0.5 - 2) - 1)/2,
    #   dL/dr2 = (sigmoid(2 - 0.5) + sigmoid(2 + 0.5))/2.
    r = torch.tensor([0.5, -0.5, 2.0])
    scores = torch.tensor([1.0, 1.0, 0.0])
    for impl in ("triton", "torch"):
        loss, grad = _run(r, scores, torch.tensor([0, 3]), impl, kind="pl")
        assert math.isclose(loss.item(), 2.1401515061, rel_tol=1e-6), impl
        torch.testing.assert_close(grad, torch.tensor([-0.4087872381, -0.4620709100, 0.8708581481]),
                                   rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("mode", list(MODES))
def test_each_group_weighs_one_unit(mode):
    # A group of 7 responses weighs as much as a group of 2: L = (L_7 + L_2) / 2, and each group's
    # gradient is its own gradient halved. An all-tied group of 5 changes nothing.
    kind, margin_scale = MODES[mode]
    g = torch.Generator().manual_seed(11)
    r7, r2, r5 = torch.randn(7, generator=g), torch.randn(2, generator=g), torch.randn(5, generator=g)
    s7, s2, s5 = torch.tensor([6.0, 2, 4, 1, 5, 3, 0]), torch.tensor([1.0, 0.0]), torch.full((5,), 2.0)
    for impl in ("triton", "torch"):
        l7, g7 = _run(r7, s7, torch.tensor([0, 7]), impl, kind, margin_scale)
        l2, g2 = _run(r2, s2, torch.tensor([0, 2]), impl, kind, margin_scale)
        loss, grad = _run(torch.cat([r7, r5, r2]), torch.cat([s7, s5, s2]), _offsets([7, 5, 2]), impl, kind,
                          margin_scale)
        assert math.isclose(loss.item(), (l7.item() + l2.item()) / 2, rel_tol=1e-6), impl
        torch.testing.assert_close(grad, torch.cat([g7 / 2, torch.zeros(5), g2 / 2]), rtol=1e-6, atol=1e-9)
        assert l7.item() > 0 and l2.item() > 0


@pytest.mark.parametrize("mode", list(MODES))
def test_ties(mode):
    kind, margin_scale = MODES[mode]
    # Group 0 all tied (no pair); group 1: two tied at the top, one below.
    r = torch.tensor([0.3, -1.0, 2.0, 0.5, 0.5, -0.25])
    scores = torch.tensor([1.0, 1.0, 1.0, 2.0, 2.0, 0.0])
    offsets = torch.tensor([0, 3, 6])
    for impl in ("triton", "torch"):
        loss, grad = _run(r, scores, offsets, impl, kind, margin_scale)
        assert torch.equal(grad[:3], torch.zeros(3)), impl  # the tied group feels nothing
        # The tied pair (equal rewards) only meets the third: equal gradients, opposite to the third's.
        assert grad[3] == grad[4] and grad[3] < 0 < grad[5], impl
        assert math.isclose(grad[5].item(), -2 * grad[3].item(), rel_tol=1e-6), impl
        # L is group 1's alone (group 0 has no pair and is not in the mean).
        alone, _ = _run(r[3:], scores[3:], torch.tensor([0, 3]), impl, kind, margin_scale)
        assert math.isclose(loss.item(), alone.item(), rel_tol=1e-6), impl


@pytest.mark.parametrize("mode", list(MODES))
def test_no_pair_anywhere_gives_zero(mode):
    kind, margin_scale = MODES[mode]
    r = torch.randn(6)
    scores = torch.tensor([1.0, 1.0, 1.0, 4.0, 0.0, 0.0])  # k=3 all tied, k=1, k=2 tied
    for impl in ("triton", "torch"):
        loss, grad = _run(r, scores, _offsets([3, 1, 2]), impl, kind, margin_scale)
        assert loss.item() == 0.0 and torch.equal(grad, torch.zeros(6)), impl


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_rewards(dtype, mode):
    kind, margin_scale = MODES[mode]
    # Gaps of 2e4 both ways (the better one far above, then far below) and a group near zero.
    r = torch.tensor([1e4, -1e4, -1e4, 1e4, 0.0, 0.25, -0.25], dtype=dtype)
    scores = torch.tensor([1.0, 0.0, 1.0, 0.0, 2.0, 1.0, 0.0])
    offsets = torch.tensor([0, 2, 4, 7])
    kernel = _run(r, scores, offsets, "triton", kind, margin_scale)
    reference = _run(r, scores, offsets, "torch", kind, margin_scale)
    truth = _run(r, scores, offsets, "fp64", kind, margin_scale)
    assert torch.isfinite(kernel[0]) and torch.isfinite(kernel[1]).all()
    for name, k, ref, t, rtol in zip(("L", "dL/dr"), kernel, reference, truth, (LOSS_RTOL, GRAD_RTOL[dtype])):
        assert_close_to_reference(k, ref, rtol, f"extreme {dtype} {mode} {name}")
        assert_error_within_factor(k, ref, t, f"extreme {dtype} {mode} {name}")
    # Group 0 is won by 2e4: loss ~0, no gradient. Group 1 is lost by 2e4: loss ~2e4 (+ margin), slope 1.
    gap = r.float()[3].item() - r.float()[2].item()  # 2e4 as stored in this dtype
    assert kernel[0].item() > gap / 3 - 1
    torch.testing.assert_close(kernel[1][:4].float(), torch.tensor([0.0, 0.0, -1 / 3, 1 / 3]),
                               rtol=GRAD_RTOL[dtype], atol=0.0)


@pytest.mark.parametrize("kind", ("bt", "pl"))
def test_repeat_runs_are_bitwise_equal(kind):
    sizes = [5] * 20 + [70, 1, 2]
    offsets = _offsets(sizes)
    g = torch.Generator().manual_seed(7)
    r = torch.randn(sum(sizes), generator=g).to(torch.bfloat16)
    scores = torch.randint(0, 5, (sum(sizes),), generator=g).float()
    first = _run(r, scores, offsets, "triton", kind)
    again = _run(r, scores, offsets, "triton", kind)
    for a, b in zip(first, again):
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("kind", ("bt", "pl"))
def test_strided_rewards_and_integer_scores(kind):
    r = torch.randn(24)[::2]  # 12 rewards, stride 2
    ranks = torch.tensor([0, 1, 2, 3, 4, 0, 1, 1, 2, 3, 4, 5])  # ranks, 0 = best: scores are their negation
    offsets = _offsets([5, 7])
    kernel = _run(r, -ranks, offsets, "triton", kind)
    reference = _run(r.contiguous(), -ranks.float(), offsets, "torch", kind)
    for k, ref in zip(kernel, reference):
        assert_close_to_reference(k, ref, 1e-6, "strided")


def test_scores_get_no_gradient_and_grad_out_scales():
    r = torch.randn(5, requires_grad=True)
    scores = torch.tensor([0.0, 1.0, 2.0, 1.0, 0.5], requires_grad=True)
    offsets = torch.tensor([0, 5])
    (3.0 * group_loss(r, scores, offsets, margin_scale=0.1, impl="triton")).backward()
    grad3 = r.grad.clone()
    r.grad = None
    group_loss(r, scores, offsets, margin_scale=0.1, impl="triton").backward()
    torch.testing.assert_close(grad3, 3.0 * r.grad)
    assert scores.grad is None


def test_dispatch(monkeypatch):
    r = torch.randn(6).requires_grad_()
    scores = torch.tensor([1.0, 0.0, 2.0, 0.0, 1.0, 2.0])
    offsets = _offsets([3, 3])
    monkeypatch.delenv("METARM_FAST_KERNELS", raising=False)
    assert "GroupLossFunction" not in type(group_loss(r, scores, offsets).grad_fn).__name__  # CPU: torch
    assert "GroupLossFunction" in type(group_loss(r, scores, offsets, impl="triton").grad_fn).__name__
    monkeypatch.setenv("METARM_FAST_KERNELS", "triton")
    assert "GroupLossFunction" in type(group_loss(r, scores, offsets, kind="pl").grad_fn).__name__
    assert "GroupLossFunction" not in type(group_loss(r, scores, offsets, impl="torch").grad_fn).__name__


_R, _S, _O = torch.zeros(3), torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0, 3])
BAD_INPUTS = {
    "empty": ((torch.zeros(0), torch.zeros(0), torch.tensor([0])), {}, ValueError, "empty batch"),
    "2-D r": ((torch.zeros(1, 3), torch.zeros(1, 3), _O), {}, ValueError, "1-D"),
    "int r": ((torch.zeros(3, dtype=torch.int64), _S, _O), {}, ValueError, "dtype"),
    "scores length": ((_R, torch.zeros(4), _O), {}, ValueError, "shape of r"),
    "scores nan": ((_R, torch.tensor([0.0, float("nan"), 1.0]), _O), {}, ValueError, "finite"),
    "scores bool": ((_R, torch.tensor([True, False, True]), _O), {}, ValueError, "real numbers"),
    "scores list": ((_R, [1.0, 0.0, 2.0], _O), {}, TypeError, "scores must be a torch.Tensor"),
    "offsets int32": ((_R, _S, torch.tensor([0, 3], dtype=torch.int32)), {}, ValueError, "int64"),
    "offsets not from 0": ((_R, _S, torch.tensor([1, 3])), {}, ValueError, "offsets\\[0\\] must be 0"),
    "offsets not to N": ((_R, _S, torch.tensor([0, 2])), {}, ValueError, "len\\(r\\) = 3"),
    "offsets repeat": ((_R, _S, torch.tensor([0, 1, 1, 3])), {}, ValueError, "strictly increasing"),
    "kind": ((_R, _S, _O), {"kind": "listnet"}, ValueError, "kind must be one of"),
    "pl with margin": ((_R, _S, _O), {"kind": "pl", "margin_scale": 0.5}, ValueError, "kind='bt' only"),
    "margin negative": ((_R, _S, _O), {"margin_scale": -1.0}, ValueError, ">= 0"),
    "margin nan": ((_R, _S, _O), {"margin_scale": float("nan")}, ValueError, "finite"),
    "margin tensor": ((_R, _S, _O), {"margin_scale": torch.tensor(0.5)}, TypeError, "margin_scale"),
}


@pytest.mark.parametrize("impl", ("torch", "triton"))
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs(case, impl):
    args, kwargs, error, match = BAD_INPUTS[case]
    with pytest.raises(error, match=match):
        group_loss(*args, impl=impl, **kwargs)


def test_launcher_checks_inputs_itself():
    with pytest.raises(ValueError, match="offsets\\[0\\] must be 0"):
        group_loss_fwd_bwd(_R, _S, torch.tensor([1, 3]))
    with pytest.raises(ValueError, match="kind='bt' only"):
        GroupLossFunction.apply(_R, _S, _O, "pl", 1.0)


@pytest.mark.parametrize("arch", ARCHS)
def test_compiles_for_gpu(arch):
    specs = []
    common = {"S_ptr": "*fp32", "OFFSETS_ptr": "*i64"}
    for dtype in ("fp32", "fp16", "bf16"):
        for block_k in (16, 64):
            r_args = {"R_ptr": f"*{dtype}", "R_stride": "i64"}
            for has_margin in (False, True):
                specs.append({
                    "module": "metarm_fast.kernels.group_loss", "kernel": "_group_bt_kernel",
                    "signature": {**r_args, **common, "DR_ptr": "*fp32", "PARTIAL_ptr": "*fp32",
                                  "VALID_ptr": "*fp32", "margin_scale": "fp32", "HAS_MARGIN": "constexpr",
                                  "BLOCK_K": "constexpr"},
                    "constexprs": {"HAS_MARGIN": has_margin, "BLOCK_K": block_k},
                })
            specs.append({
                "module": "metarm_fast.kernels.group_loss", "kernel": "_group_pl_lse_kernel",
                "signature": {**r_args, **common, "MAX_ptr": "*fp32", "SUM_ptr": "*fp32", "PARTIAL_ptr": "*fp32",
                              "VALID_ptr": "*fp32", "BLOCK_K": "constexpr"},
                "constexprs": {"BLOCK_K": block_k},
            })
            specs.append({
                "module": "metarm_fast.kernels.group_loss", "kernel": "_group_pl_grad_kernel",
                "signature": {**r_args, **common, "MAX_ptr": "*fp32", "SUM_ptr": "*fp32", "DR_ptr": "*fp32",
                              "BLOCK_K": "constexpr"},
                "constexprs": {"BLOCK_K": block_k},
            })
    for result in compile_for(specs, arch):
        # Deterministic reductions: no atomic (atom.) nor reduction (red.) instruction.
        assert result["cubin_bytes"] > 0 and result["count"]["atom."] + result["count"].get("red.", 0) == 0, result
