"""Triton has Linux wheels only: without it, the package imports and trains through the torch paths.

A child process hides triton (and only triton) behind an import hook, then runs a MetaRM step of the
tiny default and asks for the Triton path explicitly, which must be refused with a message.
"""
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent("""
    import sys, importlib.abc

    class HideTriton(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ImportError(f"No module named {name!r} (hidden by the test)")
            return None

    sys.meta_path.insert(0, HideTriton())
    import tempfile
    import torch
    from metarm_fast.config import TrainConfig
    from metarm_fast.kernels import HAS_TRITON, bt_loss
    from metarm_fast.trainer import RewardTrainer

    assert not HAS_TRITON and "triton" not in sys.modules
    out = tempfile.mkdtemp()
    tr = RewardTrainer(TrainConfig(method="metarm", max_records=32, max_steps=2, batch_size=4, meta_batch_size=2,
                                   meta_k=3, max_length=48, tiny_hidden=32, progress=False, output_dir=out,
                                   threads=1), log=lambda *a: None)
    m = tr.train_step(*tr.step_inputs(0))
    assert torch.isfinite(torch.tensor(m["loss"])), m
    try:
        bt_loss(torch.zeros(3), torch.zeros(3), impl="triton")
    except ValueError as e:
        assert "Triton is not installed" in str(e), e
        print("REFUSED")
    print("OK", m["loss"])
""")


@pytest.mark.slow
def test_trains_without_triton():
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "REFUSED" in r.stdout and "OK" in r.stdout, r.stdout
