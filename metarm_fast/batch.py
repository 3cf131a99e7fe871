"""The typed batch a reward model's forward takes, and the builders for pairs and meta groups.

One ``RewardBatch`` describes any of the three layouts (``layout``):
- ``padded``: B rows padded to the longest, ``attention_mask`` (B, T) of 0/1;
- ``pack``: the sequences end to end in one row, each attending inside itself only;
- ``share-prompt``: each prompt once, each response attending to its prompt and itself.
Packed layouts carry the per-token block ids of ``metarm_fast.packing.pack`` in ``packing``.
Rewards come out of ``RewardModel.forward`` in the batch's order: for pairs [c1..cn, r1..rn], for
meta groups group by group (``offsets``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from metarm_fast.data import EncodedSeq, collate

LAYOUTS = ("none", "pack", "share-prompt")  # config spelling: none = padded


@dataclass
class EncodedPair:
    chosen: EncodedSeq
    rejected: EncodedSeq
    margin: float | None = None


@dataclass
class EncodedGroup:
    """A k-response record, encoded: its sequences (sharing one prompt) and their scores (higher better)."""

    seqs: list[EncodedSeq]
    scores: tuple[float, ...]


@dataclass
class RewardBatch:
    input_ids: torch.Tensor  # (B, T) padded, (1, T) packed
    position_ids: torch.Tensor  # same shape
    last_index: torch.Tensor  # (B,) column of each sequence's last token (packed: in the one row)
    layout: str = "none"
    attention_mask: torch.Tensor | None = None  # padded (B, T); packed: (1, 1, T, T) bool or None
    packing: dict[str, torch.Tensor] = field(default_factory=dict)  # seq_ids, branch_ids, block_offsets, ...
    offsets: torch.Tensor | None = None  # (G+1,) meta groups: sequences of group g are [offsets[g], offsets[g+1])
    pairs: bool = False  # pairs: rewards come out as [chosen..., rejected...]
    margin: torch.Tensor | None = None  # (n,) per-pair margins
    scores: torch.Tensor | None = None  # (N,) ranked groups: each sequence's score, higher better

    @property
    def num_sequences(self) -> int:
        return int(self.last_index.numel())

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    def to(self, device) -> "RewardBatch":
        def move(v):
            return v.to(device) if isinstance(v, torch.Tensor) else v

        return dataclasses.replace(
            self,
            **{f.name: move(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "packing"},
            packing={k: move(v) for k, v in self.packing.items()},
        )

    def as_dict(self) -> dict:
        """The flat dict form of the low-level functions (``collate``, ``pack``, ``compute_rewards*``)."""
        d = {"input_ids": self.input_ids, "position_ids": self.position_ids, "last_index": self.last_index}
        if self.attention_mask is not None:
            d["attention_mask"] = self.attention_mask
        d.update(self.packing)
        return d


def _from_layout(seqs_or_groups, layout: str, pad_id, padding_side: str, dense_mask: bool, grouped: bool) -> RewardBatch:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "none":
        seqs = [s for g in seqs_or_groups for s in g] if grouped else seqs_or_groups
        d = collate(seqs, pad_id, padding_side)
        return RewardBatch(d["input_ids"], d["position_ids"], d["last_index"], "none", d["attention_mask"])
    from metarm_fast.packing import pack

    d = pack(seqs_or_groups, share_prompt=layout == "share-prompt", dense_mask=dense_mask)
    meta = {k: d[k] for k in ("seq_ids", "branch_ids", "block_offsets", "cu_seqlens", "max_seqlen") if k in d}
    return RewardBatch(d["input_ids"], d["position_ids"], d["last_index"], layout, d.get("attention_mask"), meta,
                       offsets=d["offsets"])


def pair_batch(items: list[EncodedPair], layout: str, pad_id, *, padding_side: str = "right",
               dense_mask: bool = True) -> RewardBatch:
    """n pairs -> a batch whose rewards come out as [c1..cn, r1..rn]."""
    if layout == "none":
        b = _from_layout([it.chosen for it in items] + [it.rejected for it in items], layout, pad_id, padding_side,
                         dense_mask, grouped=False)
    else:
        b = _from_layout([[it.chosen, it.rejected] for it in items], layout, pad_id, padding_side, dense_mask, grouped=True)
        b.offsets = None
    b.pairs = True
    if any(it.margin is not None for it in items):
        b.margin = torch.tensor([it.margin or 0.0 for it in items])
    return b


def meta_batch(groups: list[list[EncodedSeq]], layout: str, pad_id, *, padding_side: str = "right",
               dense_mask: bool = True) -> RewardBatch:
    """m groups of k_g responses -> a batch with ``offsets`` (rewards group by group)."""
    b = _from_layout(groups, layout, pad_id, padding_side, dense_mask, grouped=True)
    if b.offsets is None:
        sizes = torch.tensor([len(g) for g in groups])
        b.offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    return b


def ranked_batch(items: list[EncodedGroup], layout: str, pad_id, *, padding_side: str = "right",
                 dense_mask: bool = True) -> RewardBatch:
    """k-response records -> a group batch (``offsets``) with each sequence's score in ``scores``."""
    b = meta_batch([it.seqs for it in items], layout, pad_id, padding_side=padding_side, dense_mask=dense_mask)
    b.scores = torch.tensor([s for it in items for s in it.scores], dtype=torch.float32)
    return b


class Batcher:
    """The one owner of a run's batch layout: pairs and meta groups become ``RewardBatch``es in the
    configured layout, with the mask the model asks for, on the run's device."""

    def __init__(self, layout: str, pad_id, *, padding_side: str = "right", dense_mask: bool = True, device="cpu"):
        self.layout, self.pad_id, self.padding_side = layout, pad_id, padding_side
        self.dense_mask, self.device = dense_mask, torch.device(device)

    @classmethod
    def for_model(cls, rm, cfg, pad_id, device) -> "Batcher":
        """``rm``: a ``RewardModel``, which says whether its attention needs a dense packed mask."""
        return cls(cfg.packing, pad_id, padding_side=cfg.padding_side, dense_mask=rm.needs_dense_mask, device=device)

    def pairs(self, items: list[EncodedPair]) -> RewardBatch:
        return pair_batch(items, self.layout, self.pad_id, padding_side=self.padding_side,
                          dense_mask=self.dense_mask).to(self.device)

    def ranked(self, items: list[EncodedGroup]) -> RewardBatch:
        return ranked_batch(items, self.layout, self.pad_id, padding_side=self.padding_side,
                            dense_mask=self.dense_mask).to(self.device)

    def train(self, items) -> RewardBatch:
        """A training micro-batch: pairs, or k-response groups."""
        return self.ranked(items) if items and isinstance(items[0], EncodedGroup) else self.pairs(items)

    def groups(self, groups: list[list[EncodedSeq]]) -> RewardBatch:
        return meta_batch(groups, self.layout, self.pad_id, padding_side=self.padding_side,
                          dense_mask=self.dense_mask).to(self.device)


def step_tokens(batches: list[RewardBatch], meta: RewardBatch | None = None) -> int:
    """Tokens the model runs over in one step, every pass (padding included: it is computed too)."""
    return sum(b.num_tokens for b in batches) + (meta.num_tokens if meta is not None else 0)
