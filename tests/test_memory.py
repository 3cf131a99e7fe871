"""Peak memory of a meta step against a vanilla step on the same batch, by allocation accounting."""
import pytest

from metarm_fast.memory import step_peak_bytes as _peak, tensor_bytes
from metarm_fast.reference import copy_based_meta_step
from metarm_fast.trainer import RewardTrainer
from tests.helpers import tiny_config


@pytest.mark.parametrize("precision", ["fp32", "bf16-master"])
def test_meta_step_peak_is_the_vanilla_peak(tmp_path, precision):
    # The meta batch is the preference batch's own prompts with their two responses as a group, so
    # "the larger of the two batches" is the preference batch itself.
    tr = RewardTrainer(tiny_config(tmp_path, method="metarm", eta=1e-3, batch_size=8, tiny_hidden=64, precision=precision))
    micro = next(iter(tr.step_batches()))
    groups = [[it.chosen, it.rejected] for it in micro[0]]
    tr.next_meta_groups = lambda: groups
    tr.train_step(micro)  # warm-up: optimizer states and gradient buffers now exist
    param_bytes = tensor_bytes(tr.params)

    tr.cfg.method = "vanilla"
    vanilla = _peak(tr, lambda: tr.train_step(micro))
    tr.cfg.method = "metarm"
    meta = _peak(tr, lambda: tr.train_step(micro))
    copy_based = _peak(tr, lambda: copy_based_meta_step(tr, micro, groups))
    assert meta - vanilla <= 0.01 * param_bytes, (meta, vanilla, param_bytes)
    if precision == "fp32":
        assert copy_based - vanilla >= 0.9 * param_bytes  # the copy it avoids is really that big
