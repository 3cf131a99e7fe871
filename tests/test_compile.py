"""--compile: the compiled model's rewards and MetaRM gradients against the plain model's.

Cost: this file took 22 s of CPU (user time, 1 thread, cold inductor cache; a few seconds warm),
nearly all of it inductor compiling one tiny model's norm and MLP modules (it needs a C++
compiler); one compiled trainer serves all its checks.
"""
from __future__ import annotations

import shutil

import pytest
import torch

from metarm_fast.trainer import RewardTrainer
from tests.helpers import assert_bitwise_equal, meta_grads, snapshot, tiny_config

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None,
                                reason="inductor on the CPU needs a C++ compiler")

# Measured (torch 2.13 CPU, inductor, tiny Llama hidden 32, 2 layers, fp32, share-prompt): rewards differ
# from the eager model's by at most 3.0e-7 (relative to the largest |reward|), the MetaRM gradients by at
# most 1.5e-6 of their largest |element| (printed by the tests below, run with -s): the fused norm sums in
# another order. Bounds: 10x those.
REWARD_TOL = 3e-6
GRAD_TOL = 1.5e-5


@pytest.fixture(scope="module")
def trainers(tmp_path_factory):
    out = {}
    for compiled in (False, True):
        cfg = tiny_config(tmp_path_factory.mktemp(f"c{int(compiled)}"), method="metarm", packing="share-prompt",
                          compile=compiled, tiny_layers=2)
        torch.manual_seed(0)
        out[compiled] = RewardTrainer(cfg, log=lambda *a, **k: None)
    out[True].rm.hf.load_state_dict(out[False].rm.hf.state_dict())
    return out[False], out[True]


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def test_compiled_rewards_match_plain(trainers):
    plain, comp = trainers
    worst = 0.0
    with torch.no_grad():
        for s in range(3):  # batches of other lengths: the dynamic-shape graph is reused
            micro, groups = plain.step_inputs(s)
            for batch in (plain.batcher.pairs(micro[0]), plain.batcher.groups(groups)):
                worst = max(worst, _rel(comp.model(batch), plain.model(batch)))
    print(f"compiled vs plain rewards: max relative difference {worst:.3g}")
    assert worst <= REWARD_TOL
    assert worst > 0  # the compiled code really ran: its fused norm rounds differently from eager's


def test_compiled_meta_step_gradients_match_and_restore_is_bitwise(trainers):
    plain, comp = trainers
    micro, groups = plain.step_inputs(0)
    before = snapshot(comp.weights.params)
    meta_grads(plain, micro, groups)
    meta_grads(comp, micro, groups)
    assert_bitwise_equal(before, snapshot(comp.weights.params))  # theta back, bit for bit, through compiled code
    worst = max(_rel(c.grad, p.grad) for c, p in zip(comp.weights.params, plain.weights.params) if p.grad.abs().max() > 0)
    print(f"compiled vs plain MetaRM gradients: max relative difference {worst:.3g}")
    assert worst <= GRAD_TOL
    # the compiled modules saw theta' (the perturbation changed the gradient): eta = 0 gives another one
    g_meta = [c.grad.clone() for c in comp.weights.params]
    comp.meta.eta = 0.0
    try:
        meta_grads(comp, micro, groups)
    finally:
        comp.meta.eta = comp.cfg.eta
    assert any(not torch.equal(a, c.grad) for a, c in zip(g_meta, comp.weights.params))
    comp.weights.zero_grads()


def test_compile_refuses_a_model_without_norm_or_mlp():
    from metarm_fast.compile import compile_blocks_

    with pytest.raises(ValueError, match="no RMSNorm or MLP"):
        compile_blocks_(torch.nn.Sequential(torch.nn.Linear(2, 2)))
