"""Scoring with the model being trained: rewards of pairs and their metrics, and the meta set's
reward gaps (the paper's histograms)."""
from __future__ import annotations

import torch

from metarm_fast.batch import Batcher, EncodedGroup, EncodedPair
from metarm_fast.steps import group_gaps


@torch.no_grad()
def score_pairs(rm, batcher: Batcher, pairs: list[EncodedPair], batch_size: int):
    """(chosen rewards, rejected rewards) on the CPU, the model in eval mode while it scores."""
    was_training = rm.training
    rm.eval()
    rc, rr = [], []
    for i in range(0, len(pairs), batch_size):
        items = pairs[i : i + batch_size]
        r = rm(batcher.pairs(items))
        rc.append(r[: len(items)])
        rr.append(r[len(items) :])
    rm.train(was_training)
    return torch.cat(rc).cpu(), torch.cat(rr).cpu()


def pair_metrics(rc: torch.Tensor, rr: torch.Tensor) -> dict:
    all_r = torch.cat([rc, rr]).double()
    return {
        "pairs": int(rc.numel()),
        "accuracy": float((rc > rr).double().mean()),
        "loss": float(-torch.nn.functional.logsigmoid((rc - rr).double()).mean()),  # Bradley-Terry, no margin
        "reward_gap_mean": float((rc - rr).double().mean()),
        "reward_mean": float(all_r.mean()),
        "reward_std": float(all_r.std()) if all_r.numel() > 1 else 0.0,
    }


def evaluate_pairs(rm, batcher: Batcher, items: list, batch_size: int) -> dict:
    """Metrics of preference pairs, or of k-response records (EncodedGroups: ``group_metrics``)."""
    if items and isinstance(items[0], EncodedGroup):
        rewards = score_groups(rm, batcher, [it.seqs for it in items], batch_size)
        return group_metrics(rewards, [it.scores for it in items])
    return pair_metrics(*score_pairs(rm, batcher, items, batch_size))


@torch.no_grad()
def score_groups(rm, batcher: Batcher, groups, batch_size: int) -> list[torch.Tensor]:
    """The rewards of each group's sequences (one CPU tensor per group), the model in eval mode."""
    was_training = rm.training
    rm.eval()
    out = []
    for i in range(0, len(groups), batch_size):
        batch = batcher.groups(groups[i : i + batch_size])
        r = rm(batch).float().cpu()
        offs = batch.offsets.tolist()
        out += [r[a:b] for a, b in zip(offs[:-1], offs[1:])]
    rm.train(was_training)
    return out


def group_metrics(rewards: list[torch.Tensor], scores: list) -> dict:
    """k-response records: ``accuracy`` over every ordered pair of different scores (the reward of the
    better one strictly higher), ``best_of_k`` (the top-rewarded response is one of the top-scored:
    ties for the top reward share the credit, 1/m each of the m tied), the Bradley-Terry loss over the
    pairs, and the reward mean/std over every response."""
    right = pairs = 0
    best = 0.0
    losses = []
    for r, s in zip(rewards, scores):
        r, s = r.double(), torch.tensor(s, dtype=torch.float64)
        better = s[:, None] > s[None, :]
        right += int((better & (r[:, None] > r[None, :])).sum())
        pairs += int(better.sum())
        losses.append(-torch.nn.functional.logsigmoid((r[:, None] - r[None, :])[better]))
        top = r == r.max()
        best += float((top & (s == s.max())).sum()) / float(top.sum())
    all_r = torch.cat(rewards).double()
    return {
        "groups": len(rewards),
        "pairs": pairs,
        "accuracy": right / max(pairs, 1),
        "best_of_k": best / max(len(rewards), 1),
        "loss": float(torch.cat(losses).mean()) if pairs else 0.0,
        "reward_mean": float(all_r.mean()),
        "reward_std": float(all_r.std()) if all_r.numel() > 1 else 0.0,
    }


@torch.no_grad()
def meta_gaps(rm, batcher: Batcher, groups, batch_size: int, max_groups: int = 256) -> torch.Tensor:
    """|r_i - r_j| over every pair of responses of the same prompt, for the first ``max_groups`` groups."""
    was_training = rm.training
    rm.eval()
    gaps = []
    n = min(len(groups), max_groups)
    for i in range(0, n, batch_size):
        batch = batcher.groups(groups[i : min(i + batch_size, n)])
        gaps.append(group_gaps(rm(batch), batch.offsets).cpu())
    rm.train(was_training)
    return torch.cat(gaps)
