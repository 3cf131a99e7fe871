"""The embedded synthetic preference task: offline, deterministic, with a computable true preference.

Words are `w00`..`w63`. Every word w has a hidden quality q(w) ~ N(0, 1) drawn from the task's seed.
A prompt is 4-10 random words; a response is 3-10 words. The true quality of a response is

    score(prompt, response) = mean_{w in response} q(w) + RELEVANCE * (fraction of response words in the prompt)

so a reward model has to read both the response and its prompt. A "policy" of temperature lambda samples
each response word with probability proportional to exp(lambda * (q(w) + RELEVANCE * [w in prompt])):

- the preference data comes from the base policy (lambda = BASE_LAMBDA): varied responses, and the
  label of a pair is the true preference (higher score is chosen; exact ties are re-drawn);
- the *shifted* distribution comes from a better policy (lambda = SHIFTED_LAMBDA): its responses are
  better on average and closer to each other in quality -- the situation MetaRM is built for. It gives
  the meta set (a prompt and k unlabelled responses) and a labelled shifted eval set, on which the
  accuracy of a reward model on the policy's own distribution can be measured.

Records carry a `source` like "synthetic:train:record 17" so that errors and reports can name them.
"""
from __future__ import annotations

import random

from metarm_fast.data.records import MetaGroup, PreferencePair

VOCAB = [f"w{i:02d}" for i in range(64)]
RELEVANCE = 1.0
BASE_LAMBDA = 0.0
SHIFTED_LAMBDA = 2.0
SPECIAL_TOKENS = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>"}
# Sizes of the embedded default's splits.
SPLIT_SIZES = {"train": 4096, "eval": 512, "shifted": 512, "meta": 1024}
# Each split draws from its own stream so that, e.g., growing the train split leaves eval unchanged.
_SPLIT_SEED_OFFSET = {"train": 1, "eval": 2, "shifted": 3, "meta": 4}


class SyntheticTask:
    def __init__(self, seed: int = 0):
        rng = random.Random(seed)
        self.seed = seed
        self.quality = {w: rng.gauss(0.0, 1.0) for w in VOCAB}

    # -- the true preference -------------------------------------------------------------------
    def score(self, prompt: str, response: str) -> float:
        words = response.split()
        in_prompt = set(prompt.split())
        mean_q = sum(self.quality[w] for w in words) / len(words)
        return mean_q + RELEVANCE * sum(w in in_prompt for w in words) / len(words)

    # -- sampling --------------------------------------------------------------------------------
    def _prompt(self, rng: random.Random) -> str:
        return " ".join(rng.choice(VOCAB) for _ in range(rng.randint(4, 10)))

    def _response(self, rng: random.Random, prompt: str, lam: float) -> str:
        in_prompt = set(prompt.split())
        weights = [pow(2.718281828459045, lam * (self.quality[w] + RELEVANCE * (w in in_prompt))) for w in VOCAB]
        return " ".join(rng.choices(VOCAB, weights=weights, k=rng.randint(3, 10)))

    def _pair(self, rng: random.Random, lam: float, source: str) -> PreferencePair:
        prompt = self._prompt(rng)
        while True:
            a, b = self._response(rng, prompt, lam), self._response(rng, prompt, lam)
            sa, sb = self.score(prompt, a), self.score(prompt, b)
            if a != b and sa != sb:
                break
        chosen, rejected = (a, b) if sa > sb else (b, a)
        return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, source=source)

    def pairs(self, split: str = "train", n: int | None = None) -> list[PreferencePair]:
        """Labelled pairs: split "train"/"eval" from the base policy, "shifted" from the better one."""
        if split not in ("train", "eval", "shifted"):
            raise ValueError(f"synthetic pairs: unknown split {split!r} (train, eval, shifted)")
        n = SPLIT_SIZES[split] if n is None else n
        rng = random.Random(self.seed * 1000 + _SPLIT_SEED_OFFSET[split])
        lam = SHIFTED_LAMBDA if split == "shifted" else BASE_LAMBDA
        return [self._pair(rng, lam, f"synthetic:{split}:record {i + 1}") for i in range(n)]

    def meta_groups(self, m: int | None = None, k: int = 5) -> list[MetaGroup]:
        """The meta set: m prompts, each with k unlabelled responses from the shifted policy."""
        m = SPLIT_SIZES["meta"] if m is None else m
        rng = random.Random(self.seed * 1000 + _SPLIT_SEED_OFFSET["meta"])
        groups = []
        for i in range(m):
            prompt = self._prompt(rng)
            responses = tuple(self._response(rng, prompt, SHIFTED_LAMBDA) for _ in range(k))
            groups.append(MetaGroup(prompt=prompt, responses=responses, source=f"synthetic:meta:record {i + 1}"))
        return groups

    # -- tokenizer -------------------------------------------------------------------------------
    def tokenizer(self):
        """A word-level fast tokenizer over the task's vocabulary, built offline."""
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        specials = list(SPECIAL_TOKENS.values())
        vocab = {tok: i for i, tok in enumerate(specials + VOCAB)}
        core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk"]))
        core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return PreTrainedTokenizerFast(
            tokenizer_object=core,
            pad_token=SPECIAL_TOKENS["pad"],
            unk_token=SPECIAL_TOKENS["unk"],
            bos_token=SPECIAL_TOKENS["bos"],
            eos_token=SPECIAL_TOKENS["eos"],
        )


def gap_stats(task: SyntheticTask, groups: list[MetaGroup]) -> float:
    """Mean absolute true-score gap between responses of the same prompt (how hard a set is)."""
    gaps = []
    for g in groups:
        s = [task.score(g.prompt, r) for r in g.responses]
        gaps += [abs(a - b) for i, a in enumerate(s) for b in s[i + 1:]]
    return sum(gaps) / max(len(gaps), 1)
