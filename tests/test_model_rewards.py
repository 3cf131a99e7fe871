"""Rewards are read at each response's last token by position, whatever the padding or truncation."""
import pytest
import torch

from metarm_fast.data import Encoder, PreferencePair, collate
from metarm_fast.model import build_tiny_llama, compute_rewards, ensure_pad_token
from metarm_fast.synthetic import SyntheticTask


@pytest.fixture(scope="module")
def tok():
    return SyntheticTask(0).tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return build_tiny_llama(len(tok), tok.pad_token_id, layers=2, hidden=32).eval()


def _alone(model, seq):
    return compute_rewards(model, collate([seq], pad_id=0))[0]


def _pairs(n=6):
    return SyntheticTask(0).pairs("eval", n=n)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_does_not_move_the_reward(model, tok, side):
    enc = Encoder(tok, max_length=64)
    seqs = [s for p in _pairs() for s in enc.encode_pair(p)]
    assert len({len(s) for s in seqs}) > 1  # the batch really is padded
    with torch.no_grad():
        batched = compute_rewards(model, collate(seqs, tok.pad_token_id, side))
        alone = torch.stack([_alone(model, s) for s in seqs])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


def test_pad_equal_to_eos_still_reads_the_last_token(model, tok):
    """transformers' head looks for the last non-pad id: with pad == eos it reads one token early."""
    enc = Encoder(tok, max_length=64)
    seqs = [s for p in _pairs(3) for s in enc.encode_pair(p)]
    batch = collate(seqs, tok.eos_token_id, "right")  # pad with eos, as a tokenizer without pad would
    with torch.no_grad():
        ours = compute_rewards(model, batch)
        alone = torch.stack([_alone(model, s) for s in seqs])
        model.config.pad_token_id = tok.eos_token_id
        hf = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
        model.config.pad_token_id = tok.pad_token_id
    torch.testing.assert_close(ours, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(hf, alone, atol=1e-4)  # the pitfall is real


def test_truncated_pair_keeps_the_response_end(model, tok):
    long_prompt = " ".join(["w01"] * 80)
    pair = PreferencePair(prompt=long_prompt, chosen="w02 w03 w04", rejected="w05 w06")
    enc = Encoder(tok, max_length=16)
    c, r = enc.encode_pair(pair)
    assert enc.truncated == 1 and len(c) <= 16 and len(r) <= 16
    assert c.response_ids[-1] == tok.eos_token_id and r.response_ids[-1] == tok.eos_token_id
    assert tok.convert_ids_to_tokens(c.response_ids[:-1]) == ["w02", "w03", "w04"]
    with torch.no_grad():
        for side in ("left", "right"):
            got = compute_rewards(model, collate([c, r], tok.pad_token_id, side))
            torch.testing.assert_close(got, torch.stack([_alone(model, c), _alone(model, r)]), rtol=1e-5, atol=1e-5)


def test_a_bert_reward_model_scores_the_same_padded_or_not():
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i:02d}" for i in range(64)]
    import tempfile, os

    d = tempfile.mkdtemp()
    with open(os.path.join(d, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab))
    tok = BertTokenizerFast(os.path.join(d, "vocab.txt"))
    ensure_pad_token(tok)
    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=64, num_labels=1)
    ).eval()
    enc = Encoder(tok, max_length=64)
    seqs = [s for p in _pairs(4) for s in enc.encode_pair(p)]
    assert seqs[0].prompt_ids[0] == tok.cls_token_id and seqs[0].response_ids[-1] == tok.sep_token_id
    with torch.no_grad():
        alone = torch.stack([_alone(model, s) for s in seqs])
        for side in ("right", "left"):
            batched = compute_rewards(model, collate(seqs, tok.pad_token_id, side))
            torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
