"""Peak memory of a meta step against a vanilla step on the same batch, by allocation accounting."""
import pytest

from metarm_fast.memory import compare_step_peaks
from metarm_fast.trainer import RewardTrainer
from tests.helpers import tiny_config


@pytest.mark.parametrize("precision", ["fp32", "bf16-master"])
def test_meta_step_peak_is_the_vanilla_peak(tmp_path, precision):
    tr = RewardTrainer(tiny_config(tmp_path, method="metarm", eta=1e-3, batch_size=8, tiny_hidden=64, precision=precision))
    micro, _ = tr.step_inputs(0)
    groups = [[it.chosen, it.rejected] for it in micro[0]]  # the meta batch: the pairs' own prompts, 2 per group
    peaks = compare_step_peaks(tr.weights, tr.optimizer, tr.batcher, micro, groups, eta=tr.cfg.eta,
                               vanilla_step=lambda: tr.train_step(micro), meta_step=lambda: tr.train_step(micro, groups))
    param_bytes, vanilla, meta, copy_based = (peaks[k] for k in ("param_bytes", "vanilla", "metarm", "copy_based"))
    assert meta - vanilla <= 0.01 * param_bytes, (meta, vanilla, param_bytes)
    if precision == "fp32":
        assert copy_based - vanilla >= 0.9 * param_bytes  # the copy it avoids is really that big
