"""Score a saved reward model on preference pairs, with the same encoding and reward positions as training.

A source whose records carry a `subset` field is read as RewardBench (1 or 2) and gets the report of
``metarm_fast.rewardbench``: accuracy per subset, per section, and best-of-4 for RewardBench 2."""
from __future__ import annotations

import torch

from metarm_fast.config import TrainConfig
from metarm_fast.batch import EncodedPair, meta_batch, pair_batch
from metarm_fast.data import Encoder, RankedGroup, read_records
from metarm_fast.model import RewardModel, check_local_path, ensure_pad_token, from_pretrained_checked
from metarm_fast.sources import pair_source


def load_checkpoint(model_dir: str):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = from_pretrained_checked("--model", model_dir, AutoTokenizer.from_pretrained)
    ensure_pad_token(tok)
    model = from_pretrained_checked("--model", model_dir, AutoModelForSequenceClassification.from_pretrained)
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


RUN_SETTINGS = ("max_length", "data_format", "chat_template", "pku_preference")


def run_settings(model_dir: str) -> dict:
    """The settings of the training run that wrote ``model_dir`` (its metarm_fast_config.yaml), for
    the ones that decide how pairs are encoded; {} for a checkpoint from elsewhere."""
    import os

    import yaml

    path = os.path.join(model_dir, "metarm_fast_config.yaml")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        saved = yaml.safe_load(f) or {}
    return {k: saved[k] for k in RUN_SETTINGS if k in saved}


@torch.no_grad()
def score_groups(model, tok, groups, max_length: int = 512, batch_size: int = 32, chat_template: str = "auto"):
    """Rewards of every response of each group (a list per group, in its order), and the truncations."""
    enc = Encoder(tok, max_length, chat_template=chat_template)
    rm = RewardModel(model)
    out = []
    for i in range(0, len(groups), batch_size):
        batch = meta_batch([enc.encode_group(g) for g in groups[i : i + batch_size]], "none", tok.pad_token_id)
        r = rm(batch).tolist()
        out += [r[a:b] for a, b in zip(batch.offsets[:-1].tolist(), batch.offsets[1:].tolist())]
    return out, enc.truncated


def is_rewardbench(data: str, split: str = "test") -> bool:
    """True when the source's first record carries a `subset` field (RewardBench 1 and 2 do)."""
    first = next(read_records(data, split=split, max_records=1), None)
    return first is not None and "subset" in first[1]


def evaluate_checkpoint(model_dir: str, data: str, *, data_format=None, max_length=None, batch_size=32,
                        on_bad_record="error", max_records=None, split="test", chat_template=None,
                        pku_preference=None) -> dict:
    """Accuracy and reward statistics of a saved reward model on ``data``. The encoding settings left
    None come from the run that trained the model (so pairs are encoded as in training), else from
    TrainConfig's defaults; the ones used are in the result's ``settings``."""
    from metarm_fast.scoring import group_metrics, pair_metrics

    check_local_path("--model", model_dir)  # before the data is read
    given = {"max_length": max_length, "data_format": data_format, "chat_template": chat_template,
             "pku_preference": pku_preference}
    defaults = TrainConfig()
    saved = run_settings(model_dir)
    settings = {k: v if v is not None else saved.get(k, getattr(defaults, k)) for k, v in given.items()}
    used = {k: {"value": v, "from": "flag" if given[k] is not None else "run" if k in saved else "default"}
            for k, v in settings.items()}
    if not data.startswith("synthetic") and is_rewardbench(data, split):
        from metarm_fast.rewardbench import comparisons_from_records, report as rewardbench_report

        comparisons, skipped = comparisons_from_records(read_records(data, split=split, max_records=max_records),
                                                        on_bad_record, source=data)
        model, tok = load_checkpoint(model_dir)
        rewards, truncated = score_groups(model, tok, [c.group for c in comparisons], settings["max_length"],
                                          batch_size, settings["chat_template"])
        out = rewardbench_report(comparisons, rewards)
        out.update(truncated=truncated, skipped=dict(skipped), data=data, model=model_dir,
                   settings={k: v for k, v in used.items() if k in ("max_length", "chat_template")})
        return out
    cfg = TrainConfig(data_format=settings["data_format"], on_bad_record=on_bad_record, max_records=max_records,
                      split=split, pku_preference=settings["pku_preference"])
    pairs, report = pair_source(data, cfg)  # read and checked before the model is loaded
    model, tok = load_checkpoint(model_dir)
    if isinstance(pairs[0], RankedGroup):  # k-response records: pairwise accuracy and best-of-k
        rewards, truncated = score_groups(model, tok, pairs, settings["max_length"], batch_size, settings["chat_template"])
        out = group_metrics([torch.tensor(r) for r in rewards], [g.scores for g in pairs])
    else:
        rc, rr, truncated = score_pairs(model, tok, pairs, settings["max_length"], batch_size, settings["chat_template"])
        out = pair_metrics(rc, rr)
    out.update(truncated=truncated, skipped=dict(report.skipped), data=data, model=model_dir, settings=used)
    return out
