"""Packed and prompt-shared rewards against the plain padded computation (the reference).

The reference is `compute_rewards(model, collate(seqs))` on the same sequences; the packed path must
give the same rewards (fp32: within 1e-5) and the same parameter gradients, for pairs, meta groups
of mixed k, truncated records, and both attention backends that take a dense mask on the CPU.
"""
from __future__ import annotations

import os

import pytest
import torch

from metarm_fast.data import EncodedSeq, Encoder, collate
from metarm_fast.model import build_tiny_llama, compute_rewards
from metarm_fast.packing import (
    BLOCKWISE_SDPA,
    compute_rewards_packed,
    pack,
    packed_attention_mask,
    packed_tokens,
    padded_tokens,
    pair_layout,
    register_blockwise_sdpa,
)
from metarm_fast.synthetic import SyntheticTask

# fp32 tolerances: rewards are the 1e-5; gradients are sums over many tokens, so they get a
# relative term too (measured max abs difference here: ~6e-8 on rewards, ~2e-6 on gradients as large as ~18).
TOL = {"reward": dict(atol=1e-5, rtol=0.0), "grad": dict(atol=1e-5, rtol=1e-5)}
# the ones that run forward and backward on the CPU: two take the dense mask, ours takes per-block masks
BACKENDS = ["sdpa", "eager", BLOCKWISE_SDPA]
register_blockwise_sdpa()


@pytest.fixture(scope="module")
def tok():
    return SyntheticTask(0).tokenizer()


@pytest.fixture(scope="module", params=BACKENDS)
def model(request, tok):
    torch.manual_seed(0)
    m = build_tiny_llama(len(tok), tok.pad_token_id, layers=2, hidden=64, attn=request.param)
    return m.eval()  # eval: no dropout (Llama has none anyway); gradients still flow


def _pairs(tok, n, max_length=64, split="eval"):
    enc = Encoder(tok, max_length)
    out = [list(enc.encode_pair(p)) for p in SyntheticTask(0).pairs(split, n=n)]
    return out, enc


def _mixed_groups(tok, ks=(1, 2, 5, 2, 1, 5), max_length=64):
    """Meta groups with mixed k: group i keeps the first ks[i] of its 5 responses."""
    enc = Encoder(tok, max_length)
    groups = [enc.encode_group(g) for g in SyntheticTask(0).meta_groups(len(ks), 5)]
    return [g[:k] for g, k in zip(groups, ks)]


def _reference(model, groups, tok, padding_side="right"):
    """Rewards of the padded batch of the groups' sequences, in flattened group order."""
    seqs = [s for g in groups for s in g]
    return compute_rewards(model, collate(seqs, tok.pad_token_id, padding_side))


# -- rewards ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("share_prompt", [False, True])
def test_pairs_match_the_trainer_layout(model, tok, share_prompt):
    pairs, _ = _pairs(tok, 7)
    # the trainer's pair batch: [chosen_1..chosen_n, rejected_1..rejected_n], padded
    ref = compute_rewards(model, collate([c for c, _ in pairs] + [r for _, r in pairs], tok.pad_token_id))
    got = pair_layout(compute_rewards_packed(model, pack(pairs, share_prompt)))
    assert got.dtype == torch.float32 and got.shape == ref.shape
    torch.testing.assert_close(got, ref, **TOL["reward"])


@pytest.mark.parametrize("share_prompt", [False, True])
def test_meta_groups_with_mixed_k(model, tok, share_prompt):
    groups = _mixed_groups(tok)
    batch = pack(groups, share_prompt)
    assert batch["offsets"].tolist() == [0, 1, 3, 8, 10, 11, 16]  # as the trainer's meta_batch
    torch.testing.assert_close(compute_rewards_packed(model, batch), _reference(model, groups, tok), **TOL["reward"])


@pytest.mark.parametrize("max_length", [6, 12])
@pytest.mark.parametrize("share_prompt", [False, True])
def test_truncated_pairs(model, tok, share_prompt, max_length):
    pairs, enc = _pairs(tok, 6, max_length=max_length, split="train")
    assert enc.truncated == len(pairs)  # every record lost tokens: prompts cut to the left, some responses too
    assert all(len(s) <= max_length for p in pairs for s in p)
    for padding_side in ("right", "left"):
        ref = _reference(model, pairs, tok, padding_side)
        torch.testing.assert_close(compute_rewards_packed(model, pack(pairs, share_prompt)), ref, **TOL["reward"])


@pytest.mark.parametrize("share_prompt", [False, True])
def test_one_sequence(model, tok, share_prompt):
    groups = _mixed_groups(tok, ks=(1,))
    torch.testing.assert_close(
        compute_rewards_packed(model, pack(groups, share_prompt)), _reference(model, groups, tok), **TOL["reward"]
    )


def test_empty_prompt_and_empty_response(model, tok):
    """Odd records: a group with no prompt (responses start at position 0) and, shared, a response with
    no tokens of its own (its reward is read at the prompt's last token, as in the padded batch)."""
    groups = [
        [EncodedSeq([], [5, 6, 7]), EncodedSeq([], [8])],
        [EncodedSeq([2, 9, 10], [11, 12]), EncodedSeq([2, 9, 10], [])],
    ]
    ref = _reference(model, groups, tok)
    torch.testing.assert_close(compute_rewards_packed(model, pack(groups, True)), ref, **TOL["reward"])
    torch.testing.assert_close(compute_rewards_packed(model, pack(groups, False)), ref, **TOL["reward"])


# -- gradients -------------------------------------------------------------------------------------
@pytest.mark.parametrize("share_prompt", [False, True])
def test_gradients_match_padded(model, tok, share_prompt):
    pairs, _ = _pairs(tok, 5, max_length=20)
    groups = pairs + _mixed_groups(tok, ks=(5, 1, 2))  # truncated pairs and mixed-k groups in one batch
    n = sum(len(g) for g in groups)
    w = torch.randn(n, generator=torch.Generator().manual_seed(1))  # unequal weights: a mixed-up order shows
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(rewards_fn):
        model.zero_grad(set_to_none=True)
        (rewards_fn() * w).sum().backward()
        return [p.grad.clone() for p in params]

    ref = grads(lambda: _reference(model, groups, tok))
    got = grads(lambda: compute_rewards_packed(model, pack(groups, share_prompt)))
    model.zero_grad(set_to_none=True)
    assert all(g.abs().sum() > 0 for g in ref[1:])  # every layer gets a gradient (embeddings are sparse)
    for i, (a, b) in enumerate(zip(got, ref)):
        torch.testing.assert_close(a, b, **TOL["grad"], msg=lambda m, i=i: f"parameter {i}: {m}")


def test_activation_checkpointing_composes(tok):
    """Checkpointed layers recompute attention in backward with the same kwargs (block masks included)."""
    groups = _mixed_groups(tok, ks=(2, 5))
    grads = {}
    for name, share_prompt in [("padded", None), ("packed", False), ("shared", True)]:
        torch.manual_seed(0)
        m = build_tiny_llama(len(tok), tok.pad_token_id, layers=2, hidden=32, attn=BLOCKWISE_SDPA)
        if share_prompt is not None:
            m.activation_checkpointing_enable()  # non-reentrant by default
        m.train()  # checkpointing only acts in training mode
        r = _reference(m, groups, tok) if share_prompt is None else compute_rewards_packed(m, pack(groups, share_prompt))
        (r * torch.arange(1.0, len(r) + 1)).sum().backward()
        grads[name] = [p.grad for p in m.parameters()]
    for name in ("packed", "shared"):
        for a, b in zip(grads[name], grads["padded"]):
            torch.testing.assert_close(a, b, **TOL["grad"])


def test_blockwise_backend_leaves_padded_batches_alone(tok):
    """With the block-wise attention loaded, a padded batch (no block kwargs) is plain sdpa, bit for bit."""
    torch.manual_seed(0)
    sdpa = build_tiny_llama(len(tok), tok.pad_token_id, layers=2, hidden=32, attn="sdpa").eval()
    blockwise = build_tiny_llama(len(tok), tok.pad_token_id, layers=2, hidden=32, attn=BLOCKWISE_SDPA).eval()
    blockwise.load_state_dict(sdpa.state_dict())
    pairs, _ = _pairs(tok, 4)
    for side in ("right", "left"):
        assert torch.equal(_reference(blockwise, pairs, tok, side), _reference(sdpa, pairs, tok, side))


# -- the layout and the mask -----------------------------------------------------------------------
def test_shared_layout_by_hand():
    """Prompt [1, 2] with responses [3] and [4, 5], then a lone sequence [6] + [7]."""
    b = pack([[EncodedSeq([1, 2], [3]), EncodedSeq([1, 2], [4, 5])], [EncodedSeq([6], [7])]], share_prompt=True)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 2, 3, 0, 1]]
    assert b["last_index"].tolist() == [2, 4, 6]
    assert b["block_offsets"].tolist() == [0, 5, 7] and b["offsets"].tolist() == [0, 2, 3]
    assert "cu_seqlens" not in b  # varlen attention cannot express sharing
    expected = torch.tensor(
        [  # q \ kv: 1  2  3  4  5  6  7
            [1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0],
            [1, 1, 0, 1, 0, 0, 0],  # response 2 skips its sibling
            [1, 1, 0, 1, 1, 0, 0],
            [0, 0, 0, 0, 0, 1, 0],
            [0, 0, 0, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert b["attention_mask"].shape == (1, 1, 7, 7) and b["attention_mask"].dtype == torch.bool
    assert torch.equal(b["attention_mask"][0, 0], expected)
    eager = packed_attention_mask(b, "eager", dtype=torch.float32)  # additive: 0 / finfo.min
    assert torch.equal(eager[0, 0] == 0, expected)


def test_unshared_mask_equals_transformers_packed_detection(tok):
    """Without sharing, the mask is what transformers itself builds for packed sequences from
    restarting position_ids (its find_packed_sequence_indices path); cu_seqlens are the boundaries."""
    from transformers.masking_utils import create_causal_mask

    groups = _mixed_groups(tok, ks=(2, 1, 3))
    b = pack(groups, share_prompt=False)
    lengths = [len(s) for g in groups for s in g]
    assert b["cu_seqlens"].tolist() == [0] + torch.tensor(lengths).cumsum(0).tolist()
    assert b["block_offsets"].tolist() == b["cu_seqlens"].tolist()
    assert b["cu_seqlens"].dtype == torch.int32 and int(b["max_seqlen"]) == max(lengths)
    model = build_tiny_llama(len(tok), tok.pad_token_id, layers=1, hidden=32)
    T = b["input_ids"].shape[1]
    theirs = create_causal_mask(
        config=model.config,
        inputs_embeds=torch.zeros(1, T, 32),
        attention_mask=None,
        past_key_values=None,
        position_ids=b["position_ids"],
    )
    assert torch.equal(theirs, b["attention_mask"])


@pytest.mark.parametrize("share_prompt", [False, True])
def test_batch_is_all_tensors_and_T_is_the_token_count(tok, share_prompt):
    groups = _mixed_groups(tok)
    b = pack(groups, share_prompt, dense_mask=False)
    assert "attention_mask" not in b
    assert all(isinstance(v, torch.Tensor) for v in b.values())  # the trainer's _to_device moves every value
    assert b["input_ids"].shape == b["position_ids"].shape == b["seq_ids"].shape == b["branch_ids"].shape
    assert b["input_ids"].shape[1] == packed_tokens(groups, share_prompt)


def test_token_counts():
    groups = [
        [EncodedSeq([1, 2, 3], [4]), EncodedSeq([1, 2, 3], [5, 6, 7])],  # lengths 4, 6
        [EncodedSeq([8], [9, 10])],  # length 3
    ]
    assert padded_tokens(groups) == 3 * 6
    assert packed_tokens(groups, share_prompt=False) == 4 + 6 + 3
    assert packed_tokens(groups, share_prompt=True) == (3 + 1 + 3) + (1 + 2)


def test_pair_layout():
    assert pair_layout(torch.tensor([1.0, -1.0, 2.0, -2.0, 3.0, -3.0])).tolist() == [1, 2, 3, -1, -2, -3]
    with pytest.raises(ValueError, match="pairs"):
        pair_layout(torch.zeros(3))


# -- errors ----------------------------------------------------------------------------------------
def test_errors():
    with pytest.raises(ValueError, match="at least one group"):
        pack([], share_prompt=False)
    with pytest.raises(ValueError, match="group 1 has no sequences"):
        pack([[EncodedSeq([1], [2])], []], share_prompt=False)
    with pytest.raises(ValueError, match="sequence 1 of group 0 has a different prompt"):
        pack([[EncodedSeq([1, 2], [3]), EncodedSeq([2], [3])]], share_prompt=True)
    with pytest.raises(ValueError, match="empty"):
        pack([[EncodedSeq([], [])]], share_prompt=True)


def test_encoder_and_flash_guards(tok):
    from transformers import BertConfig, BertForSequenceClassification

    bert = BertForSequenceClassification(
        BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_labels=1)
    )
    b = pack([[EncodedSeq([1], [2])]], share_prompt=False)
    with pytest.raises(ValueError, match="compute_rewards on a padded batch"):
        compute_rewards_packed(bert, b)
    # FlashAttention (GPU only) cannot express prompt sharing; the check runs before any kernel.
    llama = build_tiny_llama(len(tok), tok.pad_token_id, layers=1, hidden=32)
    llama.config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(ValueError, match="cannot share prompts"):
        compute_rewards_packed(llama, pack([[EncodedSeq([1], [2]), EncodedSeq([1], [3])]], share_prompt=True))


@pytest.mark.skipif(not os.environ.get("METARM_TEST_FLEX"), reason="flex_attention compiles (~12 s) and has no CPU backward; set METARM_TEST_FLEX=1")
@pytest.mark.parametrize("share_prompt", [False, True])
def test_flex_attention_forward(tok, share_prompt):
    torch.manual_seed(0)
    ref_model = build_tiny_llama(len(tok), tok.pad_token_id, layers=2, hidden=64, attn="sdpa").eval()
    flex = build_tiny_llama(len(tok), tok.pad_token_id, layers=2, hidden=64, attn="flex_attention").eval()
    flex.load_state_dict(ref_model.state_dict())
    groups = _mixed_groups(tok)
    with torch.no_grad():
        ref = _reference(ref_model, groups, tok)
        got = compute_rewards_packed(flex, pack(groups, share_prompt, dense_mask=False))
    torch.testing.assert_close(got, ref, **TOL["reward"])
