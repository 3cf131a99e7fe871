"""Optimising a synthetic policy against a reward: a policy gradient with a KL penalty, and best-of-n.

Both take a reward as a function ``reward_fn(prompts, responses) -> (B, k) tensor``: a trained
reward model (``RewardScorer``) or the task's true score (``true_reward``, the gold reference).

Policy gradient (REINFORCE): each step samples k responses to each of B fresh prompts, and ascends

    mean_b,i [ A_bi * log pi(y_bi | x_b) ]  -  kl_coef * mean_b KL(pi(.|x_b) || base(.|x_b))

with A_bi = r_bi - (mean of the other k - 1 rewards of the same prompt) (a leave-one-out baseline
that keeps the estimator unbiased) and the KL exact (``WordPolicy.kl_to_base``). Rewards are divided
by one fixed number per reward model, its standard deviation on base-policy samples, so that one
kl_coef means the same trade-off for every reward model (their scales are arbitrary).

Best-of-n: the response with the highest reward among n base-policy samples; its KL to the base is
log n - (n - 1) / n (the analytic value used for best-of-n by Gao, Schulman and Hilton, "Scaling Laws
for Reward Model Overoptimization", ICML 2023).
"""
from __future__ import annotations

import math
import random

import torch

from metarm_fast.data.records import MetaGroup
from metarm_fast.synthetic import SyntheticTask
from metarm_fast.synthetic_policy import WordPolicy, prompt_mask, sample_prompts


class RewardScorer:
    """Rewards of a trained ``RewardTrainer``'s model for prompts with k responses each, in batches."""

    def __init__(self, trainer, batch_sequences: int = 256):
        self.trainer = trainer
        self.batch_groups = max(1, batch_sequences // 4)

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[list[str]]) -> torch.Tensor:
        tr = self.trainer
        encoded = [tr.encoder.encode_group(MetaGroup(prompt=p, responses=tuple(rs))) for p, rs in zip(prompts, responses)]
        tr.rm.eval()
        out = []
        for i in range(0, len(encoded), self.batch_groups):
            out.append(tr.rm(tr.batcher.groups(encoded[i:i + self.batch_groups])).cpu())
        tr.rm.train()
        return torch.cat(out).view(len(prompts), -1)


def true_reward(task: SyntheticTask):
    def reward(prompts, responses):
        return torch.tensor([[task.score(p, r) for r in rs] for p, rs in zip(prompts, responses)])
    return reward


def mean_group_gap(rewards: torch.Tensor) -> torch.Tensor:
    """|r_i - r_j| for every pair of responses of the same prompt, flattened ((B, k) -> (B*k*(k-1)/2,))."""
    k = rewards.shape[1]
    iu = torch.triu_indices(k, k, offset=1)
    return (rewards[:, iu[0]] - rewards[:, iu[1]]).abs().flatten()


def policy_gradient(reward_fn, scale: float, task: SyntheticTask, curve_prompts: list[str], *, steps: int,
                    prompts_per_step: int, k: int, kl_coef: float, lr: float, seed: int, record_every: int):
    """Train a WordPolicy from the base; returns (policy, curve). The curve records, every
    ``record_every`` steps and at the end, the exact KL and exact true score on ``curve_prompts``."""
    policy = WordPolicy()
    opt = torch.optim.Adam(policy.params(), lr=lr)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    curve_mask = prompt_mask(curve_prompts)
    curve = []
    for step in range(steps + 1):
        if step % record_every == 0 or step == steps:
            with torch.no_grad():
                curve.append({"step": step, "kl": float(policy.kl_to_base(curve_mask).mean()),
                              "true": float(policy.expected_score(task, curve_mask).mean())})
        if step == steps:
            break
        prompts = sample_prompts(rng, prompts_per_step)
        responses, logp = policy.sample(prompts, k, gen)
        r = reward_fn(prompts, responses) / scale
        advantage = r - (r.sum(1, keepdim=True) - r) / (k - 1)
        loss = -(advantage * logp).mean() + kl_coef * policy.kl_to_base(prompt_mask(prompts)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return policy.frozen(), curve


def best_of_n_curve(rewards: torch.Tensor, true: torch.Tensor, ns: list[int]) -> list[dict]:
    """rewards, true: (P, N) for N base samples of P prompts. For each n (dividing N), the N / n
    disjoint groups of n samples pick their highest-reward response; returns its mean true score."""
    out = []
    P, N = rewards.shape
    for n in ns:
        g = N // n
        pick = rewards[:, :g * n].reshape(P, g, n).argmax(-1, keepdim=True)
        chosen = true[:, :g * n].reshape(P, g, n).gather(-1, pick)
        out.append({"n": n, "kl": math.log(n) - (n - 1) / n, "true": float(chosen.mean())})
    return out
