"""The export used outside metarm-fast: from the folder alone, the README's transformers snippet and
``load_reward_model`` give the rewards ``metarm-fast eval`` gives, for a decoder with a chat template,
an encoder without one, and a LoRA export; the folder carries its encoding and a model card."""
import json
import os
import re

import pytest
import torch

import metarm_fast
from metarm_fast.evaluate import load_checkpoint, score_groups
from metarm_fast.data import MetaGroup
from metarm_fast.synthetic import SyntheticTask
from metarm_fast.trainer import RewardTrainer
from tests.helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A template the synthetic word-level vocabulary tokenizes (every word it emits is in the vocabulary).
TEMPLATE = "{% for m in messages %}{{ m['content'] }} {{ eos_token }} {% endfor %}"


def readme_snippet() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    return next(b for b in blocks if "def reward(" in b)


def _folders(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    tok = SyntheticTask(0).tokenizer()
    chat = tmp_path / "chat-tokenizer"
    tok.chat_template = TEMPLATE
    tok.save_pretrained(chat)
    bert = tmp_path / "bert"
    BertForSequenceClassification(BertConfig(vocab_size=80, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32, num_labels=1,
                                             initializer_range=0.5)).save_pretrained(bert)  # rewards that differ
    SyntheticTask(0).tokenizer().save_pretrained(bert)
    return {"decoder, chat template": dict(tokenizer=str(chat)),
            "encoder, plain": dict(model=str(bert), packing="none"),
            "LoRA": dict(lora_r=2)}


@pytest.mark.parametrize("kind", ["decoder, chat template", "encoder, plain", "LoRA"])
def test_export_alone_reproduces_eval_rewards(tmp_path, kind):
    tr = RewardTrainer(tiny_config(tmp_path, **_folders(tmp_path)[kind]))
    tr.train()
    out = tr.cfg.output_dir
    enc = json.load(open(os.path.join(out, "config.json")))["metarm_fast_encoding"]
    assert enc["format"] == ("chat_template" if kind.endswith("chat template") else "plain")
    card = open(os.path.join(out, "README.md")).read()
    assert "tiny-llama" in card or "bert" in card
    assert "eval accuracy" in card and "reward mean / std" in card and "load_reward_model" in card

    pairs = SyntheticTask(0).pairs("eval", n=12)
    prompts = [p.prompt for p in pairs]
    responses = [p.chosen for p in pairs]
    model, tok = load_checkpoint(out)  # what metarm-fast eval scores with
    want, _ = score_groups(model, tok, [MetaGroup(p, (r,), "") for p, r in zip(prompts, responses)],
                           max_length=tr.cfg.max_length)
    want = torch.tensor([g[0] for g in want])

    got = metarm_fast.load_reward_model(out).score(prompts, responses)
    # The same encoding, model and batches: measured 0 apart for all three exports (pytest -s prints it).
    print(f"{kind}: load_reward_model vs eval max |diff| {(got - want).abs().max():.3g}")
    torch.testing.assert_close(got, want, rtol=0, atol=0)

    scope = {}
    exec(readme_snippet().replace('"runs/hh-minilm"', repr(out)), scope)
    snippet = torch.tensor([scope["reward"](p, r) for p, r in zip(prompts, responses)])
    # One sequence at a time, unpadded, through transformers' own head, against padded batches: float32
    # rounding. Measured max |diff|: 4.5e-8 (chat decoder), 2.2e-8 (LoRA), 9.5e-7 (encoder, rewards of
    # std 0.68, where padding changes BERT's summation order); the bound is 4x the largest.
    print(f"{kind}: README snippet vs eval max |diff| {(snippet - want).abs().max():.3g}, std {snippet.std():.3g}")
    torch.testing.assert_close(snippet, want, rtol=0, atol=4e-6)
    # and not by accident: the snippet tells these responses apart
    assert snippet.std() > 1e-4
