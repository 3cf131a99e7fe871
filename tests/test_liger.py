"""--liger's guard: a clear error on the CPU and without the package, before any training."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from metarm_fast.liger import apply_liger_, liger_unavailable
from metarm_fast.model import build_tiny_llama
from metarm_fast.trainer import RewardTrainer
from tests.helpers import tiny_config


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")
def test_liger_refused_on_the_cpu(tmp_path):
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        apply_liger_(build_tiny_llama(16, 0))
    with pytest.raises(ValueError, match="needs a CUDA GPU"):  # the trainer stops before training
        RewardTrainer(tiny_config(tmp_path, liger=True), log=lambda *a, **k: None)


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None, reason="liger-kernel is installed")
def test_liger_missing_package_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "pip install -e .[liger]" in liger_unavailable(build_tiny_llama(16, 0))


def test_liger_refuses_other_model_families(monkeypatch):
    import importlib.machinery

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: importlib.machinery.ModuleSpec(name, None) if name == "liger_kernel" else real(name, *a))
    model = build_tiny_llama(16, 0)
    model.config.model_type = "bert"
    assert "wired for Llama" in liger_unavailable(model)
    model.config.model_type = "llama"
    assert liger_unavailable(model) is None
