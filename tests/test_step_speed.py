"""The step's speed changes against the plain paths: the row-sparse embedding gradient and fused AdamW."""
from __future__ import annotations

import torch

from metarm_fast.model import build_tiny_llama, sparse_embedding_grad_
from metarm_fast.build import adamw_impl
from metarm_fast.trainer import RewardTrainer
from tests.helpers import l_grads, meta_grads, tiny_config

# Measured (torch 2.13 CPU, tiny Llama hidden 32, synthetic pairs): the sparse embedding gradient equals the
# dense one bit for bit on this machine (max relative difference 0, printed below with -s), in the vanilla
# and the MetaRM step; bound 1e-6 in case another CPU sums a token's duplicate rows in another order.
EMB_TOL = 1e-6
# fused vs single-tensor AdamW after 3 steps: max |difference| / max |weight| measured 5.9e-8 (printed
# below, -s): the fused kernel rounds the same update in another order. Bound: 10x that.
ADAM_TOL = 6e-7


def _pair(tmp_path, **kw):
    out = []
    for sparse in (False, True):
        torch.manual_seed(0)
        tr = RewardTrainer(tiny_config(tmp_path / f"s{int(sparse)}", method="metarm", **kw), log=lambda *a, **k: None)
        out.append(tr)
    dense, sparse = out
    dense.rm.hf.get_input_embeddings().sparse = False  # the plain path
    assert sparse.rm.hf.get_input_embeddings().sparse
    sparse.rm.hf.load_state_dict(dense.rm.hf.state_dict())
    return dense, sparse


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def test_sparse_embedding_gradient_matches_dense(tmp_path):
    for packing in ("none", "share-prompt"):
        dense, sparse = _pair(tmp_path / packing, packing=packing)
        micro, groups = dense.step_inputs(0)
        for fn in (lambda tr: l_grads(tr, micro), lambda tr: meta_grads(tr, micro, groups)):
            fn(dense)
            fn(sparse)
            emb = [i for i, p in enumerate(dense.weights.params) if p.shape == dense.rm.hf.get_input_embeddings().weight.shape][0]
            assert not sparse.weights.params[emb].grad.is_sparse  # the .grad buffer the meta step and optimizer see
            err = max(_rel(s.grad, d.grad) for s, d in zip(sparse.weights.params, dense.weights.params) if d.grad.abs().max() > 0)
            print(f"sparse vs dense embedding gradient [{packing}]: max relative difference {err:.3g}")
            assert err <= EMB_TOL


def test_sparse_embedding_not_applied_to_tied_weights():
    m = build_tiny_llama(32, 0)
    head = torch.nn.Linear(m.config.hidden_size, 32, bias=False)
    head.weight = m.get_input_embeddings().weight
    m.add_module("tied_head", head)
    assert not sparse_embedding_grad_(m)
    assert sparse_embedding_grad_(build_tiny_llama(32, 0))


def test_fused_adamw_matches_single_tensor(tmp_path):
    assert adamw_impl(False) == {"fused": True} and adamw_impl(True) == {"foreach": False}
    torch.manual_seed(0)
    w = [torch.randn(64, 32), torch.randn(32)]
    grads = [[torch.randn_like(x) for x in w] for _ in range(3)]
    results = []
    for kw in ({"fused": True}, {"foreach": False}):
        ps = [x.clone().requires_grad_(True) for x in w]
        opt = torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01, **kw)
        for g in grads:
            for p, gi in zip(ps, g):
                p.grad = gi.clone()
            opt.step()
        results.append([p.detach() for p in ps])
    err = max(_rel(a, b) for a, b in zip(*results))
    print(f"fused vs single-tensor AdamW after 3 steps: max relative difference {err:.3g}")
    assert err <= ADAM_TOL
