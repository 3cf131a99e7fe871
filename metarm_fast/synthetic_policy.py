"""A trainable policy for the embedded synthetic task, with its exact KL to the base and exact true score.

The synthetic task (``metarm_fast.synthetic``) samples response words i.i.d. given the prompt. This
policy keeps that shape and makes the word distribution a trainable softmax:

    p(w | prompt) proportional to exp(theta[w] + bonus * [w in prompt]),   length ~ uniform{3..10}

65 numbers in all: a logit per word and one weight on the task's in-prompt feature. theta = 0,
bonus = 0 is the task's base policy (BASE_LAMBDA = 0: uniform words); theta = lam * q, bonus =
lam * RELEVANCE is the task's tempered policy of temperature lam, so the task's own policies are
points of this family. The length distribution is not trained (it is the task's), which makes two
quantities exact rather than sampled:

- KL(policy || base) of a whole response = E[length] * sum_w p(w) log(p(w) / (1/64)): the lengths
  agree, so only the words contribute, and they are i.i.d.;
- the expected true score = sum_w p(w) (q(w) + RELEVANCE * [w in prompt]): the task's score is a
  mean over the response words, and the mean of i.i.d. words has the expectation of one word.

Everything random takes a ``torch.Generator``, so a run is a function of its seeds.
"""
from __future__ import annotations

import math
import random

import torch

from metarm_fast.data.records import MetaGroup, PreferencePair
from metarm_fast.synthetic import RELEVANCE, VOCAB, SyntheticTask

MIN_LEN, MAX_LEN = 3, 10  # the task's response lengths
MEAN_LEN = (MIN_LEN + MAX_LEN) / 2
_WORD_INDEX = {w: i for i, w in enumerate(VOCAB)}


def sample_prompts(rng: random.Random, n: int) -> list[str]:
    """n prompts from the task's prompt distribution (4-10 uniformly random words)."""
    return [" ".join(rng.choice(VOCAB) for _ in range(rng.randint(4, 10))) for _ in range(n)]


def prompt_mask(prompts: list[str]) -> torch.Tensor:
    """(B, 64) float: 1 where the word occurs in the prompt (the task's relevance feature)."""
    m = torch.zeros(len(prompts), len(VOCAB))
    for b, p in enumerate(prompts):
        for w in set(p.split()):
            m[b, _WORD_INDEX[w]] = 1.0
    return m


class WordPolicy:
    """p(w | prompt) = softmax(theta + bonus * mask); ``params()`` are what a policy gradient trains."""

    def __init__(self, theta: torch.Tensor | None = None, bonus: torch.Tensor | float = 0.0):
        self.theta = torch.zeros(len(VOCAB)) if theta is None else theta.detach().clone().float()
        self.bonus = torch.as_tensor(bonus, dtype=torch.float32).detach().clone().reshape(())

    @classmethod
    def tempered(cls, task: SyntheticTask, lam: float) -> "WordPolicy":
        """The task's own policy of temperature lam (lam = 0: the base policy)."""
        q = torch.tensor([task.quality[w] for w in VOCAB])
        return cls(lam * q, lam * RELEVANCE)

    def params(self) -> list[torch.Tensor]:
        self.theta.requires_grad_(True)
        self.bonus.requires_grad_(True)
        return [self.theta, self.bonus]

    def frozen(self) -> "WordPolicy":
        return WordPolicy(self.theta, self.bonus)

    def log_probs(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, 64) log p(w | prompt) for the prompts whose ``prompt_mask`` is ``mask``."""
        return torch.log_softmax(self.theta + self.bonus * mask, dim=-1)

    def kl_to_base(self, mask: torch.Tensor) -> torch.Tensor:
        """(B,) exact KL(policy || base) of a whole response, in nats (differentiable)."""
        lp = self.log_probs(mask)
        per_word = (lp.exp() * (lp + math.log(len(VOCAB)))).sum(-1)
        return MEAN_LEN * per_word

    def expected_score(self, task: SyntheticTask, mask: torch.Tensor) -> torch.Tensor:
        """(B,) the exact expected true score of a response to each prompt."""
        q = torch.tensor([task.quality[w] for w in VOCAB])
        return (self.log_probs(mask).exp() * (q + RELEVANCE * mask)).sum(-1)

    def sample(self, prompts: list[str], k: int, gen: torch.Generator) -> tuple[list[list[str]], torch.Tensor]:
        """k responses per prompt, and their log-probabilities (B, k), differentiable in ``params``."""
        mask = prompt_mask(prompts)
        lp = self.log_probs(mask)  # (B, 64)
        with torch.no_grad():
            words = torch.multinomial(lp.exp().repeat_interleave(k, 0), MAX_LEN, replacement=True, generator=gen)
            lengths = torch.randint(MIN_LEN, MAX_LEN + 1, (len(prompts) * k,), generator=gen)
        keep = (torch.arange(MAX_LEN)[None, :] < lengths[:, None]).float()  # (B*k, MAX_LEN)
        word_lp = lp.repeat_interleave(k, 0).gather(1, words)
        seq_lp = (word_lp * keep).sum(-1).view(len(prompts), k)
        texts = [" ".join(VOCAB[i] for i in row[:n]) for row, n in zip(words.tolist(), lengths.tolist())]
        return [texts[b * k:(b + 1) * k] for b in range(len(prompts))], seq_lp


def policy_groups(policy: WordPolicy, prompts: list[str], k: int, gen: torch.Generator,
                  source: str = "policy") -> list[MetaGroup]:
    """A meta set: each prompt with k unlabelled responses of ``policy``."""
    with torch.no_grad():
        responses, _ = policy.sample(prompts, k, gen)
    return [MetaGroup(prompt=p, responses=tuple(rs), source=f"{source}:record {i + 1}")
            for i, (p, rs) in enumerate(zip(prompts, responses))]


def policy_pairs(task: SyntheticTask, policy: WordPolicy, prompts: list[str], gen: torch.Generator,
                 source: str = "policy", tries: int = 8) -> list[PreferencePair]:
    """Labelled pairs of ``policy``'s responses, the true score deciding (as the task labels its own).

    Each prompt draws ``tries`` candidate responses and pairs the first two with different true
    scores; a prompt where all tie (a nearly deterministic policy) gives no pair, so the result can
    be shorter than ``prompts``, by the ties the policy itself makes."""
    with torch.no_grad():
        responses, _ = policy.sample(prompts, tries, gen)
    out = []
    for p, rs in zip(prompts, responses):
        first, s_first = rs[0], task.score(p, rs[0])
        for r in rs[1:]:
            s = task.score(p, r)
            if s != s_first:
                chosen, rejected = (first, r) if s_first > s else (r, first)
                out.append(PreferencePair(prompt=p, chosen=chosen, rejected=rejected,
                                          source=f"{source}:record {len(out) + 1}"))
                break
    return out
