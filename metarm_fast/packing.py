"""Padding-free packing and prompt sharing for decoder reward models.

A batch of reward data is a list of *groups*: the sequences that share one prompt (a pair is
[chosen, rejected]; a meta group is its k responses). ``pack`` lays a batch out as ONE row of
T_total tokens instead of B rows padded to the longest:

- ``share_prompt=False`` (padding-free packing): every sequence, prompt + response, end to end.
  Each token attends causally inside its own sequence only; positions restart at 0 per sequence.
- ``share_prompt=True`` (prompt sharing): each group's prompt once, then each of its responses.
  A response token attends causally to its group's prompt and to the earlier tokens of its own
  response, never to a sibling response; every response's positions continue from the prompt's end
  (len(prompt), len(prompt) + 1, ...). Each response therefore sees exactly what it sees in the
  padded batch, so the reward, read at its own last token, is the same (fp32: within 1e-5).

Rewards come out in *flattened group order*: group 0 seq 0, group 0 seq 1, group 1 seq 0, ...
For meta groups this is the trainer's own order (``meta_batch`` flattens group by group, and the
batch carries the same ``offsets``). For pairs packed as ``[[chosen_i, rejected_i], ...]`` it is
[c1, r1, c2, r2, ...]; ``pair_layout`` turns it into the trainer's [c1..cn, r1..rn].

How the mask reaches the model (transformers 5.23): ``LlamaModel.forward`` hands ``attention_mask``
to ``masking_utils.create_causal_mask``, which returns a 4-D mask *as-is* (its
``_preprocess_mask_arguments`` early exit), and the attention layer uses it unchanged:

- sdpa: a (1, 1, T, T) bool mask, True = may attend, goes straight to
  ``torch.nn.functional.scaled_dot_product_attention`` (on the CPU its flash kernel takes bool masks);
- eager: the mask is *added* to the scores, so it must be the additive float form (0 / dtype min);
  a bool mask there would be silently wrong (True adds 1.0);
- ``BLOCKWISE_SDPA`` (ours, see ``register_blockwise_sdpa``): SDPA run per attention block with that
  block's own small mask, passed as attention kwargs; the fast path on the CPU;
- flex_attention: a ``BlockMask`` (4-D too), built from the per-token ids, never dense (on the CPU
  flex compiles and has no backward: forward only);
- flash_attention_2/3: no mask; the varlen kernel takes ``cu_seq_lens_q/k`` and ``max_length_q/k``
  kwargs, which transformers forwards to ``_flash_attention_forward``. That only expresses
  block-diagonal attention, i.e. ``share_prompt=False``: a response attending to its prompt but not
  to the sibling before it is not a set of contiguous segments, so prompt sharing needs sdpa, eager,
  the block-wise SDPA or flex.

The masks are built by transformers' own mask interface (``ALL_MASK_ATTENTION_FUNCTIONS``, the
functions ``create_causal_mask`` itself uses) from one mask function composed of its
``causal_mask_function`` and ``packed_sequence_mask_function`` and the one rule transformers has no
function for: the prompt-sharing "trunk or same branch" rule (``_same_branch_or_trunk``).

Cost. The dense mask is O(T^2) memory (bool: 1 byte per entry; 8 HH pairs pack into a median T of
2.4k tokens, 1.6k shared, max 4.9k: 2-24 MB, fine on a CPU), and worse, torch's CPU SDPA computes
every tile of a dense mask, masked or not, so a packed row costs O(T^2) attention: on 8 HH pairs the dense-mask
unshared packed step ran at 0.92x the padded one's speed (shared: 1.87x). ``BLOCKWISE_SDPA`` costs
sum(T_b^2) instead and ran at 2.52x (unshared) and 3.63x (shared); token ratios there: 2.54x, 3.96x.
On a GPU use FlashAttention varlen (``cu_seqlens``, unshared only) or FlexAttention (block-sparse
``BlockMask``, both modes), and ``pack(..., dense_mask=False)``.
Why transformers' packed-sequence detection (attention_mask=None + restarting position_ids) is not
used instead: it splits sequences wherever positions do not step by +1, so it cannot express a
response that continues a prompt it does not follow in the row (prompt sharing); it would also
build the dense T x T mask. The explicit per-token ids keep one description for every backend.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from metarm_fast.data.encode import EncodedSeq

_FLASH = ("flash_attention_2", "flash_attention_3", "flash_attention_4")


# -- layout ----------------------------------------------------------------------------------------
def pack(groups: Sequence[Sequence[EncodedSeq]], share_prompt: bool, *,
         dense_mask: bool = True) -> dict[str, torch.Tensor]:
    """Lay ``groups`` out as one row of T_total tokens (see the module docstring for both layouts).

    Returns (all on the CPU; move them with ``{k: v.to(device)}`` like any batch):
      input_ids     (1, T) int64
      position_ids  (1, T) int64  restart per sequence / continue from the prompt per response
      last_index    (B,)   int64  column of each sequence's last token, B = sum of group sizes, in
                                  flattened group order (the order rewards come out in)
      offsets       (G+1,) int64  sequences of group g are rewards[offsets[g]:offsets[g+1]]
      seq_ids       (1, T) int64  the attention block of each token: its sequence (unshared) or its
                                  group (shared); tokens of different blocks never see each other
      branch_ids    (1, T) int64  0 on a group's shared prompt, j + 1 on its response j (all 0 unshared)
      block_offsets (n_blocks+1,) int64  the blocks' column boundaries (blocks are contiguous)
      attention_mask (1, 1, T, T) bool, True = may attend (SDPA's form); only with ``dense_mask``
      cu_seqlens    (B+1,) int32, max_seqlen () int64: FlashAttention varlen metadata, unshared only

    The mask is ``kv <= q and seq_ids[q] == seq_ids[kv] and branch_ids[kv] in (0, branch_ids[q])``.
    With ``share_prompt`` every sequence of a group must have the same ``prompt_ids`` (the Encoder
    truncates a record's prompt by the same amount for all its responses). A response may be empty
    only when shared and its prompt is not: its reward is then read at the prompt's last token,
    as the padded batch would.
    """
    if not groups:
        raise ValueError("pack needs at least one group")
    ids: list[int] = []
    pos: list[int] = []
    seq: list[int] = []
    branch: list[int] = []
    last: list[int] = []
    sizes: list[int] = []
    block_ends: list[int] = []  # one past each attention block's last column
    for g, group in enumerate(groups):
        if not group:
            raise ValueError(f"pack: group {g} has no sequences")
        sizes.append(len(group))
        if share_prompt:
            prompt = group[0].prompt_ids
            for j, s in enumerate(group):
                if s.prompt_ids != prompt:
                    raise ValueError(
                        f"pack(share_prompt=True): sequence {j} of group {g} has a different prompt than sequence 0 "
                        f"({len(s.prompt_ids)} vs {len(prompt)} tokens); encode a record's responses together "
                        "(Encoder.encode_pair / encode_group) or use share_prompt=False"
                    )
            p = len(prompt)
            ids += prompt
            pos += range(p)
            seq += [g] * p
            branch += [0] * p
            prompt_end = len(ids)  # one past the prompt's last column
            for j, s in enumerate(group):
                r = len(s.response_ids)
                if r == 0 and p == 0:
                    raise ValueError(f"pack: sequence {j} of group {g} is empty")
                ids += s.response_ids
                pos += range(p, p + r)
                seq += [g] * r
                branch += [j + 1] * r
                last.append(len(ids) - 1 if r else prompt_end - 1)
            block_ends.append(len(ids))
        else:
            for j, s in enumerate(group):
                n = len(s)
                if n == 0:
                    raise ValueError(f"pack: sequence {j} of group {g} is empty")
                ids += s.prompt_ids + s.response_ids
                pos += range(n)
                seq += [len(last)] * n  # its own block: the sequence's index in the flattened order
                branch += [0] * n
                last.append(len(ids) - 1)
                block_ends.append(len(ids))
    batch = {
        "input_ids": torch.tensor([ids], dtype=torch.long),  # (1, T)
        "position_ids": torch.tensor([pos], dtype=torch.long),  # (1, T)
        "last_index": torch.tensor(last, dtype=torch.long),  # (B,)
        "offsets": torch.tensor([0] + sizes, dtype=torch.long).cumsum(0),  # (G+1,)
        "seq_ids": torch.tensor([seq], dtype=torch.long),  # (1, T)
        "branch_ids": torch.tensor([branch], dtype=torch.long),  # (1, T)
        "block_offsets": torch.tensor([0] + block_ends, dtype=torch.long),  # (n_blocks+1,)
    }
    if not share_prompt:
        lengths = torch.tensor([len(s) for group in groups for s in group], dtype=torch.int32)
        batch["cu_seqlens"] = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0, dtype=torch.int32)])
        batch["max_seqlen"] = lengths.max().long()
    if dense_mask:
        batch["attention_mask"] = packed_attention_mask(batch, "sdpa")
    return batch


def pair_layout(rewards: torch.Tensor) -> torch.Tensor:
    """Rewards of pairs packed as [[c1, r1], [c2, r2], ...] -> the trainer's [c1..cn, r1..rn]."""
    if rewards.ndim != 1 or rewards.numel() % 2:
        raise ValueError(f"pair_layout expects (2n,) rewards of n pairs, got shape {tuple(rewards.shape)}")
    return rewards.view(-1, 2).t().reshape(-1)  # (n, 2) -> (2, n) -> (2n,)


# -- the mask --------------------------------------------------------------------------------------
def _same_branch_or_trunk(branch_ids: torch.Tensor) -> Callable:
    """transformers mask function: kv is on the shared trunk (a prompt, branch 0) or on q's own branch.

    Hand-written because transformers' mask functions (causal, packed-sequence, sliding, chunked,
    blockwise-bidirectional) have no tree-shaped rule. Index-based, so it broadcasts (sdpa/eager)
    and traces (flex's create_block_mask)."""

    def inner_mask(batch_idx, head_idx, q_idx, kv_idx):
        kv_branch = branch_ids[batch_idx, kv_idx]
        return (kv_branch == 0) | (kv_branch == branch_ids[batch_idx, q_idx])

    return inner_mask


def packed_mask_function(seq_ids: torch.Tensor, branch_ids: torch.Tensor) -> Callable:
    """The packed layout's mask as a transformers mask function (batch_idx, head_idx, q_idx, kv_idx) -> bool."""
    from transformers.masking_utils import and_masks, causal_mask_function, packed_sequence_mask_function

    return and_masks(causal_mask_function, packed_sequence_mask_function(seq_ids), _same_branch_or_trunk(branch_ids))


def packed_attention_mask(batch: dict[str, torch.Tensor], attn_implementation: str, dtype: torch.dtype = torch.float32):
    """The mask of a packed batch in the form ``attn_implementation`` wants, built by transformers' mask
    interface: sdpa -> (1, 1, T, T) bool; eager -> (1, 1, T, T) additive ``dtype``; flex_attention ->
    BlockMask (compiled; on the CPU flex has no backward). FlashAttention takes no mask (see
    ``compute_rewards_packed``)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    if attn_implementation in _FLASH:
        raise ValueError(f"{attn_implementation} takes no mask: pass cu_seqlens (compute_rewards_packed does)")
    if attn_implementation not in ALL_MASK_ATTENTION_FUNCTIONS:
        raise ValueError(f"packing: no mask builder for attn_implementation={attn_implementation!r}; "
                         "use sdpa, eager, flex_attention or BLOCKWISE_SDPA")
    seq_ids, branch_ids = batch["seq_ids"], batch["branch_ids"]
    T = seq_ids.shape[1]
    return ALL_MASK_ATTENTION_FUNCTIONS[attn_implementation](
        batch_size=1,
        q_length=T,
        kv_length=T,
        mask_function=packed_mask_function(seq_ids, branch_ids),
        allow_is_causal_skip=False,  # always materialise it: `None` would mean plain causal over the whole row
        dtype=dtype,  # eager only
        device=seq_ids.device,
    )


# -- block-wise SDPA (the CPU's fast path) --------------------------------------------------------
BLOCKWISE_SDPA = "metarm_blockwise_sdpa"


def register_blockwise_sdpa() -> str:
    """Register the block-wise SDPA attention with transformers and return its name; load or build the
    model with ``attn_implementation=<that name>`` to use it. Idempotent; nothing is registered on import.

    Why: torch's CPU flash kernel does not skip fully masked tiles, so one packed row of T tokens costs
    O(T^2) attention whatever the mask; 8 HH pairs pack into T ~ 2.4k (unshared) and the dense-mask
    packed step measured 0.92x the padded one's speed (this one: 2.5x; tiny Llama, 2 CPU cores).
    This attention runs SDPA once per block (a sequence, or a group with its prompt) on that block's
    slice of q/k/v: sum(T_b^2) work and memory.
    It is transformers' own extension point (``AttentionInterface.register``); the mask interface is
    plain ``sdpa_mask``, so padded batches (no block kwargs) take exactly the sdpa path.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(BLOCKWISE_SDPA, _blockwise_sdpa_forward)
    AttentionMaskInterface.register(BLOCKWISE_SDPA, sdpa_mask)
    return BLOCKWISE_SDPA


def _blockwise_sdpa_forward(module, query, key, value, attention_mask,
                            packed_blocks=None, packed_block_masks=None, **kwargs):
    """A transformers attention function: query (1, H, T, D), key/value (1, H_kv, T, D) -> ((1, T, H, D), None).

    packed_blocks: column offsets of the blocks (n_blocks+1 ints); packed_block_masks: per block a
    (1, 1, T_b, T_b) bool mask or None (plain causal: SDPA's is_causal path), or None for all blocks. Without
    packed_blocks this is transformers' sdpa, unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if packed_blocks is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outs = []
    for b, (s, e) in enumerate(zip(packed_blocks[:-1], packed_blocks[1:])):
        mask = None if packed_block_masks is None else packed_block_masks[b]
        out, _ = sdpa_attention_forward(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], mask, **kwargs)
        outs.append(out)  # (1, T_b, H, D)
    return torch.cat(outs, dim=1), None  # (1, T, H, D)


def _blockwise_kwargs(batch: dict[str, torch.Tensor]) -> dict:
    offsets = batch["block_offsets"].tolist()
    if not bool(batch["branch_ids"].any()):
        return dict(packed_blocks=offsets, packed_block_masks=None)  # every block is one causal sequence
    from transformers.masking_utils import sdpa_mask

    masks = []
    for s, e in zip(offsets[:-1], offsets[1:]):
        seq, branch = batch["seq_ids"][:, s:e], batch["branch_ids"][:, s:e]  # (1, T_b) each
        if int(branch.max()) <= 1:
            masks.append(None)  # a prompt with at most one response: plain causal, SDPA's is_causal path
            continue
        fn = packed_mask_function(seq, branch)
        masks.append(sdpa_mask(batch_size=1, q_length=e - s, kv_length=e - s, mask_function=fn,
                               allow_is_causal_skip=False, device=branch.device))  # (1, 1, T_b, T_b) bool
    return dict(packed_blocks=offsets, packed_block_masks=masks)


# -- rewards ---------------------------------------------------------------------------------------
def compute_rewards_packed(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Rewards (B,) in fp32, in flattened group order, for a ``pack``-ed batch and a decoder reward
    model (Llama family: ``model.base_model`` + linear ``model.score``), whatever its attention backend:
    sdpa / eager (dense mask), ``BLOCKWISE_SDPA`` (per-block SDPA, the fast one on the CPU),
    flex_attention (BlockMask), flash_attention_* (varlen, unshared only).

    Equal to ``compute_rewards(model, collate(seqs))`` for the same sequences (fp32: within 1e-5).
    """
    head = getattr(model, "score", None)
    if not isinstance(head, nn.Module):
        raise ValueError(
            f"{type(model).__name__}: packed rewards need a decoder with a last-token `score` head; encoders "
            "(BERT) pool [CLS] over the whole row, so use compute_rewards on a padded batch"
        )
    backbone = model.base_model
    impl = model.config._attn_implementation
    T = batch["input_ids"].shape[1]
    extra = {}
    if impl in _FLASH:
        # GPU-only, untested on the CPU (flash-attn does not install here). Varlen FlashAttention
        # takes segment boundaries instead of a mask; transformers forwards these kwargs to it.
        if "cu_seqlens" not in batch:
            raise ValueError(
                f"{impl} cannot share prompts (a response attends to its prompt but not to its sibling, which is not "
                "a set of contiguous segments): pack with share_prompt=False, or use sdpa / flex_attention"
            )
        cu = batch["cu_seqlens"].to(device=batch["input_ids"].device, dtype=torch.int32)
        n = int(batch["max_seqlen"])
        extra = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=n, max_length_k=n)
        mask = None
    elif impl == BLOCKWISE_SDPA:
        extra = _blockwise_kwargs(batch)
        # A 4-D placeholder (a stride-0 view: no memory) so create_causal_mask returns it as-is instead
        # of building a T x T mask from the restarting position_ids; the blocks carry their own masks.
        mask = torch.ones((), dtype=torch.bool, device=batch["input_ids"].device).expand(1, 1, T, T)
    elif impl == "sdpa" and "attention_mask" in batch:
        mask = batch["attention_mask"]  # (1, 1, T, T) bool, used as-is
    else:
        mask = packed_attention_mask(batch, impl, dtype=backbone.get_input_embeddings().weight.dtype)
    hidden = backbone(
        input_ids=batch["input_ids"],
        attention_mask=mask,
        position_ids=batch["position_ids"],
        use_cache=False,
        **extra,
    ).last_hidden_state  # (1, T, H)
    last = hidden[0, batch["last_index"]]  # (B, H)
    return head(last).squeeze(-1).float()  # (B,)


# -- token counts (benchmarks) ---------------------------------------------------------------------
def padded_tokens(groups: Sequence[Sequence[EncodedSeq]]) -> int:
    """Tokens of the padded batch of all the groups' sequences: B * longest."""
    lengths = [len(s) for g in groups for s in g]
    return len(lengths) * max(lengths, default=0)


def packed_tokens(groups: Sequence[Sequence[EncodedSeq]], share_prompt: bool) -> int:
    """Tokens ``pack`` computes: the sum of lengths, or each group's prompt once plus its responses."""
    if share_prompt:
        return sum(len(g[0].prompt_ids) + sum(len(s.response_ids) for s in g) for g in groups if g)
    return sum(len(s) for g in groups for s in g)
