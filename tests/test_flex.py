"""FlexAttention, auto's choice for packed batches on a GPU: its forward against the block-wise SDPA.

Forward only: on the CPU flex compiles its kernel (about 12 s of CPU here, the cost of this file)
and has no backward. The backward and the speed are GPU matters (README, Speed).
"""
from __future__ import annotations

import pytest
import torch

from metarm_fast.config import TrainConfig
from metarm_fast.data import EncodedSeq
from metarm_fast.model import build_tiny_llama, choose_attention, has_flex_attention
from metarm_fast.packing import BLOCKWISE_SDPA, compute_rewards_packed, pack, register_blockwise_sdpa

# Measured (torch 2.13 CPU, tiny Llama hidden 64, 2 layers, fp32, mixed-k groups): flex's rewards differ
# from the block-wise SDPA's by at most 2.0e-7 (printed by the test, -s): the two kernels accumulate the
# softmax in other orders. Bound: 10x that.
FLEX_TOL = 2e-6


def _groups():
    g = torch.Generator().manual_seed(1)

    def seq(n):
        return torch.randint(3, 60, (n,), generator=g).tolist()

    out = []
    for p_len, sizes in ((7, (3, 5)), (12, (4, 1, 6)), (5, (9, 2, 2, 3)), (20, (1, 8))):
        prompt = seq(p_len)
        out.append([EncodedSeq(prompt, seq(n)) for n in sizes])
    return out


@pytest.mark.skipif(not has_flex_attention(), reason="this torch has no FlexAttention")
@pytest.mark.parametrize("share_prompt", [True, False])
def test_flex_forward_matches_blockwise(share_prompt):
    torch.manual_seed(0)
    blockwise = build_tiny_llama(64, 0, layers=2, hidden=64, attn=register_blockwise_sdpa()).eval()
    flex = build_tiny_llama(64, 0, layers=2, hidden=64, attn="flex_attention").eval()
    flex.load_state_dict(blockwise.state_dict())
    assert flex.config._attn_implementation == "flex_attention"
    groups = _groups()
    with torch.no_grad():
        ref = compute_rewards_packed(blockwise, pack(groups, share_prompt, dense_mask=False))
        got = compute_rewards_packed(flex, pack(groups, share_prompt, dense_mask=False))
    err = float((got - ref).abs().max() / ref.abs().max())
    print(f"flex vs block-wise rewards (share_prompt={share_prompt}): max relative difference {err:.3g}")
    assert err <= FLEX_TOL


def test_auto_picks_flex_for_packed_batches_on_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_attention(TrainConfig(packing="share-prompt")) == "flex_attention"
    assert choose_attention(TrainConfig(packing="none")) == "sdpa"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_attention(TrainConfig(packing="share-prompt")) == BLOCKWISE_SDPA
