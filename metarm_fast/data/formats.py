"""Record formats: detecting a format from a record's fields, and turning records into pairs or groups.

Every check raises a DataError (``records.bad_record``) naming the record's location and the field,
with a short ``reason`` that a skipping load counts. Each format is a small class with
``convert(record, loc) -> list`` (one record in, zero or more items out) and ``finish(bad) -> list``
for formats that need the whole source first (oasst builds message trees).

Formats
-------
explicit   {"prompt", "chosen", "rejected", "margin"?}. Strings, or TRL-style chat message lists:
           a prompt list with chosen/rejected each the assistant message(s); or no prompt and
           chosen/rejected whole conversations whose common prefix is the prompt (conversations
           that begin by repeating the given prompt are recognised too).
hh-rlhf    {"chosen", "rejected"}: whole "\\n\\nHuman: ...\\n\\nAssistant: ..." transcripts. The prompt is
           everything up to and including the last "\\n\\nAssistant:", which both must share; the
           response is the rest, kept verbatim (usually with its leading space), so that
           prompt + chosen is the chosen transcript.
summarize  OpenAI summarize_from_feedback comparisons: {"info", "summaries", "choice"}.
pku        PKU-SafeRLHF: {"prompt", "response_0", "response_1", "better_response_id", "safer_response_id"}.
oasst      oasst1 message rows: {"message_id", "parent_id", "role", "text", "rank"}; deleted messages
           and those that failed review are left out with their replies unless oasst_keep_flagged,
           and oasst_lang keeps one language (rows' "lang"); each left-out row is counted.
meta       the meta set: {"prompt", "responses": [k strings]}.
prompts    {"prompt"} only (load_prompts); "text" is a .txt file with one prompt a line.
"""
from __future__ import annotations

from collections import Counter

import math
from dataclasses import dataclass
from typing import Callable

from metarm_fast.data.records import DataError, MetaGroup, PreferencePair, Prompt, RankedGroup, bad_record

ASSISTANT_TAG = "\n\nAssistant:"
HUMAN_TAG = "\n\nHuman:"

# Formats of k-response records, read as RankedGroups (trained as groups, evaluated pair by pair).
RANKED_FORMATS = ("ranked", "ultrafeedback", "nectar", "chosen-rejected-lists")
PAIR_FORMATS = ("explicit", "implicit", "hh-rlhf", "summarize", "pku", "oasst", "helpsteer3") + RANKED_FORMATS
META_FORMATS = ("meta",)
PROMPT_FORMATS = PAIR_FORMATS + META_FORMATS + ("prompts", "text")

# Messages keep only these two keys: templates need nothing else, and a plain dict compares simply.
_ROLES_OASST = {"prompter": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class Loc:
    """Where a record is: "train.jsonl:line 7", "x.parquet:record 3", "x.json:record 2 (line 5)"."""

    origin: str  # the file as given, or "hub-name[split]"
    unit: str  # "line" or "record"
    n: int  # 1-based
    line: int | None = None  # JSON arrays: the line the record starts on

    def __str__(self) -> str:
        s = f"{self.origin}:{self.unit} {self.n}"
        return s if self.line is None else f"{s} (line {self.line})"


# -- field checks ---------------------------------------------------------------------------------


def _type_name(v: object) -> str:
    return "null" if v is None else type(v).__name__


def need(rec: dict, key: str, loc: Loc) -> object:
    """rec[key], or a "missing field" error listing the fields the record does have."""
    if key not in rec or rec[key] is None:
        have = ", ".join(sorted(map(str, rec))) or "none"
        what = "is missing" if key not in rec else "is null"
        raise bad_record(str(loc), key, f"{what} (the record's fields: {have})", "missing field")
    return rec[key]


def text(value: object, loc: Loc, field: str) -> str:
    if not isinstance(value, str):
        raise bad_record(str(loc), field, f"expected a string, got {_type_name(value)}", "wrong-type field")
    return value


def response(value: object, loc: Loc, field: str) -> str:
    """A response: a string with something in it besides whitespace."""
    s = text(value, loc, field)
    if not s.strip():
        raise bad_record(str(loc), field, f"the response is empty ({s!r})", "empty response")
    return s


def different(chosen: str, rejected: str, loc: Loc, field: str) -> None:
    # Compared without surrounding whitespace: " Yes" and "Yes" teach a reward model nothing.
    if chosen.strip() == rejected.strip():
        raise bad_record(
            str(loc), field, f"the two responses are identical ({_short(chosen)}), so the pair carries no preference",
            "identical responses",
        )


def integer(value: object, loc: Loc, field: str, allowed: tuple[int, ...] | None = None) -> int:
    if isinstance(value, float) and value.is_integer():  # parquet/pandas may store ids as floats
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_record(str(loc), field, f"expected an integer, got {_type_name(value)}", "wrong-type field")
    if allowed is not None and value not in allowed:
        raise bad_record(str(loc), field, f"expected one of {list(allowed)}, got {value}", "bad value")
    return value


def messages(value: object, loc: Loc, field: str) -> list[dict]:
    """A chat message list -> [{"role": str, "content": str}, ...] (other keys dropped)."""
    if not isinstance(value, list):
        raise bad_record(str(loc), field, f"expected a list of chat messages, got {_type_name(value)}", "wrong-type field")
    out = []
    for i, m in enumerate(value):
        f = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise bad_record(str(loc), f, f"expected a message {{'role', 'content'}}, got {_type_name(m)}", "wrong-type field")
        for key in ("role", "content"):
            if m.get(key) is None:
                raise bad_record(str(loc), f"{f}.{key}", "is missing", "missing field")
            text(m[key], loc, f"{f}.{key}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def prompt_value(value: object, loc: Loc, field: str = "prompt") -> Prompt:
    """A prompt: a string, or a non-empty list of chat messages (returned as a tuple)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        msgs = messages(value, loc, field)
        if not msgs:
            raise bad_record(str(loc), field, "the message list is empty", "empty prompt")
        return tuple(msgs)
    raise bad_record(str(loc), field, f"expected a string or a list of chat messages, got {_type_name(value)}", "wrong-type field")


def _short(s: str, n: int = 40) -> str:
    s = s.strip()
    return repr(s if len(s) <= n else s[: n - 3] + "...")


# -- formats -------------------------------------------------------------------------------------


class Format:
    name = ""
    # Records left out on purpose by a filter of the format (reason -> count): reported, not bad.
    filtered: Counter

    def __init__(self) -> None:
        self.filtered = Counter()

    def convert(self, rec: dict, loc: Loc) -> list:
        raise NotImplementedError

    def finish(self, bad: Callable[[DataError], None]) -> list:
        return []


class Explicit(Format):
    name = "explicit"

    def convert(self, rec: dict, loc: Loc) -> list[PreferencePair]:
        c_v, r_v = need(rec, "chosen", loc), need(rec, "rejected", loc)
        p_v = rec.get("prompt")
        margin = self._margin(rec, loc)
        if isinstance(c_v, str) or isinstance(r_v, str):
            if p_v is None:
                need(rec, "prompt", loc)  # raises: string responses need a prompt
            prompt = prompt_value(p_v, loc)
            chosen = response(c_v, loc, "chosen")
            rejected = response(r_v, loc, "rejected")
        else:
            prompt, chosen, rejected = self._conversations(p_v, c_v, r_v, loc)
        different(chosen, rejected, loc, "rejected")
        return [PreferencePair(prompt, chosen, rejected, margin, str(loc))]

    @staticmethod
    def _margin(rec: dict, loc: Loc) -> float | None:
        m = rec.get("margin")
        if m is None:
            return None
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
            raise bad_record(str(loc), "margin", f"expected a finite number, got {m!r}", "wrong-type field")
        return float(m)

    @staticmethod
    def _conversations(p_v, c_v, r_v, loc: Loc) -> tuple[Prompt, str, str]:
        """Message-list chosen/rejected: the prompt is the given prompt plus whatever the two share;
        what is left of each must be exactly one assistant message."""
        head: list[dict] = []
        if p_v is not None:
            p = prompt_value(p_v, loc)
            head = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
        c = messages(c_v, loc, "chosen")
        r = messages(r_v, loc, "rejected")
        for field, m in (("chosen", c), ("rejected", r)):
            if not m:
                raise bad_record(str(loc), field, "the message list is empty", "empty response")
        if head and c[: len(head)] == head and r[: len(head)] == head:
            head = []  # whole conversations that repeat the prompt (as in ultrafeedback_binarized)
        k = 0
        while k < min(len(c), len(r)) - 1 and c[k] == r[k]:
            k += 1
        for field, m in (("chosen", c), ("rejected", r)):
            rest = m[k:]
            if len(rest) != 1 or rest[0]["role"] != "assistant":
                got = ", ".join(x["role"] for x in rest)
                raise bad_record(
                    str(loc), field,
                    f"after the messages it shares with the other response, expected one assistant message, got [{got}]",
                    "bad message list",
                )
        prompt = tuple(head + c[:k])
        if not prompt:
            raise bad_record(str(loc), "prompt", "no prompt field and no messages shared by chosen and rejected", "missing field")
        chosen = response(c[k]["content"], loc, f"chosen[{k}].content")
        rejected = response(r[k]["content"], loc, f"rejected[{k}].content")
        return prompt, chosen, rejected


def split_hh(transcript: str, loc: Loc, field: str) -> tuple[str, str]:
    """An HH transcript -> (prompt up to and including the last "\\n\\nAssistant:", response)."""
    i = transcript.rfind(ASSISTANT_TAG)
    if i < 0:
        raise bad_record(str(loc), field, 'the transcript has no "\\n\\nAssistant:" turn', "missing assistant turn")
    cut = i + len(ASSISTANT_TAG)
    return transcript[:cut], transcript[cut:]


class HH(Format):
    name = "hh-rlhf"

    def convert(self, rec: dict, loc: Loc) -> list[PreferencePair]:
        c_t = text(need(rec, "chosen", loc), loc, "chosen")
        r_t = text(need(rec, "rejected", loc), loc, "rejected")
        prompt, chosen = split_hh(c_t, loc, "chosen")
        r_prompt, rejected = split_hh(r_t, loc, "rejected")
        response(chosen, loc, "chosen")
        response(rejected, loc, "rejected")
        if prompt != r_prompt:
            at = next((i for i, (a, b) in enumerate(zip(prompt, r_prompt)) if a != b), min(len(prompt), len(r_prompt)))
            raise bad_record(
                str(loc), "rejected",
                f'the transcript differs from chosen before its last "\\n\\nAssistant:" (first difference at '
                f"character {at}), so the two do not share a prompt",
                "prompt mismatch",
            )
        different(chosen, rejected, loc, "rejected")
        return [PreferencePair(prompt, chosen, rejected, None, str(loc))]


class Implicit(Format):
    """TRL's implicit-prompt format with plain strings: ``chosen`` and ``rejected`` are whole texts,
    the prompt is what they share at the start (cut back to the last whitespace, so that a word the two
    responses happen to begin alike stays in the responses)."""

    name = "implicit"

    def convert(self, rec: dict, loc: Loc) -> list[PreferencePair]:
        c_t = text(need(rec, "chosen", loc), loc, "chosen")
        r_t = text(need(rec, "rejected", loc), loc, "rejected")
        n = 0
        for a, b in zip(c_t, r_t):
            if a != b:
                break
            n += 1
        if n < min(len(c_t), len(r_t)):
            while n > 0 and not c_t[n - 1].isspace():
                n -= 1
        if n == 0:
            raise bad_record(str(loc), "rejected", "chosen and rejected share no prompt at their start (implicit-prompt "
                             "format); give the prompt in a 'prompt' field", "no shared prompt")
        prompt = c_t[:n]
        chosen, rejected = response(c_t[n:], loc, "chosen"), response(r_t[n:], loc, "rejected")
        different(chosen, rejected, loc, "rejected")
        return [PreferencePair(prompt, chosen, rejected, None, str(loc))]


class Summarize(Format):
    """The prompt follows the Reddit TL;DR layout of "Learning to summarize from human feedback":
    "SUBREDDIT: r/<subreddit>\\nTITLE: <title>\\nPOST: <post>\\nTL;DR:"; news items (post null) use
    "ARTICLE: <article>". The summaries are kept verbatim (they usually begin with a space)."""

    name = "summarize"

    def convert(self, rec: dict, loc: Loc) -> list[PreferencePair]:
        info = need(rec, "info", loc)
        if not isinstance(info, dict):
            raise bad_record(str(loc), "info", f"expected an object, got {_type_name(info)}", "wrong-type field")
        lines = []
        for key, label in (("subreddit", "SUBREDDIT: r/"), ("title", "TITLE: ")):
            v = info.get(key)
            if v is not None and text(v, loc, f"info.{key}").strip():
                lines.append(label + v.strip())
        post, article = info.get("post"), info.get("article")
        if post is not None and text(post, loc, "info.post").strip():
            lines.append("POST: " + post.strip())
        elif article is not None and text(article, loc, "info.article").strip():
            lines.append("ARTICLE: " + article.strip())
        else:
            raise bad_record(str(loc), "info.post", "neither info.post nor info.article holds any text", "missing field")
        prompt = "\n".join(lines) + "\nTL;DR:"

        summaries = need(rec, "summaries", loc)
        if not isinstance(summaries, list) or len(summaries) != 2:
            got = f"{len(summaries)} items" if isinstance(summaries, list) else _type_name(summaries)
            raise bad_record(str(loc), "summaries", f"expected a list of two summaries, got {got}", "wrong-type field")
        texts = []
        for i, s in enumerate(summaries):
            field = f"summaries[{i}]"
            if not isinstance(s, dict):
                raise bad_record(str(loc), field, f"expected an object, got {_type_name(s)}", "wrong-type field")
            if s.get("text") is None:
                raise bad_record(str(loc), f"{field}.text", "is missing", "missing field")
            texts.append(response(s["text"], loc, f"{field}.text"))
        choice = integer(need(rec, "choice", loc), loc, "choice", (0, 1))
        chosen, rejected = texts[choice], texts[1 - choice]
        different(chosen, rejected, loc, "summaries")
        return [PreferencePair(prompt, chosen, rejected, None, str(loc))]


class PKU(Format):
    name = "pku"

    def __init__(self, preference: str = "better"):
        super().__init__()
        self.id_field = f"{preference}_response_id"

    def convert(self, rec: dict, loc: Loc) -> list[PreferencePair]:
        prompt = prompt_value(need(rec, "prompt", loc), loc)
        r = [response(need(rec, f"response_{i}", loc), loc, f"response_{i}") for i in (0, 1)]
        best = integer(need(rec, self.id_field, loc), loc, self.id_field, (0, 1))
        different(r[0], r[1], loc, "response_1")
        return [PreferencePair(prompt, r[best], r[1 - best], None, str(loc))]


def _number(value: object, loc: Loc, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_record(str(loc), field, f"expected a finite number, got {value!r}", "wrong-type field")
    return float(value)


class _Ranked(Format):
    """Common to the k-response formats: a group needs two responses of different levels."""

    def group(self, prompt, responses: list[str], scores: list[float], loc: Loc) -> list[RankedGroup]:
        if len(set(scores)) < 2:
            self.filtered["fewer than two distinct scores"] += 1
            return []
        return [RankedGroup(prompt, tuple(responses), tuple(scores), str(loc))]

    @staticmethod
    def _list(rec: dict, key: str, loc: Loc) -> list:
        v = need(rec, key, loc)
        if not isinstance(v, list):
            raise bad_record(str(loc), key, f"expected a list, got {_type_name(v)}", "wrong-type field")
        return v


class Ranked(_Ranked):
    """``{"prompt", "responses": [...], "scores": [...]}`` (higher better) or ``"ranks": [...]`` (1 best)."""

    name = "ranked"

    def convert(self, rec: dict, loc: Loc) -> list[RankedGroup]:
        prompt = prompt_value(need(rec, "prompt", loc), loc)
        rs = [response(r, loc, f"responses[{i}]") for i, r in enumerate(self._list(rec, "responses", loc))]
        key = "scores" if "scores" in rec else "ranks"
        vals = [_number(v, loc, f"{key}[{i}]") for i, v in enumerate(self._list(rec, key, loc))]
        if len(vals) != len(rs):
            raise bad_record(str(loc), key, f"{len(vals)} {key} for {len(rs)} responses", "length mismatch")
        return self.group(prompt, rs, vals if key == "scores" else [-v for v in vals], loc)


class UltraFeedback(_Ranked):
    """UltraFeedback's raw layout: ``instruction``, ``completions`` of ``{"response", "overall_score"}``."""

    name = "ultrafeedback"

    def convert(self, rec: dict, loc: Loc) -> list[RankedGroup]:
        prompt = prompt_value(need(rec, "instruction", loc), loc, "instruction")
        rs, scores = [], []
        for i, c in enumerate(self._list(rec, "completions", loc)):
            if not isinstance(c, dict):
                raise bad_record(str(loc), f"completions[{i}]", f"expected an object, got {_type_name(c)}", "wrong-type field")
            rs.append(response(need(c, "response", loc), loc, f"completions[{i}].response"))
            scores.append(_number(need(c, "overall_score", loc), loc, f"completions[{i}].overall_score"))
        return self.group(prompt, rs, scores, loc)


class Nectar(_Ranked):
    """Nectar's layout: ``prompt`` (an HH-style transcript), ``answers`` of ``{"answer", "rank"}`` (1 best)."""

    name = "nectar"

    def convert(self, rec: dict, loc: Loc) -> list[RankedGroup]:
        prompt = prompt_value(need(rec, "prompt", loc), loc)
        rs, scores = [], []
        for i, a in enumerate(self._list(rec, "answers", loc)):
            if not isinstance(a, dict):
                raise bad_record(str(loc), f"answers[{i}]", f"expected an object, got {_type_name(a)}", "wrong-type field")
            rs.append(response(need(a, "answer", loc), loc, f"answers[{i}].answer"))
            scores.append(-_number(need(a, "rank", loc), loc, f"answers[{i}].rank"))
        return self.group(prompt, rs, scores, loc)


class ChosenRejectedLists(_Ranked):
    """``prompt``, ``chosen`` and ``rejected`` as lists of response strings (RewardBench 2's shape):
    every chosen response is better than every rejected one; those within a list are ties."""

    name = "chosen-rejected-lists"

    def convert(self, rec: dict, loc: Loc) -> list[RankedGroup]:
        prompt = prompt_value(need(rec, "prompt", loc), loc)
        c = [response(r, loc, f"chosen[{i}]") for i, r in enumerate(self._list(rec, "chosen", loc))]
        r = [response(x, loc, f"rejected[{i}]") for i, x in enumerate(self._list(rec, "rejected", loc))]
        return self.group(prompt, c + r, [1.0] * len(c) + [0.0] * len(r), loc)


class HelpSteer3(Format):
    """HelpSteer3's preference records: ``context`` (chat messages, or a string), ``response1``,
    ``response2`` and ``overall_preference`` in -3..3, negative when response1 is the better one. The
    sign picks the pair; 0 is a tie, which carries no preference and is counted, not trained on. With
    ``margin``, |overall_preference| is the pair's Bradley-Terry margin."""

    name = "helpsteer3"

    def __init__(self, margin: bool = False):
        super().__init__()
        self.margin = margin

    def convert(self, rec: dict, loc: Loc) -> list[PreferencePair]:
        prompt = prompt_value(need(rec, "context", loc), loc, "context")
        r1 = response(need(rec, "response1", loc), loc, "response1")
        r2 = response(need(rec, "response2", loc), loc, "response2")
        pref = integer(need(rec, "overall_preference", loc), loc, "overall_preference", tuple(range(-3, 4)))
        if pref == 0:
            self.filtered["a tie (overall_preference 0)"] += 1
            return []
        chosen, rejected = (r1, r2) if pref < 0 else (r2, r1)
        different(chosen, rejected, loc, "response2")
        return [PreferencePair(prompt, chosen, rejected, float(abs(pref)) if self.margin else None, str(loc))]


@dataclass
class _Message:
    loc: Loc
    parent_id: str | None
    role: str  # "user" or "assistant"
    text: str
    rank: int | None
    usable: bool  # False for a ranked assistant reply with no text (reported when read)
    kept: bool = True  # False when a filter (deleted, review, language) leaves it and its subtree out


class Oasst(Format):
    """oasst1 flat message rows -> pairs.

    The rows are gathered into trees (by parent_id). For every message, its assistant replies
    that carry a rank (0 = best) are compared two by two: each two siblings with different ranks
    make one pair, the lower rank chosen (3 ranked siblings give 3 pairs; equal ranks give none).
    The prompt is the conversation from the tree's root down to that parent, as chat messages,
    with role "prompter" renamed "user". Ranked prompter replies are not used (they are the
    human side of the conversation). A ranked reply with empty text is a bad record (reported
    when its row is read); the row still stays in the tree as context for its descendants.
    """

    name = "oasst"

    def __init__(self, lang: str | None = None, keep_flagged: bool = False) -> None:
        super().__init__()
        self.lang, self.keep_flagged = lang, keep_flagged
        self.rows: dict[str, _Message] = {}
        self.read_all = True  # set False by the reader when max_records cut the source short

    def convert(self, rec: dict, loc: Loc) -> list:
        mid = text(need(rec, "message_id", loc), loc, "message_id")
        if mid in self.rows:
            raise bad_record(str(loc), "message_id", f"{mid!r} was already used at {self.rows[mid].loc}", "duplicate id")
        parent = rec.get("parent_id")
        if parent is not None:
            text(parent, loc, "parent_id")
        role = text(need(rec, "role", loc), loc, "role")
        if role not in _ROLES_OASST:
            raise bad_record(str(loc), "role", f"expected 'prompter' or 'assistant', got {role!r}", "bad value")
        body = text(need(rec, "text", loc), loc, "text")
        rank = rec.get("rank")
        if isinstance(rank, float) and math.isnan(rank):  # pandas' null
            rank = None
        if rank is not None:
            rank = integer(rank, loc, "rank")
        usable = not (role == "assistant" and rank is not None and not body.strip())
        why = self._filter(rec)
        if why:
            self.filtered[why] += 1
        self.rows[mid] = _Message(loc, parent, _ROLES_OASST[role], body, rank, usable and not why, not why)
        if why:
            return []
        if not usable:
            response(body, loc, "text")  # raises "empty response" for this reply
        return []

    def _filter(self, rec: dict) -> str | None:
        """Why a message is left out (with its replies): deleted, failed review, another language."""
        if not self.keep_flagged:
            if rec.get("deleted") is True:
                return "deleted message"
            if rec.get("review_result") is False:
                return "failed review"
        if self.lang is not None and rec.get("lang") != self.lang:
            return f"language other than {self.lang}"
        return None

    def _below_filtered(self, mid: str | None) -> bool:
        seen = set()
        while mid is not None and mid not in seen:
            seen.add(mid)
            m = self.rows.get(mid)
            if m is None:
                return False  # a missing parent is reported by _conversation
            if not m.kept:
                return True
            mid = m.parent_id
        return False

    def finish(self, bad: Callable[[DataError], None]) -> list[PreferencePair]:
        children: dict[str, list[_Message]] = {}
        for m in self.rows.values():
            if m.parent_id is not None:
                children.setdefault(m.parent_id, []).append(m)
        pairs: list[PreferencePair] = []
        for parent_id, kids in children.items():
            ranked = sorted(
                (m for m in kids if m.role == "assistant" and m.rank is not None and m.usable), key=lambda m: m.rank
            )
            if len({m.rank for m in ranked}) < 2:
                continue
            if self._below_filtered(parent_id):
                self.filtered["reply below a filtered message"] += len(ranked)
                continue
            try:
                prompt = self._conversation(parent_id, ranked[0])
            except DataError as e:
                bad(e)
                continue
            for i, a in enumerate(ranked):
                for b in ranked[i + 1:]:
                    if a.rank == b.rank:
                        continue
                    where = f"{a.loc} vs {b.loc.unit} {b.loc.n}"
                    if a.text.strip() == b.text.strip():
                        bad(bad_record(
                            where, "text", f"two replies ranked {a.rank} and {b.rank} are identical ({_short(a.text)})",
                            "identical responses",
                        ))
                        continue
                    pairs.append(PreferencePair(prompt, a.text, b.text, None, where))
        return pairs

    def _conversation(self, parent_id: str, child: _Message) -> tuple[dict, ...]:
        chain: list[_Message] = []
        seen: set[str] = set()
        mid: str | None = parent_id
        below = child
        while mid is not None:
            if mid in seen:
                raise bad_record(str(below.loc), "parent_id", "the parent_id links form a cycle", "bad tree")
            seen.add(mid)
            m = self.rows.get(mid)
            if m is None:
                hint = "" if self.read_all else " (reading stopped at max_records; the parent may come later)"
                raise bad_record(
                    str(below.loc), "parent_id", f"refers to message {mid!r}, which is not in the source{hint}",
                    "missing parent",
                )
            chain.append(m)
            below, mid = m, m.parent_id
        return tuple({"role": m.role, "content": m.text} for m in reversed(chain))


class Meta(Format):
    name = "meta"

    def convert(self, rec: dict, loc: Loc) -> list[MetaGroup]:
        prompt = prompt_value(need(rec, "prompt", loc), loc)
        rs = need(rec, "responses", loc)
        if not isinstance(rs, list):
            raise bad_record(str(loc), "responses", f"expected a list of strings, got {_type_name(rs)}", "wrong-type field")
        if not rs:
            raise bad_record(str(loc), "responses", "the list is empty; a meta group needs at least one response", "empty response list")
        out = tuple(response(r, loc, f"responses[{i}]") for i, r in enumerate(rs))
        return [MetaGroup(prompt, out, str(loc))]


class Prompts(Format):
    """{"prompt": ...} records (or the lines of a .txt file): prompts only, for load_prompts."""

    name = "prompts"

    def convert(self, rec: dict, loc: Loc) -> list[Prompt]:
        p = prompt_value(need(rec, "prompt", loc), loc)
        if isinstance(p, str) and not p.strip():
            raise bad_record(str(loc), "prompt", "the prompt is empty", "empty prompt")
        return [p]


def detect(rec: dict) -> str | None:
    """The format a record's fields say it is in, or None."""
    keys = set(rec)
    if {"prompt", "responses"} <= keys and keys & {"scores", "ranks"}:
        return "ranked"
    if {"prompt", "responses"} <= keys:
        return "meta"
    if {"instruction", "completions"} <= keys:
        return "ultrafeedback"
    if {"prompt", "answers"} <= keys:
        return "nectar"
    if {"chosen", "rejected"} <= keys and all(isinstance(rec[k], list) and rec[k] and all(isinstance(x, str) for x in rec[k])
                                             for k in ("chosen", "rejected")):
        return "chosen-rejected-lists"
    if {"info", "summaries"} <= keys:
        return "summarize"
    if {"response_0", "response_1"} <= keys:
        return "pku"
    if {"context", "response1", "response2", "overall_preference"} <= keys:
        return "helpsteer3"
    if {"message_id", "role", "text"} <= keys:
        return "oasst"
    if {"chosen", "rejected"} <= keys:
        if rec.get("prompt") is not None or isinstance(rec.get("chosen"), list):
            return "explicit"
        if isinstance(rec.get("chosen"), str) and ASSISTANT_TAG not in rec["chosen"]:
            return "implicit"  # TRL's implicit prompt, plain strings: no HH turns to split on
        return "hh-rlhf"
    if "prompt" in keys:
        return "prompts"
    return None


def make_format(name: str, pku_preference: str = "better", oasst_lang: str | None = None,
                oasst_keep_flagged: bool = False, helpsteer3_margin: bool = False) -> Format:
    if name == "explicit":
        return Explicit()
    if name == "hh-rlhf":
        return HH()
    if name == "implicit":
        return Implicit()
    if name == "summarize":
        return Summarize()
    if name == "pku":
        return PKU(pku_preference)
    if name == "oasst":
        return Oasst(oasst_lang, oasst_keep_flagged)
    if name == "helpsteer3":
        return HelpSteer3(helpsteer3_margin)
    if name == "ranked":
        return Ranked()
    if name == "ultrafeedback":
        return UltraFeedback()
    if name == "nectar":
        return Nectar()
    if name == "chosen-rejected-lists":
        return ChosenRejectedLists()
    if name == "meta":
        return Meta()
    if name in ("prompts", "text"):
        return Prompts()
    raise ValueError(f"unknown format {name!r}; known: {', '.join(PROMPT_FORMATS)}")
