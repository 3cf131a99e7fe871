"""The model and data every section of bench.gpu_check shares: nothing is downloaded.

- A Llama-shaped reward model built from a config (``SIZES``: bench.plan ``Shape``s, so the plan
  predicts for exactly this model), randomly initialised on the device, saved once in bf16 with the
  synthetic task's word-level tokenizer into a temporary folder, which the trainer loads by path
  (``--model FOLDER``) like any checkpoint.
- Preference pairs and meta groups over the synthetic task's words, of *fixed* lengths (prompt P
  words, responses R words): every step then lays out batches of the same length, so FlexAttention
  (which transformers compiles with static shapes) compiles once per pass rather than per batch. The
  attention section measures what a new length costs.
"""
from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass

import torch

from bench.plan import MODELS, Shape
from metarm_fast.config import TrainConfig

# Llama-shaped presets (hidden, layers, heads, kv heads, intermediate, vocab).
SIZES = {
    "toy": Shape("toy", 64, 2, 4, 2, 128, 256),
    "160m": Shape("llama-160m", 768, 12, 12, 12, 2048, 32000),
    "1b": Shape("llama-1b", 2048, 16, 32, 32, 5632, 32000),
    "3b": Shape("llama-3b", 3200, 26, 32, 32, 8640, 32000),
    "7b": MODELS["llama-2-7b"],
}


@dataclass(frozen=True)
class Workload:
    """A step's batches: ``batch`` pairs and ``meta_batch`` prompts x ``meta_k`` responses; prompts of
    ``prompt_words`` words, responses of ``response_words`` (each encodes to one token a word, with a
    BOS before the prompt and an EOS after each response)."""

    batch: int
    meta_batch: int
    meta_k: int
    prompt_words: int
    response_words: int

    @property
    def max_length(self) -> int:
        return self.prompt_words + self.response_words + 2


GPU_WORKLOAD = Workload(batch=16, meta_batch=16, meta_k=4, prompt_words=256, response_words=128)
TOY_WORKLOAD = Workload(batch=4, meta_batch=3, meta_k=3, prompt_words=12, response_words=6)


def build_llama(shape: Shape, pad_token_id: int, device, dtype=torch.bfloat16, seed: int = 0, attn: str = "sdpa"):
    """A randomly initialised LlamaForSequenceClassification of ``shape``, built on ``device``."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                      num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                      num_key_value_heads=shape.kv_heads, max_position_embeddings=4096, num_labels=1,
                      pad_token_id=pad_token_id, attn_implementation=attn)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForSequenceClassification(cfg)
    return model.to(dtype)


def synthetic_tokenizer():
    from metarm_fast.synthetic import SyntheticTask

    return SyntheticTask(0).tokenizer()


def write_model_folder(shape: Shape, folder: str, device, seed: int = 0) -> str:
    """Save the model of ``shape`` (bf16) and the synthetic tokenizer into ``folder``; returns it."""
    tok = synthetic_tokenizer()
    model = build_llama(shape, tok.pad_token_id, device, seed=seed)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return folder


def _words(rng: random.Random, n: int) -> str:
    from metarm_fast.synthetic import VOCAB

    return " ".join(rng.choice(VOCAB) for _ in range(n))


def pair_records(w: Workload, n: int, seed: int = 0) -> list[dict]:
    """n preference pairs ({prompt, chosen, rejected}) of the workload's fixed lengths."""
    rng = random.Random(seed * 1000 + 1)
    out = []
    for _ in range(n):
        prompt, chosen = _words(rng, w.prompt_words), _words(rng, w.response_words)
        rejected = chosen
        while rejected == chosen:
            rejected = _words(rng, w.response_words)
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def meta_records(w: Workload, n: int, seed: int = 0) -> list[dict]:
    """n meta-set prompts ({prompt, responses}) with meta_k responses each, of fixed lengths."""
    rng = random.Random(seed * 1000 + 4)
    return [{"prompt": _words(rng, w.prompt_words), "responses": [_words(rng, w.response_words) for _ in range(w.meta_k)]}
            for _ in range(n)]


def recommended_config(model_dir: str, w: Workload, steps: int, output_dir: str, **overrides) -> TrainConfig:
    """The recommended one-GPU MetaRM run (README, Speed flags): bf16 compute with fp32 masters,
    8-bit AdamW, activation checkpointing, prompt sharing; the paper's lr and eta (5e-6)."""
    cfg = TrainConfig(
        method="metarm",
        model=model_dir,
        train_data=pair_records(w, w.batch * steps),
        meta_data=meta_records(w, w.meta_batch * steps),
        max_length=w.max_length,
        batch_size=w.batch,
        meta_batch_size=w.meta_batch,
        max_steps=steps,
        precision="bf16-master",
        optimizer="adamw8bit",
        activation_checkpointing=True,
        packing="share-prompt",
        lr=5e-6,
        eta=5e-6,
        warmup_ratio=0.0,
        lr_schedule="constant",
        chat_template="never",
        progress=False,
        save_every=0,
        output_dir=output_dir,
        overwrite=True,
    )
    return dataclasses.replace(cfg, **overrides)
