"""Whatever the batch layout, the trainer's losses see the same rewards in the same order."""
import pytest
import torch

from metarm_fast.kernels import difference_loss
from metarm_fast.steps import pair_loss
from metarm_fast.trainer import RewardTrainer
from tests.helpers import meta_grads, tiny_config


@pytest.mark.parametrize("packing", ["pack", "share-prompt"])
@pytest.mark.parametrize("attn", ["auto", "sdpa"])
def test_packed_steps_equal_padded_steps(tmp_path, packing, attn):
    kw = dict(method="metarm", eta=1e-3, max_length=14)  # 14 tokens: some pairs are truncated
    padded = RewardTrainer(tiny_config(tmp_path / "a", packing="none", **kw))  # auto would share prompts
    packed = RewardTrainer(tiny_config(tmp_path / "b", packing=packing, attn_implementation=attn, **kw))
    assert padded.encoder.truncated > 0
    micro, meta_groups = padded.step_inputs(0)
    # the two layouts really differ (fewer tokens packed), so the comparisons below are not of one
    # layout with itself
    for batch in ("pairs", "groups"):
        inputs = micro[0] if batch == "pairs" else meta_groups
        a, b = (getattr(tr.batcher, batch)(inputs) for tr in (padded, packed))
        assert b.layout != a.layout and b.input_ids.numel() < a.input_ids.numel(), batch
    ra, rb = (pair_loss(tr.model, tr.batcher.pairs(micro[0])) for tr in (padded, packed))
    torch.testing.assert_close(ra[1], rb[1], rtol=1e-5, atol=1e-5)  # chosen rewards, same order
    torch.testing.assert_close(ra[2], rb[2], rtol=1e-5, atol=1e-5)  # rejected rewards
    torch.testing.assert_close(ra[0], rb[0], rtol=1e-5, atol=1e-6)
    ja, jb = (difference_loss(tr.model(b), b.offsets) for tr in (padded, packed) for b in [tr.batcher.groups(meta_groups)])
    torch.testing.assert_close(ja, jb, rtol=1e-5, atol=1e-6)
    # a whole MetaRM step (J pass, perturbation, L pass, restore): the same gradients
    for tr in (padded, packed):
        meta_grads(tr, micro, meta_groups)
    for a, b in zip(padded.weights.params, packed.weights.params):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_packing_refuses_an_encoder(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    d = tmp_path / "bert"
    BertForSequenceClassification(BertConfig(vocab_size=80, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32, num_labels=1)).save_pretrained(d)
    from metarm_fast.synthetic import SyntheticTask

    SyntheticTask(0).tokenizer().save_pretrained(d)
    with pytest.raises(ValueError, match="decoder"):
        RewardTrainer(tiny_config(tmp_path, model=str(d), packing="pack"))


def test_auto_packing_shares_prompts_for_decoders_and_pads_encoders(tmp_path):
    """--packing auto (the default): share-prompt for a decoder (the tiny Llama, or one saved as a
    folder), padded for an encoder; the choice is printed at start and saved resolved in the config."""
    from transformers import BertConfig, BertForSequenceClassification

    from metarm_fast.config import TrainConfig
    from metarm_fast.model import build_tiny_llama
    from metarm_fast.synthetic import SyntheticTask

    assert TrainConfig().packing == "auto"
    tok = SyntheticTask(0).tokenizer()
    bert, llama = tmp_path / "bert", tmp_path / "llama"
    BertForSequenceClassification(BertConfig(vocab_size=80, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32, num_labels=1)).save_pretrained(bert)
    build_tiny_llama(len(tok), tok.pad_token_id, layers=1, hidden=32).save_pretrained(llama)
    for d in (bert, llama):
        tok.save_pretrained(d)
    for model, expected in (("tiny-llama", "share-prompt"), (str(llama), "share-prompt"), (str(bert), "none")):
        lines = []
        tr = RewardTrainer(tiny_config(tmp_path, model=model), log=lines.append)
        assert tr.cfg.packing == expected, model
        assert f"packing {expected} (auto:" in lines[0], lines[0]
    # set explicitly, it is kept
    assert RewardTrainer(tiny_config(tmp_path, packing="none")).cfg.packing == "none"
