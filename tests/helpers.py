"""Small builders shared by the trainer tests (tests import this; nothing else does)."""
from __future__ import annotations

import torch

from metarm_fast.config import TrainConfig


def tiny_config(tmp_path, **overrides) -> TrainConfig:
    """A seconds-long run of the embedded default: tiny Llama, synthetic data."""
    base = dict(
        output_dir=str(tmp_path / "run"),
        max_records=64,
        max_steps=3,
        batch_size=4,
        meta_batch_size=3,
        meta_k=3,
        max_length=48,
        tiny_hidden=32,
        progress=False,
        warmup_ratio=0.0,
        lr=1e-3,
        overwrite=True,  # tests that check the output folder's rules pass overwrite=False
    )
    base.update(overrides)
    return TrainConfig(**base)


def snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that -0.0 and +0.0 (or two NaNs) are told apart."""
    return t.detach().contiguous().view({4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()])


def assert_bitwise_equal(a_list, b_list) -> None:
    assert len(a_list) == len(b_list)
    for i, (a, b) in enumerate(zip(a_list, b_list)):
        assert a.dtype == b.dtype and a.shape == b.shape, i
        assert torch.equal(bits(a), bits(b)), f"tensor {i} differs in {int((bits(a) != bits(b)).sum())} elements"


def meta_grads(tr, micro, groups):
    """The MetaRM gradient of one step of ``tr`` (the step function the trainer calls), grads zeroed first."""
    from metarm_fast.steps import metarm_grads

    tr.weights.zero_grads()
    metrics, _ = metarm_grads(tr.model, tr.meta, [tr.batcher.pairs(items) for items in micro], tr.batcher.groups(groups),
                              center_coef=tr.cfg.center_coef, second_order=tr.cfg.second_order)
    return metrics


def l_grads(tr, micro):
    from metarm_fast.steps import l_pass

    tr.weights.zero_grads()
    return l_pass(tr.model, [tr.batcher.pairs(items) for items in micro], tr.cfg.center_coef)


def run_steps(tr, n=None):
    """Take ``n`` optimizer steps (default: all) the way the loop does, without the output folder."""
    out = []
    for s in range(tr.step, tr.total_steps if n is None else tr.step + n):
        out.append(tr.train_step(*tr.step_inputs(s)))
    return out
