"""perturb_ / restore_: bit-exact restore, torch == Triton == the oracle bit for bit, and honest statistics."""
import math

import pytest
import torch

from metarm_fast.kernels import Perturbation, PerturbStats, perturb_, restore_
from metarm_fast.kernels import perturb_triton as triton_path
from metarm_fast.kernels import perturbation as perturbation_module
from metarm_fast.kernels._dispatch import is_interpreted
from metarm_fast.kernels.perturb_torch import TorchRestorePlan, perturb_torch_, restore_torch_
from metarm_fast.kernels.perturb_triton import CHUNK, TritonRestorePlan, _perturb_kernel, perturb_triton_, restore_triton_
from tests.kernel_tests.gpu_compile import ARCHS, atomics, compile_for
from tests.kernel_tests.perturb_oracle import perturb_oracle_, restore_oracle_

# The interpreter evaluates kernels with numpy, which warns when the special values below
# overflow or produce NaN inside a where() branch that is then discarded. Expected; not a bug.
# The Triton path is exercised on CPU tensors under the interpreter, which tests/conftest.py turns
# on when there is no GPU. On a GPU machine run `TRITON_INTERPRET=1 pytest tests/kernel_tests`.
pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.skipif(
        not is_interpreted(_perturb_kernel),
        reason="kernel tests need TRITON_INTERPRET=1 (set by tests/conftest.py when there is no GPU)",
    ),
]

BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16

# Values that break naive schemes: signed zeros, subnormals, the largest finite values, inf, NaN.
SPECIAL_WEIGHTS = {
    FP32: [0.0, -0.0, 1e-45, -1e-45, 1e-40, -3e-39, 1.1754944e-38, 3.4028235e38, -3.4e38, 1e30,
           float("inf"), float("-inf"), float("nan"), 1.0, -2.0, 1e-10],
    FP16: [0.0, -0.0, 6e-8, -6e-8, 3e-5, -6.1e-5, 65504.0, -65504.0, 6e4, 1e-3,
           float("inf"), float("-inf"), float("nan"), 1.0, -2.0, 0.02],
    BF16: [0.0, -0.0, 9.2e-41, -1e-39, 1.2e-38, 3.38e38, -3.3e38, 1e30,
           float("inf"), float("-inf"), float("nan"), 1.0, -2.0, 0.02],
}
SPECIAL_GRADS = [0.0, -0.0, float("inf"), float("nan"), 1e-40, 1e3, -1e3, 2.0]
SIZES = (1, 3, 1000, CHUNK + 1)  # CHUNK + 1: a tensor split across two programs


def _tensor_with(values, n, std, dtype, gen):
    t = torch.randn(n, generator=gen) * std
    k = min(len(values), n)
    t[:k] = torch.tensor(values[:k])
    if n > 2 * len(values):  # the same values again somewhere inside a block
        t[n // 2 : n // 2 + len(values)] = torch.tensor(values)
    return t.to(dtype)


def _random_bits(n, dtype, gen):
    """Uniformly random bit patterns (every exponent: subnormals, huge values, inf, NaN)."""
    bits = BITS[dtype]
    info = torch.iinfo(bits)
    return torch.randint(info.min, info.max, (n,), generator=gen, dtype=torch.int64).to(bits).view(dtype)


def _problem(p_dtype, g_dtype, master, with_v, seed=0, special=True):
    """Lists (params, grads, masters|None, exp_avg_sq|None) over SIZES (+ a random-bits tensor)."""
    gen = torch.Generator().manual_seed(seed)
    params, grads, masters, vs = [], [], [], []
    for n in SIZES:
        if master:
            w = _tensor_with(SPECIAL_WEIGHTS[FP32][:10] + [float("inf"), 1.0] if special else [], n, 0.02, FP32, gen)
            masters.append(w)
            params.append(w.to(p_dtype))
        else:
            params.append(_tensor_with(SPECIAL_WEIGHTS[p_dtype] if special else [], n, 0.02, p_dtype, gen))
        grads.append(_tensor_with(SPECIAL_GRADS if special else [], n, 0.01, g_dtype, gen))
        vs.append(torch.rand(n, generator=gen) * 1e-4)
    if special and not master:
        params.append(_random_bits(2000, p_dtype, gen))
        grads.append(_random_bits(2000, g_dtype, gen) if g_dtype == p_dtype else torch.randn(2000, generator=gen).to(g_dtype))
        vs.append(torch.rand(2000, generator=gen))
    if with_v:
        vs[1] = None  # a tensor without optimizer state uses the plain gradient
    return params, grads, (masters if master else None), (vs if with_v else None)


def _clone(lst):
    return None if lst is None else [None if t is None else t.clone() for t in lst]


def _bits(t):
    return t.view(BITS[t.dtype])


def _assert_bitwise(a_list, b_list, what):
    for i, (a, b) in enumerate(zip(a_list, b_list)):
        assert a.dtype == b.dtype and torch.equal(_bits(a), _bits(b)), f"{what}: tensor {i} differs"


def _direct_stats(before, after, grads, vs, eta, eps=1e-8, bias_correction2=1.0):
    """The statistics recomputed from their definitions, in fp64, from the tensors themselves."""
    numel = changed = nonfinite = 0
    intended = realised = 0.0
    for i, (b, a, g) in enumerate(zip(before, after, grads)):
        v = vs[i] if vs is not None else None
        gd, gf = g.double(), g.float()
        d = gd if v is None else gd / (torch.maximum((v.double() / bias_correction2).sqrt(), gd.abs()) + eps)
        e32 = (gf if v is None else gf / (torch.maximum((v / bias_correction2).sqrt(), gf.abs()) + eps)) * eta
        finite = torch.isfinite(e32)
        moved = _bits(a) != _bits(b)
        numel += b.numel()
        changed += int(moved.sum())
        nonfinite += int((~finite).sum())
        intended += float(((eta * d)[finite] ** 2).sum())
        realised += float(((a.double() - b.double())[moved] ** 2).sum())
    return PerturbStats(numel, changed, intended, realised, nonfinite)


def _assert_stats_close(got, want, what):
    assert got.numel == want.numel and got.changed == want.changed and got.nonfinite == want.nonfinite, (
        f"{what}: {got} vs {want}"
    )
    assert math.isclose(got.intended_sq, want.intended_sq, rel_tol=1e-6), f"{what}: {got} vs {want}"
    assert math.isclose(got.realised_sq, want.realised_sq, rel_tol=1e-9, abs_tol=0.0), f"{what}: {got} vs {want}"


ARRANGEMENTS = {
    "fp32": (FP32, FP32, False),
    "bf16": (BF16, BF16, False),
    "fp16": (FP16, FP16, False),
    "bf16+fp32 grads": (BF16, FP32, False),
    "fp32+master": (FP32, FP32, True),
    "bf16+master": (BF16, BF16, True),
    "fp16+master": (FP16, FP16, True),
    "bf16+master+fp32 grads": (BF16, FP32, True),
}


@pytest.mark.parametrize("eta", (5e-6, 0.5))
@pytest.mark.parametrize("with_v", (False, True), ids=("plain", "exp_avg_sq"))
@pytest.mark.parametrize("arrangement", list(ARRANGEMENTS))
def test_restore_is_bitwise_and_impls_agree(arrangement, with_v, eta):
    p_dtype, g_dtype, master = ARRANGEMENTS[arrangement]
    params, grads, masters, vs = _problem(p_dtype, g_dtype, master, with_v)
    results = {}
    for impl in ("torch", "triton"):
        p, g, m, v = _clone(params), _clone(grads), _clone(masters), _clone(vs)
        perturbation = perturb_(p, g, eta, masters=m, exp_avg_sq=v, impl=impl)
        stats = perturbation.stats
        after_p, after_g = _clone(p), _clone(g)
        perturbation.restore()
        _assert_bitwise(p, params, f"{impl} restore")  # the weights are back, bit for bit
        if master:
            _assert_bitwise(g, grads, f"{impl} grads untouched")
            _assert_bitwise(m, masters, f"{impl} masters untouched")
        else:
            # The grads buffer holds exactly the step where a weight moved, and 0 elsewhere.
            for i, (gi, a, b) in enumerate(zip(after_g, after_p, params)):
                moved = _bits(a) != _bits(b)
                assert torch.equal(gi != 0, moved), f"{impl}: grads[{i}] nonzero exactly where weights moved"
                assert torch.equal(_bits(gi[~moved]), torch.zeros_like(_bits(gi[~moved])))
        _assert_stats_close(stats, _direct_stats(params, after_p, grads, vs, eta), f"{impl} stats")
        results[impl] = (after_p, after_g, stats)
    _assert_bitwise(results["triton"][0], results["torch"][0], "perturbed weights torch vs triton")
    _assert_bitwise(results["triton"][1], results["torch"][1], "grads buffers torch vs triton")
    _assert_stats_close(results["triton"][2], results["torch"][2], "stats torch vs triton")


def test_preconditioning_options_agree():
    # eps and bias_correction2 enter both paths the same way (IEEE sqrt/div on both).
    params, grads, _, vs = _problem(FP32, FP32, False, True, seed=4, special=False)
    out = {}
    for impl in ("torch", "triton"):
        p, g = _clone(params), _clone(grads)
        stats = perturb_(p, g, 1e-3, exp_avg_sq=vs, eps=1e-3, bias_correction2=0.37, impl=impl).stats
        _assert_stats_close(stats, _direct_stats(params, p, grads, vs, 1e-3, 1e-3, 0.37), impl)
        out[impl] = p
    _assert_bitwise(out["triton"], out["torch"], "eps/bias_correction2")


def test_how_much_of_the_perturbation_survives_rounding():
    # Weights ~N(0, .02^2), grads ~N(0, .01^2), eta = 5e-6: eta*g changes 0.06% of the
    # weights in bf16, 0.46% in fp16, 98.9% in fp32; a sign step (d = g/sqrt(g^2)) of size eta
    # changes 7.8% in bf16, 57% in fp16, 100% in fp32. The torch path runs 1M elements.
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(1 << 20, generator=gen) * 0.02
    g = torch.randn(1 << 20, generator=gen) * 0.01
    expect = {FP32: (0.989, 1.0), FP16: (0.0046, 0.57), BF16: (0.0006, 0.078)}
    for dtype, (plain, sign) in expect.items():
        # .clone(): .to(float32) would return w and g themselves, and perturb_ writes into both.
        stats = perturb_([w.to(dtype).clone()], [g.to(dtype).clone()], 5e-6, impl="torch").stats
        assert stats.frac_changed == pytest.approx(plain, rel=0.15), (dtype, stats)
        stats = perturb_([w.to(dtype).clone()], [g.to(dtype).clone()], 5e-6, exp_avg_sq=[g * g], eps=0.0, impl="torch").stats
        assert stats.frac_changed == pytest.approx(sign, rel=0.05), (dtype, stats)
    # With an fp32 master, a compute weight moves by one bf16 spacing with probability
    # ~|e|/spacing: few weights move, each by far more than e, so the norm ratio exceeds 1.
    small = slice(0, 1 << 16)
    stats = perturb_([w[small].to(BF16)], [g[small]], 5e-6, masters=[w[small].clone()], impl="triton").stats
    assert 0 < stats.frac_changed < 0.01 and stats.ratio > 1.0
    # The same numbers on the Triton path, on a smaller tensor.
    stats_t = perturb_([w[small].to(BF16)], [g[small].to(BF16)], 5e-6, impl="triton").stats
    stats_r = perturb_([w[small].to(BF16)], [g[small].to(BF16)], 5e-6, impl="torch").stats
    assert stats_t.changed == stats_r.changed and 0 < stats_t.frac_changed < 0.002
    assert stats_t.ratio < 0.2  # bf16 without a master: most of the step vanished, and it says so


def test_nonfinite_steps_are_skipped_and_counted():
    p = torch.tensor([0.5, 0.5, 0.5, 0.5])
    for impl in ("torch", "triton"):
        params, grads = [p.clone()], [torch.tensor([float("inf"), float("nan"), 1.0, 3e38])]
        stats = perturb_(params, grads, 10.0, impl=impl).stats  # 10 * 3e38 overflows: not finite either
        assert stats.nonfinite == 3 and stats.changed == 1, impl
        assert torch.equal(params[0], torch.tensor([0.5, 0.5, 10.5, 0.5]))
        assert stats.intended_sq == pytest.approx(100.0) and stats.ratio == pytest.approx(1.0)


def test_stats_properties_and_empty():
    assert PerturbStats(0, 0, 0.0, 0.0).frac_changed == 0.0
    assert PerturbStats(10, 5, 0.0, 0.0).ratio == 0.0
    assert PerturbStats(10, 5, 4.0, 1.0).ratio == 0.5 and PerturbStats(10, 5, 4.0, 1.0).frac_changed == 0.5
    assert not PerturbStats().vanished and not PerturbStats(10, 5, 4.0, 1.0).vanished
    assert PerturbStats(10, 0, 4.0, 0.0).vanished and PerturbStats(10, 5, 4.0, 1e-3).vanished  # ratio 0.016
    # rounding-dominated: realised norm over twice the intended (ratio > 2)
    assert PerturbStats(10, 1, 1.0, 4.01).rounding_dominated and not PerturbStats(10, 1, 1.0, 4.0).rounding_dominated
    assert not PerturbStats(10, 1, 0.0, 4.0).rounding_dominated  # nothing intended
    # Stats add up field by field; the host times are carried along but are not part of ==; the
    # largest move is the larger one (None: not measured).
    a, b = PerturbStats(10, 5, 4.0, 1.0, 1, perturb_s=0.5), PerturbStats(6, 1, 1.0, 2.0, 0, restore_s=0.25, max_move=0.5)
    total = a + b
    assert total == PerturbStats(16, 6, 5.0, 3.0, 1) and (total.perturb_s, total.restore_s) == (0.5, 0.25)
    assert total.max_move == 0.5 and (a + a).max_move is None
    assert (b + PerturbStats(max_move=0.75)).max_move == 0.75
    assert sum([a, b], PerturbStats()) == total and a == PerturbStats(10, 5, 4.0, 1.0, 1)
    for impl in ("torch", "triton"):
        assert perturb_([], [], 1e-3, impl=impl).stats == PerturbStats(0, 0, 0.0, 0.0, 0)
        restore_([], [], impl=impl)
        p, g = torch.zeros(0), torch.zeros(0)  # an empty tensor among others is skipped
        stats = perturb_([p, torch.ones(3)], [g, torch.ones(3)], 0.25, impl=impl).stats
        assert stats.numel == 3 and stats.changed == 3


@pytest.mark.parametrize("impl", ("torch", "triton"))
def test_master_mismatch_is_refused(impl):
    w = [torch.randn(50) * 0.02, torch.randn(70) * 0.02]
    params = [t.to(BF16) for t in w]
    params[1][7] = params[1][7] + 1.0  # the compute copy no longer is round(master)
    before = params[1][7].clone()
    with pytest.raises(RuntimeError, match=r"params\[1\] is not the rounding of masters\[1\] at 1 elements"):
        perturb_(params, [torch.randn(50), torch.randn(70)], 1.0, masters=w, impl=impl)
    assert torch.equal(params[1][7], before)  # the mismatched element was left alone
    restore_(params, None, masters=w, impl=impl)  # what the message suggests
    _assert_bitwise(params, [t.to(BF16) for t in w], "re-cast")


@pytest.mark.parametrize("impl", ("torch", "triton"))
def test_nan_master_is_not_a_mismatch(impl):
    # A NaN master and its NaN compute copy agree (NaN payload bits may differ between torch's
    # cast and the kernel's rounding, so only NaN-ness is compared after the restore).
    w = torch.tensor([0.5, float("nan"), -0.25])
    params = [w.to(BF16)]
    stats = perturb_(params, [torch.ones(3)], 0.5, masters=[w], impl=impl).stats
    assert stats.changed == 2 and torch.isnan(params[0][1])
    restore_(params, None, masters=[w], impl=impl)
    assert torch.isnan(params[0][1]) and torch.equal(params[0][[0, 2]], w[[0, 2]].to(BF16))


def test_zero_eta_changes_nothing():
    params, grads, _, _ = _problem(BF16, BF16, False, False, special=False)
    for impl in ("torch", "triton"):
        p, g = _clone(params), _clone(grads)
        stats = perturb_(p, g, 0.0, impl=impl).stats
        assert stats.changed == 0 and stats.intended_sq == 0.0 and stats.ratio == 0.0
        _assert_bitwise(p, params, impl)
        assert all((gi == 0).all() for gi in g)


def _bad_calls():
    p = [torch.zeros(4), torch.zeros(3)]
    g = [torch.zeros(4), torch.zeros(3)]
    ok_m = [torch.zeros(4), torch.zeros(3)]
    return {
        "grads length": (lambda impl: perturb_(p, g[:1], 1e-3, impl=impl), ValueError, "grads has 1 entries"),
        "shape": (lambda impl: perturb_(p, [torch.zeros(4), torch.zeros(4)], 1e-3, impl=impl), ValueError, r"grads\[1\] has shape"),
        "device": (lambda impl: perturb_(p, [torch.zeros(4), torch.zeros(3, device="meta")], 1e-3, impl="torch"), ValueError, "meta"),
        "param dtype": (lambda impl: perturb_([torch.zeros(4, dtype=torch.float64)], [torch.zeros(4)], 1e-3, impl=impl), ValueError, "dtype"),
        "grad dtype": (lambda impl: perturb_([torch.zeros(4)], [torch.zeros(4, dtype=torch.int32)], 1e-3, impl=impl), ValueError, "dtype"),
        "master dtype": (lambda impl: perturb_([torch.zeros(4, dtype=BF16)], [torch.zeros(4)], 1e-3, masters=[torch.zeros(4, dtype=BF16)], impl=impl), ValueError, r"masters\[0\] has dtype"),
        "masters length": (lambda impl: perturb_(p, g, 1e-3, masters=ok_m[:1], impl=impl), ValueError, "masters has 1"),
        "v dtype": (lambda impl: perturb_(p, g, 1e-3, exp_avg_sq=[torch.zeros(4, dtype=BF16), None], impl=impl), ValueError, "exp_avg_sq"),
        "v length": (lambda impl: perturb_(p, g, 1e-3, exp_avg_sq=[None], impl=impl), ValueError, "exp_avg_sq has 1"),
        "param strided": (lambda impl: perturb_([torch.zeros(4, 2)[:, 0]], [torch.zeros(4)], 1e-3, impl=impl), ValueError, "not contiguous"),
        "grad strided": (lambda impl: perturb_([torch.zeros(4)], [torch.zeros(8)[::2]], 1e-3, impl=impl), ValueError, "not contiguous"),
        "master strided": (lambda impl: perturb_([torch.zeros(4, dtype=BF16)], [torch.zeros(4)], 1e-3, masters=[torch.zeros(8)[::2]], impl=impl), ValueError, "not contiguous"),
        "eta nan": (lambda impl: perturb_(p, g, float("nan"), impl=impl), ValueError, "eta must be finite"),
        "eta inf": (lambda impl: perturb_(p, g, float("inf"), impl=impl), ValueError, "eta must be finite"),
        "eta tensor": (lambda impl: perturb_(p, g, torch.tensor(1.0), impl=impl), TypeError, "eta must be a float"),
        "eps negative": (lambda impl: perturb_(p, g, 1e-3, eps=-1.0, impl=impl), ValueError, "eps"),
        "bias correction": (lambda impl: perturb_(p, g, 1e-3, bias_correction2=0.0, impl=impl), ValueError, "bias_correction2"),
        "params twice": (lambda impl: perturb_([p[0], p[0]], [g[0], g[1]], 1e-3, impl=impl), ValueError, "shares memory"),
        "grad is param": (lambda impl: perturb_(p, p, 1e-3, impl=impl), ValueError, "same memory"),
        "params not a list": (lambda impl: perturb_(p[0], g[0], 1e-3, impl=impl), TypeError, "list"),
        "restore without deltas": (lambda impl: restore_(p, None, impl=impl), ValueError, "deltas"),
        "restore deltas length": (lambda impl: restore_(p, g[:1], impl=impl), ValueError, "deltas has 1"),
        "restore master shape": (lambda impl: restore_(p, None, masters=[torch.zeros(4), torch.zeros(4)], impl=impl), ValueError, "shape"),
        "impl": (lambda impl: perturb_(p, g, 1e-3, impl="cuda"), ValueError, "impl must be one of"),
    }


BAD = _bad_calls()


@pytest.mark.parametrize("impl", ("torch", "triton"))
@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs(case, impl):
    call, error, match = BAD[case]
    with pytest.raises(error, match=match):
        call(impl)


def test_launchers_check_inputs_themselves():
    with pytest.raises(ValueError, match="grads has 0 entries"):
        perturb_triton_([torch.zeros(2)], [], 1e-3)
    with pytest.raises(ValueError, match="deltas"):
        restore_triton_([torch.zeros(2)], None)
    with pytest.raises(ValueError, match="grads has 0 entries"):
        perturb_torch_([torch.zeros(2)], [], 1e-3)
    with pytest.raises(ValueError, match="deltas"):
        restore_torch_([torch.zeros(2)], None)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
def test_compiles_for_gpu(arch):
    """Every variant compiles to a cubin for an A100 (sm_80) and an H100 (sm_90); the PTX holds what the
    kernel promises (printed per variant: pytest -s)."""
    sig = {"P_ADDR_ptr": "*i64", "G_ADDR_ptr": "*i64", "M_ADDR_ptr": "*i64", "V_ADDR_ptr": "*i64",
           "NUMEL_ptr": "*i64", "CHUNK_TENSOR_ptr": "*i32", "CHUNK_START_ptr": "*i64", "STATS_ptr": "*fp64",
           "num_chunks": "i32", "eta": "fp32", "eps": "fp32", "bias_correction2": "fp32",
           "P_KIND": "constexpr", "G_KIND": "constexpr", "HAS_MASTER": "constexpr", "HAS_V": "constexpr",
           "BLOCK_SIZE": "constexpr", "BLOCKS_PER_PROGRAM": "constexpr"}
    rsig = {"P_ADDR_ptr": "*i64", "Z_ADDR_ptr": "*i64", "M_ADDR_ptr": "*i64", "NUMEL_ptr": "*i64",
            "CHUNK_TENSOR_ptr": "*i64", "CHUNK_START_ptr": "*i64", "first_chunk": "i32", "P_KIND": "constexpr",
            "Z_KIND": "constexpr", "HAS_MASTER": "constexpr", "BLOCK_SIZE": "constexpr", "BLOCKS_PER_PROGRAM": "constexpr"}
    common = {"BLOCK_SIZE": 1024, "BLOCKS_PER_PROGRAM": 8}
    specs = []
    for kind in (0, 1, 2):
        for master in (False, True):
            for has_v in (False, True):
                specs.append({"module": "metarm_fast.kernels.perturb_triton", "kernel": "_perturb_kernel", "signature": sig,
                              "constexprs": {"P_KIND": kind, "G_KIND": kind, "HAS_MASTER": master, "HAS_V": has_v, **common},
                              "options": {"enable_fp_fusion": False}})
            specs.append({"module": "metarm_fast.kernels.perturb_triton", "kernel": "_restore_kernel", "signature": rsig,
                          "constexprs": {"P_KIND": kind, "Z_KIND": kind, "HAS_MASTER": master, **common},
                          "options": {"enable_fp_fusion": False}})
    for spec, result in zip(specs, compile_for(specs, arch)):
        assert result["cubin_bytes"] > 0 and atomics(result) == 0, result
        # Bitwise agreement with the torch path needs unfused multiply-adds and IEEE sqrt/div.
        assert result["count"]["fma.rn.f32"] == 0 and result["count"]["fma.rn.f64"] == 0, result
        if spec["constexprs"].get("HAS_V"):
            assert result["count"]["sqrt.rn.f32"] > 0 and result["count"]["div.rn.f32"] > 0, result


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_row_sparse_gradient_takes_the_sparse_path_and_agrees_bitwise(dtype):
    """An embedding-like gradient (few non-zero rows, large tensor): the torch path only touches those
    rows; it must give the Triton kernel's bits, stats and stored steps, and restore exactly."""
    from metarm_fast.kernels import perturb_torch as mod

    g0 = torch.Generator().manual_seed(7)
    rows, cols = 1400, 64  # 89,600 elements, rows >= 4x columns: an embedding's shape
    assert rows * cols >= mod._SPARSE_MIN_NUMEL
    w = (torch.randn(rows, cols, generator=g0) * 0.02).to(dtype)
    w[0, :5] = -0.0
    g = torch.zeros(rows, cols)
    hot = torch.randperm(rows, generator=g0)[:40]
    g[hot] = torch.randn(40, cols, generator=g0) * 0.01
    g[1, :3] = -0.0  # a zero row holding -0.0: its stored step must become +0, as on the dense path
    g[2, 7] = float("nan")  # a row whose only non-zero is NaN: counted as non-finite on both paths
    g = g.to(dtype)
    assert mod._sparse_rows(g) is not None
    results = {}
    for impl in ("torch", "triton"):
        p, gg = w.clone(), g.clone()
        stats = perturb_([p], [gg], 1e-3, impl=impl).stats
        results[impl] = (p.clone(), gg.clone(), stats)
        restore_([p], [gg], impl=impl)
        assert torch.equal(_bits(p), _bits(w))
    (pt, gt, st), (pk, gk, sk) = results["torch"], results["triton"]
    assert torch.equal(_bits(pt), _bits(pk)) and torch.equal(_bits(gt), _bits(gk))
    assert st.changed == sk.changed > 0 and st.numel == sk.numel == rows * cols
    assert st.nonfinite == sk.nonfinite == 1
    assert math.isclose(st.intended_sq, sk.intended_sq, rel_tol=1e-9)
    assert math.isclose(st.realised_sq, sk.realised_sq, rel_tol=1e-9)


@pytest.mark.parametrize("how", ("restore_", "found", "handed over"))
@pytest.mark.parametrize("dtype", (FP32, BF16))
def test_restore_is_bitwise_with_subnormals_flushed(dtype, how):
    """torch.set_flush_denormal(True) makes the CPU read subnormal inputs as zero, so p - 0 is no
    longer p for a subnormal weight: the torch path must notice and restore those untouched."""
    gen = torch.Generator().manual_seed(3)
    # Small finite weights and subnormals: a NaN, or a sum overflowing to inf - inf, would send the
    # restore down its masked form whatever the CPU mode.
    tiny = torch.finfo(dtype).tiny
    w = _tensor_with([0.0, -0.0, tiny / 2, -tiny / 4, tiny / 64, 1.0], 5000, 0.02, dtype, gen)
    subnormal = (w != 0) & (w.float().abs() < torch.finfo(dtype).tiny)
    assert int(subnormal.sum()) > 0
    g = (torch.randn(5000, generator=gen) * 0.01).to(dtype)
    # and an embedding-shaped tensor whose few hot rows hold subnormal weights (the row-sparse path)
    emb = (torch.randn(1400, 64, generator=gen) * 0.02).to(dtype)
    emb[[3, 900], :10] = tiny / 8
    emb_g = torch.zeros(1400, 64, dtype=dtype)
    emb_g[[3, 900, 1000]] = (torch.randn(3, 64, generator=gen) * 0.01).to(dtype)
    weights, steps = [w, emb], [g, emb_g]
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormals")
    try:
        p, gg = _clone(weights), _clone(steps)
        perturbation = perturb_(p, gg, 1e-3, impl="torch")
        assert not any(torch.equal(_bits(a), _bits(b)) for a, b in zip(p, weights))
        if how == "restore_":
            restore_(p, gg, impl="torch")
        else:
            plan = TorchRestorePlan(p, gg) if how == "found" else perturbation.restore_plan()
            plan.restore(1)
            plan.restore(0)
    finally:
        torch.set_flush_denormal(False)
    _assert_bitwise(p, weights, f"{how} with subnormals flushed")


@pytest.mark.parametrize("handed_over", (False, True), ids=("found", "handed over"))
@pytest.mark.parametrize("impl", ("torch", "triton"))
@pytest.mark.parametrize("arrangement", [a for a, (_, _, master) in ARRANGEMENTS.items() if not master])
def test_restore_plan_gives_back_each_tensor_bitwise(arrangement, impl, handed_over):
    """A RestorePlan, what the backward hooks use (one tensor at a time, the per-call work done once):
    the weights come back bit for bit over the special values, NaN weights (which must not take the
    single-subtraction form), and a row-sparse tensor with a NaN weight in a hot row, restored in
    the order a backward pass reaches them (last first). The plan of the path that perturbed, handed
    over by the perturbation (on the torch path with the rows and finiteness it found while
    perturbing), or built from the tensors alone (which finds them itself)."""
    p_dtype, g_dtype, _ = ARRANGEMENTS[arrangement]
    params, grads, _, _ = _problem(p_dtype, g_dtype, False, False)
    gen = torch.Generator().manual_seed(11)
    emb = (torch.randn(1400, 64, generator=gen) * 0.02).to(p_dtype)
    emb[5, 3] = float("nan")
    emb_g = torch.zeros(1400, 64)
    emb_g[torch.tensor([5, 90, 700])] = torch.randn(3, 64, generator=gen) * 0.01
    params.append(emb)
    grads.append(emb_g.to(g_dtype))
    p, g = _clone(params), _clone(grads)
    perturbation = perturb_(p, g, 0.5, impl=impl)
    moved = [not torch.equal(_bits(a), _bits(b)) for a, b in zip(p, params)]
    assert all(moved[2:]), moved  # the 1- and 3-element tensors hold only values no step can move
    plan_type = TorchRestorePlan if impl == "torch" else TritonRestorePlan
    plan = perturbation.restore_plan() if handed_over else plan_type(p, g)
    assert type(plan) is plan_type
    if impl == "torch":  # both forms are exercised: finite dense tensors subtract, the others mask
        assert True in plan._plain and False in plan._plain and plan._rows[-1] is not None
    for i in reversed(range(len(p))):
        plan.restore(i)
    _assert_bitwise(p, params, f"{impl} RestorePlan")


def test_restore_plan_checks_its_inputs():
    for plan_type in (TorchRestorePlan, TritonRestorePlan):
        with pytest.raises(ValueError, match="deltas has 1"):
            plan_type([torch.zeros(3), torch.zeros(4)], [torch.zeros(3)])
    with pytest.raises(ValueError, match="a layout of 1 entries for 2 params"):
        TorchRestorePlan([torch.zeros(3), torch.zeros(4)], [torch.zeros(3), torch.zeros(4)], layout=[(None, True)])


@pytest.mark.parametrize("master", (False, True), ids=("no master", "master"))
def test_triton_restore_plan_does_its_per_call_work_once(master, monkeypatch):
    """What each backward hook runs on Triton, restore(i), checks nothing and builds no table: the
    checks and the tables (one host-to-device copy for all of them) are the plan's, made once. Here
    every helper that checks or builds is counted, and must not run again after the plan is built.
    Two dtype groups, an empty tensor and a tensor over several chunks; the result is bitwise."""
    gen = torch.Generator().manual_seed(23)
    sizes = (5, 0, 2 * CHUNK + 3, 700)
    dtypes = (BF16, FP32, BF16, FP32)
    w = [torch.randn(n, generator=gen) * 0.02 for n in sizes]
    params = [t.to(dt) for t, dt in zip(w, dtypes)]
    grads = [(torch.randn(n, generator=gen) * 0.01).to(dt) for n, dt in zip(sizes, dtypes)]
    p, g = _clone(params), _clone(grads)
    perturbation = perturb_(p, g, 0.1, masters=_clone(w) if master else None, impl="triton")
    assert all(not torch.equal(_bits(a), _bits(b)) for a, b in zip(p, params) if a.numel())
    calls = []
    for module, name in ((perturbation_module, "_check_restore_args"), (triton_path, "_addresses"),
                         (triton_path, "_chunk_tables"), (triton_path, "_groups")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    plan = perturbation.restore_plan()
    built = len(calls)
    assert set(calls) == {"_check_restore_args", "_addresses", "_chunk_tables", "_groups"}
    tables = [t for group in plan._groups for t in group[0]]
    assert len(plan._groups) == 2 and len({t.untyped_storage().data_ptr() for t in tables}) == 1  # one copy
    assert all(t.data_ptr() % 16 == 0 for t in tables)  # one specialisation of the kernel's pointers
    for i in reversed(range(len(p))):
        plan.restore(i)
    assert len(calls) == built, calls[built:]
    _assert_bitwise(p, params, "triton plan")


@pytest.mark.parametrize("impl", ("torch", "triton"))
def test_perturbations_concatenate(impl):
    """Perturbation.concat, what the meta step does when it perturbs one tensor at a time: the stats
    are those of one call over all the tensors, and the joined plan restores every tensor bitwise."""
    params, grads, _, vs = _problem(BF16, BF16, False, True, special=False)
    p, g = _clone(params), _clone(grads)
    whole = perturb_(p, g, 0.5, exp_avg_sq=vs, impl=impl).stats
    p, g = _clone(params), _clone(grads)
    parts = [perturb_([p[i]], [g[i]], 0.5, exp_avg_sq=[vs[i]], impl=impl) for i in range(len(p))]
    joined = Perturbation.concat(parts)
    assert (joined.stats.numel, joined.stats.changed, joined.stats.nonfinite) == (whole.numel, whole.changed, whole.nonfinite)
    assert math.isclose(joined.stats.realised_sq, whole.realised_sq, rel_tol=1e-12)
    assert math.isclose(joined.stats.intended_sq, whole.intended_sq, rel_tol=1e-12)
    plan = joined.restore_plan()
    for i in reversed(range(len(p))):
        plan.restore(i)
    _assert_bitwise(p, params, f"{impl} concatenated plan")
    with pytest.raises(ValueError, match="one path and one case"):
        Perturbation.concat([parts[0], perturb_([torch.ones(2)], [torch.ones(2)], 0.5, impl="torch" if impl == "triton" else "triton")])


def test_fp32_moved_weights_move_by_exactly_the_stored_step():
    """The claim behind the fp32 fast path of _perturb_block_ (realised_sq = sum of the stored steps
    squared): wherever the mask keeps a step, new - p == z exactly, because z = round(s - p) with
    s = round(p + e). Checked on random bit patterns and on steps close to the weights' own size."""
    gen = torch.Generator().manual_seed(5)
    n = 1 << 19
    bits_p, bits_e = _random_bits(n, FP32, gen), _random_bits(n, FP32, gen)
    small = torch.randn(n, generator=gen) * 0.02
    scale = 10 ** (torch.rand(n, generator=gen) * 12 - 10)  # |e| / |p| from 1e-10 to 100
    sign = (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).float()
    p = torch.cat([bits_p, small, bits_p])
    e = torch.cat([bits_e, small * scale * sign, bits_p * (torch.rand(n, generator=gen) * 6 - 3)])
    keep = torch.isfinite(p) & torch.isfinite(e)
    p, e = p[keep], e[keep]

    def moved(p, z):
        new = p + z
        back = new - z
        ok = (_bits(back) == _bits(p)) & (_bits(new) != _bits(p))
        return ok, (new.double() - p.double())

    z = (p + e) - p
    ok, delta = moved(p, z)
    assert int(ok.sum()) > n  # most weights of the second and third families move
    assert torch.equal(delta[ok], z.double()[ok])
    # Not true of any z: one that no s = round(p + e) gives (p = 1.5, z = 0.75 + 2^-24) passes the
    # mask but moves p by 0.75. So the check above can fail.
    ok, delta = moved(torch.tensor([1.5]), torch.tensor([0.75 + 2**-24]))
    assert bool(ok[0]) and float(delta[0]) == 0.75


# ----------------------------------------------------------------------------------------------
# Both paths against the oracle (perturb_oracle_ / restore_oracle_: the rule with no fast path)
# ----------------------------------------------------------------------------------------------
# The stats' sums may differ from the oracle's correctly rounded math.fsum only by the order the
# paths add the fp64 squares in. Measured over every test below: realised_sq and intended_sq equal
# the oracle's or differ by at most 4.4e-16 relative (torch path: intended 2.2e-16, realised
# 4.4e-16; Triton path: 2.2e-16 both), a few fp64 ulps, far inside STATS_RTOL.
STATS_RTOL = 1e-12
ORACLE_GRADS = SPECIAL_GRADS + [3.3e38, -3.3e38, 65504.0, -65504.0, -1e-45, 6e-8]  # + near overflow
ORACLE_V = [0.0, 0.0, 1e-45, 1e-38, 3e38, float("inf"), 1.0]  # v = 0: the |g| floor decides


def _oracle_problem(p_dtype, g_dtype, master, with_v, seed=0):
    """(params, grads, masters|None, exp_avg_sq|None) at odd sizes: 1 element, 4097 (four blocks and
    one element) with every special value, (3, 47) with special values but (case A) finite weights
    only (so an fp32 tensor takes the torch path's in-place shortcut), an empty tensor, and (case A)
    2000 random bit patterns. Case B masters hold no NaN: a NaN master restores to a NaN whose payload the paths may
    choose differently (perturb_spec's Limits); test_nan_master_is_not_a_mismatch covers it."""
    gen = torch.Generator().manual_seed(seed)
    finite = [x for x in SPECIAL_WEIGHTS[p_dtype] if math.isfinite(x) and abs(x) < 1e31]
    layout = [((1,), []), ((4097,), SPECIAL_WEIGHTS[p_dtype]), ((3, 47), finite), ((0,), [])]
    params, grads, masters, vs = [], [], [], []
    for shape, values in layout:
        n = math.prod(shape)
        if master:
            w = _tensor_with([x for x in SPECIAL_WEIGHTS[FP32] if not math.isnan(x)] if values else [], n, 0.02, FP32, gen)
            masters.append(w.view(shape))
            params.append(w.to(p_dtype).view(shape))
        else:
            params.append(_tensor_with(values, n, 0.02, p_dtype, gen).view(shape))
        grads.append(_tensor_with(ORACLE_GRADS if values else [], n, 0.01, g_dtype, gen).view(shape))
        v = torch.rand(n, generator=gen) * 1e-4
        if values:
            v[: len(ORACLE_V)] = torch.tensor(ORACLE_V)
        vs.append(v.view(shape))
    if not master:
        params.append(_random_bits(2000, p_dtype, gen))
        grads.append(_random_bits(2000, g_dtype, gen) if g_dtype == p_dtype else torch.randn(2000, generator=gen).to(g_dtype))
        vs.append(torch.rand(2000, generator=gen))
    vs[0] = None  # a tensor without optimizer state uses the plain gradient
    return params, grads, (masters if master else None), (vs if with_v else None)


def _perturb_and_restore(perturb, restore, problem, eta, **kwargs):
    """Run one path on copies: (params after perturb, grads after perturb, stats, params after restore)."""
    params, grads, masters, vs = problem
    p, g, m = _clone(params), _clone(grads), _clone(masters)
    stats = perturb(p, g, eta, masters=m, exp_avg_sq=_clone(vs), **kwargs)
    after_p, after_g = _clone(p), _clone(g)
    restore(p, None if masters is not None else g, masters=m)
    return after_p, after_g, stats, p


def _assert_stats_match_oracle(got, want, what):
    assert (got.numel, got.changed, got.nonfinite) == (want.numel, want.changed, want.nonfinite), f"{what}: {got} vs {want}"
    for name in ("intended_sq", "realised_sq"):
        a, b = getattr(got, name), getattr(want, name)
        assert a == b or math.isclose(a, b, rel_tol=STATS_RTOL, abs_tol=0.0), f"{what} {name}: {a!r} vs oracle {b!r}"


def _assert_paths_match_oracle(problem, eta, **kwargs):
    params, grads, masters, _ = problem
    want_p, want_g, want_stats, want_back = _perturb_and_restore(perturb_oracle_, restore_oracle_, problem, eta, **kwargs)
    # The oracle itself keeps the spec's promise: the restore gives the weights back bit for bit.
    _assert_bitwise(want_back, params, "oracle restore")
    if masters is not None:
        _assert_bitwise(want_g, grads, "oracle: case B leaves the grads alone")
    for impl in ("torch", "triton"):
        p, g, m = _clone(params), _clone(grads), _clone(masters)
        perturbation = perturb_(p, g, eta, masters=m, exp_avg_sq=_clone(problem[3]), impl=impl, **kwargs)
        _assert_bitwise(p, want_p, f"{impl} params after perturb vs oracle")
        _assert_bitwise(g, want_g, f"{impl} grads after perturb vs oracle")
        _assert_stats_match_oracle(perturbation.stats, want_stats, f"{impl} stats vs oracle")
        # restore_, on a copy of the perturbed state
        got_back, got_g = _clone(p), _clone(g)
        restore_(got_back, None if masters is not None else got_g, masters=m, impl=impl)
        _assert_bitwise(got_back, want_back, f"{impl} params after restore_ vs oracle")
        # The perturbation's own plan, what the backward hooks run, tensor by tensor in backward order.
        plan = perturbation.restore_plan()
        for i in reversed(range(len(p))):
            plan.restore(i)
        _assert_bitwise(p, want_back, f"{impl} RestorePlan vs oracle")
    return want_stats


@pytest.mark.parametrize(
    "eta, options",
    [(5e-6, {}), (0.5, {}), (1e-3, {"eps": 1e-3, "bias_correction2": 0.37})],
    ids=("eta5e-6", "eta0.5", "eta1e-3+eps+bc2"),
)
@pytest.mark.parametrize("with_v", (False, True), ids=("plain", "exp_avg_sq"))
@pytest.mark.parametrize("arrangement", list(ARRANGEMENTS))
def test_both_paths_match_the_oracle_bitwise(arrangement, with_v, eta, options):
    p_dtype, g_dtype, master = ARRANGEMENTS[arrangement]
    problem = _oracle_problem(p_dtype, g_dtype, master, with_v)
    stats = _assert_paths_match_oracle(problem, eta, **options)
    assert stats.changed > 0 and stats.nonfinite > 0, stats  # neither vacuous nor free of specials


@pytest.mark.parametrize("with_v", (False, True), ids=("plain", "exp_avg_sq"))
@pytest.mark.parametrize("arrangement", ["fp32", "bf16", "bf16+fp32 grads"])
def test_row_sparse_gradient_matches_the_oracle_bitwise(arrangement, with_v):
    """The torch path's row-sparse form (an embedding-shaped gradient with few non-zero rows), which
    the oracle does not have, against the oracle; with -0.0 and NaN in otherwise zero rows."""
    from metarm_fast.kernels import perturb_torch

    p_dtype, g_dtype, _ = ARRANGEMENTS[arrangement]
    gen = torch.Generator().manual_seed(13)
    w = (torch.randn(1400, 64, generator=gen) * 0.02).to(p_dtype)
    w[0, :5] = -0.0
    w[900, :4] = torch.tensor([float("nan"), float("inf"), 1e-40, -3e38]).to(p_dtype)
    g = torch.zeros(1400, 64)
    g[torch.tensor([0, 5, 90, 700, 900])] = torch.randn(5, 64, generator=gen) * 0.01
    g[1, :3] = -0.0
    g[2, 7] = float("nan")
    g = g.to(g_dtype)
    assert perturb_torch._sparse_rows(g) is not None  # the torch path does take the row-sparse form
    v = [torch.rand(1400, 64, generator=gen) * 1e-4] if with_v else None
    stats = _assert_paths_match_oracle(([w], [g], None, v), 0.5)
    assert stats.changed > 0 and stats.nonfinite == 1, stats


def test_master_mismatch_matches_the_oracle():
    """Case B with a compute copy that is not round(master): every path refuses the same way, after
    perturbing the same other elements."""
    gen = torch.Generator().manual_seed(17)
    w = [torch.randn(50, generator=gen) * 0.02, torch.randn(4097, generator=gen) * 0.02]
    params = [t.to(BF16) for t in w]
    params[1][7] += 1.0
    grads = [torch.randn(50, generator=gen), torch.randn(4097, generator=gen)]
    after = {}
    for name, perturb in (("oracle", perturb_oracle_), ("torch", perturb_torch_), ("triton", perturb_triton_)):
        p = _clone(params)
        with pytest.raises(RuntimeError, match=r"params\[1\] is not the rounding of masters\[1\] at 1 elements"):
            perturb(p, _clone(grads), 0.5, masters=_clone(w))
        after[name] = p
    assert not torch.equal(_bits(after["oracle"][1]), _bits(params[1]))  # the others were perturbed
    _assert_bitwise(after["torch"], after["oracle"], "torch vs oracle after a refused call")
    _assert_bitwise(after["triton"], after["oracle"], "triton vs oracle after a refused call")


@pytest.mark.parametrize("with_v", (False, True), ids=("plain", "exp_avg_sq"))
@pytest.mark.parametrize("arrangement", list(ARRANGEMENTS))
def test_stats_match_the_oracle_tensor_by_tensor(arrangement, with_v):
    """The same problems one tensor per call: in the whole problem the near-overflow steps dominate
    the sums, so an error in the ordinary elements' squares could hide below STATS_RTOL there."""
    p_dtype, g_dtype, master = ARRANGEMENTS[arrangement]
    params, grads, masters, vs = _oracle_problem(p_dtype, g_dtype, master, with_v, seed=1)
    for i in range(len(params)):
        if params[i].numel() == 0:
            continue  # alone, see test_triton_path_given_only_empty_tensors; beside others it is covered above
        one = ([params[i]], [grads[i]], None if masters is None else [masters[i]], None if vs is None else [vs[i]])
        _assert_paths_match_oracle(one, 0.5)


def test_triton_path_given_only_empty_tensors():
    assert perturb_([torch.zeros(0)], [torch.zeros(0)], 0.5, impl="triton").stats == perturb_oracle_([torch.zeros(0)], [torch.zeros(0)], 0.5)
