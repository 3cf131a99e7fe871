"""Scoring with the model being trained: rewards of pairs and their metrics, and the meta set's
reward gaps (the paper's histograms)."""
from __future__ import annotations

import torch

from metarm_fast.batch import Batcher, EncodedPair
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


def evaluate_pairs(rm, batcher: Batcher, pairs: list[EncodedPair], batch_size: int) -> dict:
    return pair_metrics(*score_pairs(rm, batcher, pairs, batch_size))


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
