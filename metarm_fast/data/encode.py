"""Tokenizing pairs and meta groups, truncating them, and collating sequences into a batch.

Every sequence is kept as (prompt_ids, response_ids); the reward is read at the last token of
response_ids, by position (``collate`` returns ``last_index``), never by looking for a pad id:
transformers' ``*ForSequenceClassification`` looks for the last non-pad id, which is one token early
when pad == eos and an eos ends the response.

Plain text: ``[bos] + prompt`` and ``response + [eos]`` (bos falls back to cls, eos to sep, as in
BERT). A chat prompt without a template is written out HH-style ("\\n\\nHuman: ...\\n\\nAssistant:").
With a chat template, the prompt is the template with the generation prompt, and the response is
what the full conversation adds after it (including the template's end-of-turn tokens).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from metarm_fast.data.records import MetaGroup, PreferencePair, Prompt

_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}
_HH_LABEL = {"user": "Human", "assistant": "Assistant", "system": "System"}


@dataclass
class EncodedSeq:
    prompt_ids: list[int]  # includes any BOS / chat-template prefix
    response_ids: list[int]  # includes any EOS / template suffix; the reward is read at its last token

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def hh_to_messages(prompt: str) -> list[dict]:
    """An HH transcript prompt ("\\n\\nHuman: ...\\n\\nAssistant:") -> chat messages.

    The empty assistant turn at the end is dropped (the template's generation prompt stands for it),
    consecutive turns of one role are merged (HH has a few; many templates insist on alternation),
    and text with no "Human:"/"Assistant:" turns is one user message."""
    parts = _TURN.split(prompt)
    msgs: list[dict] = []
    if parts[0].strip() or len(parts) == 1:
        msgs.append({"role": "user", "content": parts[0].strip()})
    for tag, content in zip(parts[1::2], parts[2::2]):
        role, content = _HH_ROLE[tag], content.strip()
        if msgs and msgs[-1]["role"] == role:
            msgs[-1]["content"] = f"{msgs[-1]['content']}\n\n{content}".strip()
        else:
            msgs.append({"role": role, "content": content})
    if len(msgs) > 1 and msgs[-1]["role"] == "assistant" and not msgs[-1]["content"]:
        msgs.pop()
    return msgs


def messages_to_hh(msgs: tuple[dict, ...] | list[dict]) -> str:
    """Chat messages -> an HH-style text prompt ending with "\\n\\nAssistant:" (for tokenizers without a template)."""
    turns = "".join(f"\n\n{_HH_LABEL.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in msgs)
    return turns + "\n\nAssistant:"


class Encoder:
    """Turns PreferencePairs and MetaGroups into EncodedSeqs of at most ``max_length`` tokens.

    chat_template: "auto" uses ``tokenizer.chat_template`` when it has one, else plain text;
    "never" always uses plain text; "always" requires a template.
    Truncation: the prompt loses tokens from its left (by the same amount for every response of a
    record, so they keep sharing it; a leading BOS stays); if a response alone is still too long,
    it loses tokens from its left too, so its end, where the reward is read, always survives.
    ``truncated`` counts records (pairs or groups) that lost any token, ``prompt_lost`` those of them
    that lost their whole prompt (a response rewarded with no context); ``encoded`` counts all.
    """

    def __init__(self, tokenizer, max_length: int, chat_template: str = "auto"):
        if chat_template not in ("auto", "never", "always"):
            raise ValueError(f"chat_template must be 'auto', 'never' or 'always', got {chat_template!r}")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if chat_template == "always" and not has_template:
            raise ValueError(
                "chat_template='always' but the tokenizer has no chat template; "
                "use 'auto' (plain text when there is none) or set tokenizer.chat_template"
            )
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.use_template = has_template and chat_template != "never"
        self.bos = _first_id(tokenizer, "bos_token_id", "cls_token_id")
        self.eos = _first_id(tokenizer, "eos_token_id", "sep_token_id")
        self.truncated = 0
        self.prompt_lost = 0  # records whose whole prompt (all but a BOS) was cut: rewarded without context
        self.encoded = 0

    def encode_pair(self, pair: PreferencePair) -> tuple[EncodedSeq, EncodedSeq]:
        """(chosen, rejected), sharing one (possibly truncated) prompt."""
        chosen, rejected = self._encode(pair.prompt, (pair.chosen, pair.rejected), pair.source)
        return chosen, rejected

    def encode_group(self, group: MetaGroup) -> list[EncodedSeq]:
        return self._encode(group.prompt, group.responses, group.source)

    # -- internals --------------------------------------------------------------------------------

    def _encode(self, prompt: Prompt, responses, source: str) -> list[EncodedSeq]:
        if self.use_template:
            p, rs = self._template(prompt, responses, source)
        else:
            p, rs = self._plain(prompt, responses)
        for r in rs:
            if not r:
                raise ValueError(f"{source}: a response encodes to no tokens (and the tokenizer has no eos/sep token)")
        had_prompt = len(p) > self._head(p)
        p, rs, cut = self._fit(p, rs)
        self.encoded += 1
        self.truncated += cut
        self.prompt_lost += had_prompt and len(p) <= self._head(p)
        return [EncodedSeq(list(p), r) for r in rs]

    def _tok(self, text: str) -> list[int]:
        # verbose=False: texts longer than the model's limit are expected here, we truncate ourselves.
        return list(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def _plain(self, prompt: Prompt, responses) -> tuple[list[int], list[list[int]]]:
        if isinstance(prompt, str):
            text = prompt
        else:
            text = messages_to_hh(prompt)
            # the rendered prompt ends with "Assistant:"; HH transcripts put a space after it
            responses = [r if r[:1].isspace() else " " + r for r in responses]
        p = ([self.bos] if self.bos is not None else []) + self._tok(text)
        tail = [self.eos] if self.eos is not None else []
        return p, [self._tok(r) + tail for r in responses]

    def _template(self, prompt: Prompt, responses, source: str) -> tuple[list[int], list[list[int]]]:
        msgs = hh_to_messages(prompt) if isinstance(prompt, str) else [dict(m) for m in prompt]
        p = self._apply(msgs, add_generation_prompt=True)
        rs = []
        for r in responses:
            full = self._apply(msgs + [{"role": "assistant", "content": r.strip()}], add_generation_prompt=False)
            if full[: len(p)] != p:
                at = next((i for i, (a, b) in enumerate(zip(p, full)) if a != b), min(len(p), len(full)))
                raise ValueError(
                    f"{source}: the chat template's tokens for the prompt (with the generation prompt) are not a "
                    f"prefix of its tokens for prompt + answer (they differ at token {at} of {len(p)}), so the "
                    "response cannot be told apart from the prompt; use chat_template='never' "
                    "(--chat-template never) to tokenize plain text instead"
                )
            rs.append(full[len(p):])
        return p, rs

    def _apply(self, msgs: list[dict], add_generation_prompt: bool) -> list[int]:
        # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True) unless
        # return_dict=False; accept either shape (and a batch of one) to be safe across versions.
        out = self.tokenizer.apply_chat_template(
            msgs, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
        )
        if isinstance(out, Mapping) or hasattr(out, "keys"):
            out = out["input_ids"]
        if hasattr(out, "tolist"):
            out = out.tolist()
        if out and isinstance(out[0], list):
            out = out[0]
        return list(out)

    def _head(self, p: list[int]) -> int:
        return 1 if self.bos is not None and p[:1] == [self.bos] else 0

    def _fit(self, p: list[int], rs: list[list[int]]) -> tuple[list[int], list[list[int]], bool]:
        longest = max(len(r) for r in rs)
        if len(p) + longest <= self.max_length:
            return p, rs, False
        head = self._head(p)
        keep = max(self.max_length - head - longest, 0)  # prompt tokens that fit beside the longest response
        p = p[:head] + (p[len(p) - keep:] if keep else [])
        cap = self.max_length - len(p)
        return p, [r[-cap:] if len(r) > cap else r for r in rs], True


def _first_id(tokenizer, *names: str) -> int | None:
    for name in names:
        v = getattr(tokenizer, name, None)
        if v is not None:
            return int(v)
    return None


def collate(seqs: list[EncodedSeq], pad_id: int | None, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad B sequences to the longest (T tokens) into a batch.

    Returns input_ids, attention_mask, position_ids (0..len-1 over the real tokens, 0 on pads, so a
    left-padded sequence gets the same positions as a right-padded one) and last_index (B,), the
    column of each sequence's last real token, where its reward is read. All are int64.
    A pad_id of None pads with 0: the pad value never matters, as nothing is found by looking for it.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if not seqs:
        raise ValueError("collate needs at least one sequence")
    lengths = [len(s) for s in seqs]
    if min(lengths) == 0:
        raise ValueError("collate got an empty sequence")
    pad = 0 if pad_id is None else int(pad_id)
    T = max(lengths)
    ids, mask, pos, last = [], [], [], []
    for s, n in zip(seqs, lengths):
        fill = T - n
        real = s.prompt_ids + s.response_ids
        if padding_side == "right":
            ids.append(real + [pad] * fill)
            mask.append([1] * n + [0] * fill)
            pos.append(list(range(n)) + [0] * fill)
            last.append(n - 1)
        else:
            ids.append([pad] * fill + real)
            mask.append([0] * fill + [1] * n)
            pos.append([0] * fill + list(range(n)))
            last.append(T - 1)
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),  # (B, T)
        "attention_mask": torch.tensor(mask, dtype=torch.long),  # (B, T)
        "position_ids": torch.tensor(pos, dtype=torch.long),  # (B, T)
        "last_index": torch.tensor(last, dtype=torch.long),  # (B,)
    }
