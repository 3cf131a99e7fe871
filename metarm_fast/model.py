"""Loading reward models and scoring sequences.

A reward model is any `AutoModelForSequenceClassification` with one output. Rewards are read at the
last token of each response *by position* (`last_index` from the collator), never by searching the
input ids for the pad id as transformers' own head does: when pad == eos and an eos is appended,
that search reads the reward one token early.
"""
from __future__ import annotations

import torch
from torch import nn

from metarm_fast.config import TINY_MODEL, TrainConfig

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16-master": torch.bfloat16}


def choose_attention(cfg: TrainConfig) -> str:
    """The attention backend, from the device, what is installed and the batch layout; or the override.

    CPU: torch SDPA (its flash kernel) for padded batches; for packed batches SDPA run block by block
    (metarm_fast.packing.BLOCKWISE_SDPA: a dense T x T mask makes the CPU kernel compute every tile).
    GPU: FlashAttention 2 varlen when flash-attn is installed and the layout is packed without prompt
    sharing; FlexAttention with a block-sparse BlockMask for prompt sharing (and for packing without
    flash-attn): the block-wise SDPA loop is one small kernel launch per block and layer, launch-bound
    on a GPU, where flex runs every block in one kernel and skips the masked tiles; SDPA when padded.
    `--attn-implementation blockwise` names the block-wise backend explicitly.
    """
    cfg = with_packing_resolved(cfg)
    from metarm_fast.packing import register_blockwise_sdpa

    impl = cfg.attn_implementation
    if impl == "blockwise":
        return register_blockwise_sdpa()
    if impl.startswith("flash_attention"):
        import importlib.util

        if not torch.cuda.is_available():
            raise ValueError(f"--attn-implementation {impl} needs a CUDA GPU; on the CPU use auto (block-wise "
                             "SDPA for packed batches, SDPA otherwise) or sdpa")
        if importlib.util.find_spec("flash_attn") is None:
            raise ValueError(f"--attn-implementation {impl} needs flash-attn: pip install -e .[flash] (or use auto)")
    if impl == "flex_attention" and not torch.cuda.is_available():
        raise ValueError("--attn-implementation flex_attention cannot train on the CPU (torch's flex attention has "
                         "no CPU backward); use auto, sdpa or blockwise")
    if impl != "auto":
        return impl
    if torch.cuda.is_available():
        import importlib.util

        if importlib.util.find_spec("flash_attn") is not None and cfg.packing == "pack":
            return "flash_attention_2"
        if cfg.packing != "none" and has_flex_attention():
            return "flex_attention"
        return register_blockwise_sdpa() if cfg.packing != "none" else "sdpa"
    return register_blockwise_sdpa() if cfg.packing != "none" else "sdpa"


def choose_packing(cfg: TrainConfig) -> tuple[str, str]:
    """The batch layout and why: ``--packing auto`` takes prompt sharing, the exact layout that computes
    the fewest tokens, wherever the model reads its reward at the last token (decoders); encoders pool
    their first token over the whole row and stay padded."""
    if cfg.packing != "auto":
        return cfg.packing, "as set"
    if cfg.model == TINY_MODEL:
        return "share-prompt", "auto: decoder model"
    from transformers import AutoConfig, AutoModelForSequenceClassification

    hf_cfg = from_pretrained_checked("--model", cfg.model, AutoConfig.from_pretrained)
    hf_cfg.num_labels = 1
    try:
        with torch.device("meta"):  # the module tree only: no weights are read or allocated
            skeleton = AutoModelForSequenceClassification.from_config(hf_cfg)
    except ValueError as e:
        raise ValueError(f"--model {cfg.model}: transformers has no sequence-classification (reward) model for "
                         f"this checkpoint's type {hf_cfg.model_type!r} ({str(e).splitlines()[0][:160]})") from None
    if _last_token_head(skeleton) is not None:
        return "share-prompt", "auto: decoder model"
    return "none", "auto: encoder model, which pools over the whole row"


def with_packing_resolved(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``--packing auto`` replaced by ``choose_packing``'s layout (itself otherwise)."""
    if cfg.packing != "auto":
        return cfg
    import dataclasses

    return dataclasses.replace(cfg, packing=choose_packing(cfg)[0])


def has_flex_attention() -> bool:
    """torch ships FlexAttention (torch >= 2.5)."""
    import importlib.util

    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def build_tiny_llama(vocab_size: int, pad_token_id: int, layers: int = 2, hidden: int = 64, attn: str = "sdpa"):
    """A small random Llama-shaped reward model, built offline in well under a second."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        num_labels=1,
        pad_token_id=pad_token_id,
        attn_implementation=attn,
    )
    return LlamaForSequenceClassification(cfg)


def ensure_pad_token(tokenizer) -> None:
    """Give the tokenizer a pad token that is not its eos (so transformers' own head reads checkpoints right)."""
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
        tokenizer.pad_token = tokenizer.unk_token
    else:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})


def load_tokenizer(cfg: TrainConfig):
    from transformers import AutoTokenizer

    if cfg.tokenizer:
        tok = from_pretrained_checked("--tokenizer", cfg.tokenizer, AutoTokenizer.from_pretrained)
    elif cfg.model == TINY_MODEL:
        from metarm_fast.synthetic import SyntheticTask

        tok = SyntheticTask(cfg.seed).tokenizer()
    else:
        tok = from_pretrained_checked("--model", cfg.model, AutoTokenizer.from_pretrained)
    ensure_pad_token(tok)
    return tok


_CHECKPOINT_FILES = ("config.json", "tokenizer_config.json", "tokenizer.json")


def check_local_path(flag: str, name: str) -> str:
    """``name`` with ~ expanded; a name that is written as a path must be an existing folder."""
    import os

    path = os.path.expanduser(name)
    if not os.path.isdir(path) and (os.path.sep in name or name.startswith((".", "~"))):
        raise ValueError(f"{flag} {name}: there is no folder {name}")
    return path


def from_pretrained_checked(flag: str, name: str, fn, **kw):
    """transformers' from_pretrained, with one message a user can act on instead of its error: the
    folder is named, and what it lacks."""
    import os

    path = check_local_path(flag, name)
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in _CHECKPOINT_FILES):
        raise ValueError(f"{flag} {name}: the folder holds no Hugging Face model or tokenizer (none of "
                         f"{', '.join(_CHECKPOINT_FILES)}); pass a folder written by save_pretrained, such as a "
                         "metarm-fast train --output-dir, or a hub name")
    try:
        return fn(path if os.path.isdir(path) else name, **kw)
    except (OSError, ValueError) as e:
        if os.path.isdir(path):
            why = f"the folder {name} is not a Hugging Face checkpoint ({str(e).splitlines()[0][:200]})"
        elif isinstance(e, ValueError):
            raise
        else:
            why = (f"{name!r} is not a local folder, and the hub could not give it (offline, or no such repository; "
                   "HF_HUB_OFFLINE is " + os.environ.get("HF_HUB_OFFLINE", "unset") + ")")
        raise ValueError(f"{flag} {name}: {why}") from None


def load_model(cfg: TrainConfig, tokenizer) -> nn.Module:
    """The reward model in the precision the config asks for (bf16-master: bf16 here, masters kept by the trainer)."""
    from transformers import AutoModelForSequenceClassification

    cfg = with_packing_resolved(cfg)
    dtype = _DTYPES[cfg.precision]
    attn = choose_attention(cfg)
    if cfg.model == TINY_MODEL:
        torch.manual_seed(cfg.seed)
        model = build_tiny_llama(len(tokenizer), tokenizer.pad_token_id, cfg.tiny_layers, cfg.tiny_hidden, attn)
        model = model.to(dtype)
    else:
        model = from_pretrained_checked("--model", cfg.model, AutoModelForSequenceClassification.from_pretrained,
                                 num_labels=1, dtype=dtype, attn_implementation=attn)
    if cfg.packing != "none" and _last_token_head(model) is None:
        raise ValueError(f"model {cfg.model}: --packing {cfg.packing} needs a decoder reward model (a last-token "
                         "`score` head); encoders such as BERT pool [CLS] over the whole row: use --packing none")
    if model.config.num_labels != 1:
        raise ValueError(f"model {cfg.model}: a reward model needs one output, it has num_labels={model.config.num_labels}")
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _last_token_head(model: nn.Module) -> nn.Module | None:
    """The linear head of decoder reward models (Llama, Mistral, Qwen, GPT-2...: `score`); None for encoders."""
    head = getattr(model, "score", None)
    return head if isinstance(head, nn.Module) else None


class RewardModel(nn.Module):
    """A reward model: ``forward(batch: RewardBatch) -> rewards (B,)`` in fp32, in the batch's order.

    The one place that knows the layouts (padded, pack, share-prompt) and the head: DDP, FSDP2 and
    torch.compile wrap this module. ``hf`` is the Hugging Face ``*ForSequenceClassification`` it
    holds (what the export saves).
    """

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    @property
    def config(self):
        return self.hf.config

    @property
    def needs_dense_mask(self) -> bool:
        """Packed layouts: SDPA and eager attention take a dense (1, 1, T, T) mask; the others
        (flex, FlashAttention varlen, block-wise SDPA) build theirs from the block ids."""
        return self.config._attn_implementation in ("sdpa", "eager")

    def forward(self, batch) -> torch.Tensor:
        if batch.layout == "none":
            return _own_storage(compute_rewards(self.hf, batch.as_dict()))
        from metarm_fast.packing import compute_rewards_packed, pair_layout

        r = compute_rewards_packed(self.hf, batch.as_dict())
        return _own_storage(pair_layout(r) if batch.pairs else r)


def _own_storage(r: torch.Tensor) -> torch.Tensor:
    """The rewards as a tensor of their own, not a view (a squeeze, a reorder): FSDP2 registers its
    backward hooks on a module's outputs and warns that a view can give wrong gradients. B floats."""
    return r.clone() if r._base is not None else r


def compute_rewards(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Rewards (B,) in fp32 for a collated batch (input_ids, attention_mask, position_ids, last_index).

    Decoders: run the backbone, gather the hidden state at `last_index` and apply the head to those B
    rows only (the head never sees the padding). Encoders (BERT): their head pools the first token
    ([CLS]), which padding does not move, so their own forward is used.
    """
    head = _last_token_head(model)
    if head is None:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if bool((mask[:, 0] == 0).any()):
            # Left padding would put a pad where the encoder pools ([CLS] at column 0): move each
            # row's tokens to the left, i.e. make the batch right-padded.
            shift = (mask == 0).long().cumprod(dim=1).sum(dim=1, keepdim=True)  # (B, 1) leading pads
            cols = (torch.arange(ids.shape[1], device=ids.device)[None, :] + shift) % ids.shape[1]
            ids, mask = ids.gather(1, cols), mask.gather(1, cols)
        out = model(input_ids=ids, attention_mask=mask)
        return out.logits.squeeze(-1).float()
    backbone = model.base_model
    hidden = backbone(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
    ).last_hidden_state  # (B, T, H)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    last = hidden[rows, batch["last_index"]]  # (B, H)
    return head(last).squeeze(-1).float()  # (B,)


def sparse_embedding_grad_(model: nn.Module) -> bool:
    """Make the input embedding's backward produce a row-sparse gradient; returns whether it did.

    Why: the embedding's dense backward allocates a zeroed vocab x hidden tensor every pass and then
    adds all of it into .grad. On the bench's tiny Llama (30522 x 256, 31 MB, 77% of the weights) the
    vocab-sized fills of one MetaRM step (these zeros for the J and the L pass, the zeroing of .grad,
    the restore's) took 46.6 ms of a ~400 ms step on 2 CPU cores in a torch.profiler run (docs/performance.md,
    "Where a step's time goes"). A sparse gradient (one row per input token) is added
    into the existing dense .grad in place instead: the same sum, and the .grad buffers the meta step
    and the optimizer see stay dense. The trainer keeps every .grad allocated (zeroed, not freed), so
    the sparse gradient never becomes a .grad itself. Not done when the table is tied to another
    module (an LM head would then see a sparse gradient) or shared by an embedding the caller made
    sparse already."""
    emb = model.get_input_embeddings()
    if not isinstance(emb, nn.Embedding) or emb.sparse:
        return False
    if any(m is not emb and getattr(m, "weight", None) is emb.weight for m in model.modules()):
        return False  # tied weights
    emb.sparse = True
    return True
