"""A trained reward model, loaded from its export folder, scoring (prompt, response) as training did.

    from metarm_fast import load_reward_model
    rm = load_reward_model("runs/my-rm")
    rm.score(["How do I boil an egg?"], ["Put it in boiling water for 8 minutes."])  # tensor([r])

Prompts are strings or chat-message lists; responses are strings. The encoding is the trainer's own
(``metarm_fast.data.Encoder``), with the settings the export recorded, so these rewards equal those of
``metarm-fast eval`` and of the training run's scoring.
"""
from __future__ import annotations

import torch

from metarm_fast.batch import meta_batch
from metarm_fast.data import Encoder, MetaGroup


class LoadedRewardModel:
    def __init__(self, model, tokenizer, *, max_length: int = 512, chat_template: str = "auto"):
        from metarm_fast.model import RewardModel

        self.hf, self.tokenizer = model, tokenizer
        self.rm = RewardModel(model)
        self.max_length, self.chat_template = max_length, chat_template

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @torch.no_grad()
    def score(self, prompts, responses, batch_size: int = 32) -> torch.Tensor:
        """Rewards (n,) in fp32 on the CPU of n (prompt, response) pairs. Longer than max_length, a pair
        loses the start of its prompt first, as in training."""
        if isinstance(prompts, str) or isinstance(responses, str):
            raise TypeError("score() takes lists: score([prompt, ...], [response, ...])")
        if len(prompts) != len(responses):
            raise ValueError(f"score(): {len(prompts)} prompts but {len(responses)} responses")
        enc = Encoder(self.tokenizer, self.max_length, chat_template=self.chat_template)
        out = []
        for i in range(0, len(prompts), batch_size):
            groups = [enc.encode_group(MetaGroup(p if isinstance(p, str) else tuple(p), (r,), f"pair {i + j}"))
                      for j, (p, r) in enumerate(zip(prompts[i : i + batch_size], responses[i : i + batch_size]))]
            batch = meta_batch(groups, "none", self.tokenizer.pad_token_id).to(self.device)
            out.append(self.rm(batch).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)


def load_reward_model(path: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                      max_length: int | None = None, chat_template: str | None = None) -> LoadedRewardModel:
    """The reward model exported to ``path`` (a metarm-fast export, or any *ForSequenceClassification
    folder with one output). max_length / chat_template default to what the export recorded."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from metarm_fast.model import ensure_pad_token, from_pretrained_checked

    tok = from_pretrained_checked("path", path, AutoTokenizer.from_pretrained)
    ensure_pad_token(tok)
    kw = {"dtype": dtype} if dtype is not None else {}
    model = from_pretrained_checked("path", path, AutoModelForSequenceClassification.from_pretrained, **kw)
    model.to(device).eval()
    recorded = getattr(model.config, "metarm_fast_encoding", None) or {}
    return LoadedRewardModel(model, tok, max_length=max_length or recorded.get("max_length", 512),
                             chat_template=chat_template or recorded.get("chat_template", "auto"))
