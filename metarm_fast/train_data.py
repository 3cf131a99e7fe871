"""A run's data, read, checked and encoded before the model is loaded: a bad data path or record must
not cost a model load."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from metarm_fast.batch import EncodedGroup, EncodedPair
from metarm_fast.config import describe_data
from metarm_fast.data import RankedGroup
from metarm_fast.sources import meta_source, pair_source


@dataclass
class TrainData:
    train_pairs: list[EncodedPair]
    eval_pairs: list[EncodedPair] | None = None
    meta_groups: list | None = None
    shifted_pairs: list | None = None  # the synthetic task: pairs from the better policy, scored at the end
    reports: list = field(default_factory=list)  # (which, load report) per source, for the summary


def encode_pairs(encoder, items) -> list:
    """Preference pairs -> EncodedPairs; k-response records (RankedGroups) -> EncodedGroups."""
    out = []
    for it in items:
        if isinstance(it, RankedGroup):
            out.append(EncodedGroup(encoder.encode_group(it), it.scores))
        else:
            c, r = encoder.encode_pair(it)
            out.append(EncodedPair(c, r, it.margin))
    return out


def load_train_data(cfg, encoder, tokenizer) -> TrainData:
    pairs, rep = pair_source(cfg.train_data, cfg)
    reports = [("train", rep)]
    eval_pairs = None
    if cfg.eval_fraction > 0 and cfg.eval_data is None:
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        n_eval = max(1, int(len(pairs) * cfg.eval_fraction))
        if n_eval >= len(pairs):
            raise ValueError(f"{describe_data(cfg.train_data)}: eval_fraction {cfg.eval_fraction} leaves no training pairs")
        eval_pairs = encode_pairs(encoder, [pairs[i] for i in order[:n_eval]])
        pairs = [pairs[i] for i in order[n_eval:]]
    if not pairs:
        raise ValueError(f"{describe_data(cfg.train_data)}: no training pairs")
    train_pairs = encode_pairs(encoder, pairs)
    check_known_tokens(cfg, tokenizer, train_pairs)
    if cfg.eval_data is not None:
        pairs, rep = pair_source(cfg.eval_data, cfg)
        reports.append(("eval", rep))
        eval_pairs = encode_pairs(encoder, pairs)
    meta_groups = None
    if cfg.meta_data is not None:
        groups, rep = meta_source(cfg.meta_data, cfg)
        reports.append(("meta", rep))
        meta_groups = [encoder.encode_group(g) for g in usable_meta_groups(groups, rep, cfg.meta_data)]
    if cfg.eval_every and not eval_pairs:
        raise ValueError("--eval-every needs eval pairs: pass --eval-data, or --eval-fraction to hold some out")
    shifted = None
    if isinstance(cfg.train_data, str) and cfg.train_data.startswith("synthetic") and isinstance(cfg.eval_data, str) \
            and cfg.eval_data != "synthetic:shifted":
        shifted = encode_pairs(encoder, pair_source("synthetic:shifted", cfg)[0][:256])
    return TrainData(train_pairs, eval_pairs, meta_groups, shifted_pairs=shifted, reports=reports)


def usable_meta_groups(groups, report, source) -> list:
    """The groups with two responses or more: J spreads the rewards of a prompt's responses apart, so
    a prompt with one response adds nothing to it. Those are counted in the load report; a meta set
    with none left is refused (MetaRM would silently train as vanilla)."""
    kept = [g for g in groups if len(g.responses) >= 2]
    single = len(groups) - len(kept)
    if single:
        report.skipped["filtered: prompt with one response (J needs two)"] += single
        report.loaded = len(kept)
    if not kept:
        raise ValueError(f"{describe_data(source)}: no prompt of the meta set has two responses or more ({report.summary()}); "
                         "the meta step's difference loss J compares the rewards of one prompt's responses, so each "
                         "prompt needs k >= 2 responses (metarm-fast sample --k 4 writes such a set)")
    return kept


def check_known_tokens(cfg, tokenizer, train_pairs, limit: float = 0.5) -> None:
    """Stop when most of the training text is unknown to the tokenizer (say, HH-RLHF through the
    synthetic task's 68-word vocabulary): such a run trains on <unk> tokens and reports numbers."""
    unk = tokenizer.unk_token_id
    if unk is None:
        return
    total = known = 0
    for it in train_pairs[:2000]:
        for seq in (it.seqs if isinstance(it, EncodedGroup) else (it.chosen, it.rejected)):
            ids = seq.prompt_ids + seq.response_ids
            total += len(ids)
            known += sum(1 for t in ids if t != unk)
    if total and (total - known) / total > limit:
        which = cfg.tokenizer or (f"{cfg.model}'s (the synthetic task's 68-word vocabulary)"
                                  if cfg.model == "tiny-llama" else cfg.model)
        raise ValueError(
            f"{describe_data(cfg.train_data)}: {(total - known) / total:.0%} of the tokens are unknown to the tokenizer {which}; "
            "pass --model with a pretrained reward model (its tokenizer comes with it), or --tokenizer with "
            "one that covers this text (e.g. --model tiny-llama --tokenizer <a pretrained tokenizer>)")
