"""Score a saved reward model on preference pairs, with the same encoding and reward positions as training."""
from __future__ import annotations

import torch

from metarm_fast.config import TrainConfig
from metarm_fast.batch import EncodedPair, pair_batch
from metarm_fast.data import Encoder
from metarm_fast.model import RewardModel, ensure_pad_token
from metarm_fast.sources import pair_source


def load_checkpoint(model_dir: str):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ensure_pad_token(tok)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    model.eval()
    return model, tok


@torch.no_grad()
def score_pairs(model, tok, pairs, max_length: int = 512, batch_size: int = 32, chat_template: str = "auto"):
    enc = Encoder(tok, max_length, chat_template=chat_template)
    rm = RewardModel(model)
    rc, rr = [], []
    for i in range(0, len(pairs), batch_size):
        encoded = [EncodedPair(*enc.encode_pair(p)) for p in pairs[i : i + batch_size]]
        r = rm(pair_batch(encoded, "none", tok.pad_token_id))
        rc.append(r[: len(encoded)])
        rr.append(r[len(encoded) :])
    return torch.cat(rc), torch.cat(rr), enc.truncated


def evaluate_checkpoint(model_dir: str, data: str, *, data_format="auto", max_length=512, batch_size=32,
                        on_bad_record="error", max_records=None, split="test") -> dict:
    from metarm_fast.trainer import pair_metrics

    model, tok = load_checkpoint(model_dir)
    cfg = TrainConfig(data_format=data_format, on_bad_record=on_bad_record, max_records=max_records, split=split)
    pairs, report = pair_source(data, cfg)
    rc, rr, truncated = score_pairs(model, tok, pairs, max_length, batch_size)
    out = pair_metrics(rc, rr)
    out.update(truncated=truncated, skipped=dict(report.skipped), data=data, model=model_dir)
    return out
