"""The synthetic word policy: its family holds the task's own policies, and its exact KL and exact
expected true score agree with sampling."""
from __future__ import annotations

import math
import random

import torch

from metarm_fast.synthetic import SyntheticTask
from metarm_fast.synthetic_policy import (WordPolicy, policy_groups, policy_pairs, prompt_mask,
                                          sample_prompts)


def test_base_policy_has_zero_kl_and_tempered_matches_the_task_weights():
    task = SyntheticTask(3)
    prompts = sample_prompts(random.Random(0), 4)
    mask = prompt_mask(prompts)
    assert torch.allclose(WordPolicy().kl_to_base(mask), torch.zeros(4), atol=1e-6)
    lam = 2.0
    p = WordPolicy.tempered(task, lam).log_probs(mask).exp()
    words = sorted(task.quality)
    for b, prompt in enumerate(prompts):
        w = torch.tensor([math.exp(lam * (task.quality[x] + 1.0 * (x in prompt.split()))) for x in words])
        torch.testing.assert_close(p[b], w / w.sum(), rtol=1e-5, atol=1e-7)


def test_exact_kl_and_score_agree_with_monte_carlo():
    task = SyntheticTask(1)
    policy = WordPolicy.tempered(task, 1.0)
    prompts = sample_prompts(random.Random(1), 2)
    responses, logp = policy.sample(prompts, 4000, torch.Generator().manual_seed(0))
    mask = prompt_mask(prompts)
    # KL of whole responses: E[log pi(y) - log base(y)]; the base gives each word 1/64.
    lengths = torch.tensor([[len(r.split()) for r in rs] for rs in responses], dtype=torch.float)
    mc_kl = (logp.detach() + lengths * math.log(64)).mean(1)
    torch.testing.assert_close(mc_kl, policy.kl_to_base(mask).detach(), rtol=0.05, atol=0.05)
    mc_score = torch.tensor([sum(task.score(p, r) for r in rs) / len(rs) for p, rs in zip(prompts, responses)])
    torch.testing.assert_close(mc_score, policy.expected_score(task, mask).detach(), rtol=0.03, atol=0.03)


def test_pairs_are_labelled_by_the_true_score_and_groups_have_k_responses():
    task = SyntheticTask(0)
    prompts = sample_prompts(random.Random(2), 20)
    gen = torch.Generator().manual_seed(1)
    pairs = policy_pairs(task, WordPolicy(), prompts, gen)
    assert len(pairs) == 20 and all(task.score(p.prompt, p.chosen) > task.score(p.prompt, p.rejected) for p in pairs)
    groups = policy_groups(WordPolicy(), prompts, 3, gen)
    assert [len(g.responses) for g in groups] == [3] * 20

