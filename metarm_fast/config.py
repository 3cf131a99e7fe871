"""The one typed configuration of a training run.

Every field has a default and a one-line doc (the `doc` metadata); the command line, `--config
file.yaml` and the resolved config saved next to the checkpoint are all generated from this class.
Precedence: defaults < YAML file < command-line flags.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

TINY_MODEL = "tiny-llama"
SYNTHETIC = "synthetic"


META_DIRECTIONS = ("sgd", "adam", "optimizer-step")  # --meta-direction (metarm_fast.meta_step says what each does)

def _f(default: Any, doc: str, choices: tuple | None = None):
    return field(default=default, metadata={"doc": doc, "choices": choices})


@dataclass
class TrainConfig:
    # -- what to train --------------------------------------------------------------------------
    method: str = _f("vanilla", "vanilla: Bradley-Terry only; metarm: Algorithm 1 of the MetaRM paper", ("vanilla", "metarm"))
    model: str = _f(TINY_MODEL, f"a directory or hub name of a model, or '{TINY_MODEL}' (a small random Llama built offline)")
    tokenizer: str | None = _f(None, "tokenizer directory or hub name; default: the model's own (the synthetic task's for tiny-llama)")
    tiny_layers: int = _f(2, "tiny-llama: decoder layers")
    tiny_hidden: int = _f(64, "tiny-llama: hidden size")
    attn_implementation: str = _f("auto", "attention backend: auto (by device, layout and what is installed), or sdpa, eager, flex_attention, flash_attention_2, blockwise")
    # -- data -----------------------------------------------------------------------------------
    train_data: str = _f(SYNTHETIC, "preference pairs: a .jsonl/.json/.parquet file (gz ok), a hub dataset (NAME, or NAME?data_dir=DIR&name=CONFIG&split=SPLIT), or 'synthetic'")
    eval_data: str | None = _f(None, "held-out pairs; default: the synthetic eval split when training on 'synthetic'")
    eval_fraction: float = _f(0.0, "hold out this fraction of the training pairs (shuffled by seed) for evaluation when no eval_data is given")
    meta_data: str | None = _f(None, "meta set (prompt + k responses) for --method metarm; default: synthetic shifted set")
    data_format: str = _f("auto", "record format", ("auto", "explicit", "implicit", "hh-rlhf", "summarize", "pku", "oasst", "helpsteer3", "ranked",
                                                 "ultrafeedback", "nectar", "chosen-rejected-lists"))
    pku_preference: str = _f("better", "PKU-SafeRLHF: which label makes the pair", ("better", "safer"))
    oasst_lang: str | None = _f(None, "oasst1: keep the messages of this language only (their `lang`, e.g. en); default: all")
    oasst_keep_flagged: bool = _f(False, "oasst1: keep deleted messages and those that failed review (left out by default, with their replies)")
    helpsteer3_margin: bool = _f(False, "HelpSteer3: use |overall_preference| (1-3) as each pair's Bradley-Terry margin")
    split: str = _f("train", "split to read from a hub dataset")
    on_bad_record: str = _f("error", "stop at the first bad record, or skip and report them at the end", ("error", "skip"))
    max_records: int | None = _f(None, "read at most this many records of each data source")
    max_length: int = _f(512, "tokens per sequence; longer pairs lose the start of their prompt")
    chat_template: str = _f("auto", "use the tokenizer's chat template: auto (when it has one), never, always", ("auto", "never", "always"))
    packing: str = _f("auto", "batch layout: none (padded), pack (sequences end to end, no padding), share-prompt (each prompt once, its responses after it; same rewards, fewest tokens); auto: share-prompt for decoder models, none for encoders", ("auto", "none", "pack", "share-prompt"))
    padding_side: str = _f("right", "where padding goes (rewards are read by position either way)", ("right", "left"))
    # -- optimisation ---------------------------------------------------------------------------
    meta_diagnostic_every: int = _f(0, "MetaRM: every N steps also compute grad L at theta on the same batch and log how much the meta step changed it (meta_grad_rel_change, meta_grad_cosine) and its largest per-weight move over eta (meta_max_move_over_eta); costs one more L forward/backward on those steps; 0: off")
    group_loss: str = _f("bt", "k-response records (ranked, ultrafeedback, nectar, chosen-rejected-lists): bt (Bradley-Terry over every ordered pair of different scores, each record weighted as one) or pl (Plackett-Luce, listwise)", ("bt", "pl"))
    score_margin: float = _f(0.0, "k-response records, --group-loss bt: margin of each pair = this x its score difference")
    batch_size: int = _f(8, "preference pairs per micro-batch, in all: with torchrun, split across the ranks")
    grad_accum: int = _f(1, "micro-batches per optimizer step (same result as a batch_size*grad_accum batch)")
    max_steps: int = _f(-1, "optimizer steps; -1: run `epochs` epochs")
    epochs: float = _f(1.0, "passes over the preference data when max_steps is -1")
    lr: float | None = _f(None, "peak learning rate; default 1e-3 for tiny-llama, else 5e-6 (the paper's)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_ratio: float = _f(0.05, "fraction of the steps spent warming the learning rate up linearly")
    lr_schedule: str = _f("cosine", "decay after warm-up", ("cosine", "linear", "constant"))
    max_grad_norm: float = _f(1.0, "clip the gradient to this norm; 0 disables clipping")
    optimizer: str = _f("adamw", "torch AdamW, or bitsandbytes' 8-bit AdamW (2 bytes of state per parameter)", ("adamw", "adamw8bit"))
    precision: str = _f("fp32", "fp32; bf16 (pure, the meta step may vanish in rounding); bf16-master (bf16 compute copy, fp32 master weights)", ("fp32", "bf16", "bf16-master"))
    lora_r: int = _f(0, "LoRA rank through peft (optional extra [lora]): adapters on --lora-target, the reward head trained in full, the meta step on the trainable weights only; 0: train every weight")
    lora_alpha: float | None = _f(None, "LoRA scale numerator (the update is alpha/r * B @ A); default 2 * lora_r")
    lora_dropout: float = _f(0.0, "dropout on the LoRA inputs")
    lora_target: str = _f("all-linear", "modules that get adapters: all-linear (every linear layer but the head), or comma-separated names such as q_proj,v_proj")
    activation_checkpointing: bool = _f(False, "recompute activations in the backward pass to save memory")
    center_coef: float = _f(0.0, "reward centering: adds c * mean((r_w + r_l)^2) to the loss (0.01 is TRL's suggestion)")
    seed: int = _f(0, "seed for model init, data order and sampling; a CPU run repeats exactly, at any thread count")
    parallel: str = _f("auto", "with torchrun: fsdp (FSDP2: weights, gradients and optimizer states sharded across the ranks) or ddp (each rank the whole model); auto: fsdp when WORLD_SIZE > 1", ("auto", "none", "ddp", "fsdp"))
    threads: int = _f(0, "CPU threads for torch; 0: torch's default (OMP_NUM_THREADS if set), at most the usable cores")
    compile: bool = _f(False, "torch.compile the model's RMSNorm and MLP modules (dynamic shapes); attention and the meta step stay eager")
    liger: bool = _f(False, "GPU: Liger-Kernel's fused RMSNorm, SwiGLU and RoPE in a Llama model (pip install -e .[liger])")
    # -- MetaRM ---------------------------------------------------------------------------------
    eta: float | None = _f(None, "meta step size (gradient ascent on J); default: equal to lr, as in the paper")
    meta_batch_size: int = _f(8, "prompts (each with its k responses) per meta batch, in all: with torchrun, split across the ranks")
    meta_k: int = _f(5, "responses per prompt of the synthetic meta set")
    meta_direction: str = _f("sgd", "sgd: theta + eta * grad J (the paper's formula); adam: grad J preconditioned by AdamW's second moments (|move| <= eta); optimizer-step: one step of the run's optimizer on -J at the scheduled lr times eta/lr, weights restored from a copy, the optimizer keeping its state (the DeepSpeed reading of the authors' code)", META_DIRECTIONS)
    second_order: bool = _f(False, "add eta * Hessian(J) @ grad L: the exact meta-gradient (one extra forward + double backward)")
    on_nonfinite: str = _f("skip", "a non-finite J or L: skip the step with a warning, or stop", ("skip", "stop"))
    # -- output ---------------------------------------------------------------------------------
    output_dir: str = _f("runs/latest", "checkpoint, resolved config and metrics.jsonl go here")
    save_every: int = _f(500, "write a resume checkpoint every N optimizer steps (0: only when stopped by a signal)")
    keep_last: int = _f(2, "keep the newest K resume checkpoints (0: all)")
    resume: str | None = _f(None, "continue a run: 'auto' (the latest complete checkpoint in output_dir, or a fresh start if none) or a checkpoint folder")
    overwrite: bool = _f(False, "replace another run's files in output_dir instead of stopping")
    eval_batch_size: int = _f(32, "pairs per evaluation batch")
    eval_every: int = _f(0, "evaluate on the eval pairs every N optimizer steps (metrics.jsonl, progress bar, --report-to); 0: at the end only")
    keep_best: bool = _f(False, "with --eval-every: also export the model of the best eval accuracy so far to output_dir/best")
    report_to: str = _f("none", "also send the metrics to: none, or a comma-separated list of tensorboard, wandb, trackio (optional extras)")
    log_every: int = _f(1, "write metrics every N optimizer steps")
    progress: bool = _f(True, "show a progress bar")

    # -- derived --------------------------------------------------------------------------------
    def resolved(self) -> "TrainConfig":
        """A copy with the defaults that depend on other fields filled in, checked."""
        c = dataclasses.replace(self)
        if c.lr is None:
            c.lr = 1e-3 if c.model == TINY_MODEL else 5e-6
        if c.eta is None:
            c.eta = c.lr
        if c.eval_data is None and isinstance(c.train_data, str) and c.train_data == SYNTHETIC:
            c.eval_data = f"{SYNTHETIC}:eval"
        if c.meta_data is None and c.method == "metarm" and isinstance(c.train_data, str) and c.train_data.startswith(SYNTHETIC):
            c.meta_data = f"{SYNTHETIC}:meta"
        c.validate()
        return c

    def validate(self) -> None:
        hints = typing.get_type_hints(TrainConfig)
        for f in dataclasses.fields(self):
            if f.name in DATA_FIELDS and is_in_memory(getattr(self, f.name)):
                continue  # records handed over from Python: read (and checked) by the data loaders
            _check_type(f.name, getattr(self, f.name), hints[f.name])
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"config: {f.name}={getattr(self, f.name)!r} is not one of {', '.join(choices)}")
        for name in ("save_every", "keep_last"):
            if getattr(self, name) < 0:
                raise ValueError(f"config: {name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "grad_accum", "max_length", "meta_batch_size", "meta_k", "eval_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"config: {name} must be >= 1, got {getattr(self, name)}")
        if self.meta_diagnostic_every < 0:
            raise ValueError(f"config: meta_diagnostic_every must be >= 0 (0: off), got {self.meta_diagnostic_every}")
        if self.eval_every < 0:
            raise ValueError(f"config: eval_every must be >= 0 (0: off), got {self.eval_every}")
        from metarm_fast.tracking import parse_report_to

        parse_report_to(self.report_to)
        if self.keep_best and not self.eval_every:
            raise ValueError("config: keep_best needs eval_every > 0 (the best model is chosen by its eval accuracy)")
        if self.lora_r < 0:
            raise ValueError(f"config: lora_r must be >= 0 (0: no LoRA), got {self.lora_r}")
        if self.lora_alpha is not None and not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ValueError(f"config: lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"config: lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_r and self.liger:
            raise ValueError("config: --liger with --lora-r is not supported (Liger's fused SwiGLU reads the MLP's "
                             "weights directly, past the adapters); drop one of them")
        if self.lora_r and self.precision == "bf16-master":
            raise ValueError("config: --lora-r with --precision bf16-master is not supported (the merged export would "
                             "come from the bf16 copy); use fp32, or bf16 for a bf16 base model")
        if not (math.isfinite(self.score_margin) and self.score_margin >= 0):
            raise ValueError(f"config: score_margin must be finite and >= 0, got {self.score_margin}")
        if self.score_margin and self.group_loss == "pl":
            raise ValueError("config: score_margin applies to --group-loss bt only (Plackett-Luce has no pairs)")
        if self.threads < 0:
            raise ValueError(f"config: threads must be >= 0 (0: automatic), got {self.threads}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"config: max_steps must be >= 1, or -1 to run `epochs` epochs; got {self.max_steps}")
        if not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ValueError(f"config: epochs must be > 0, got {self.epochs}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"config: eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_length < 4:
            raise ValueError("config: max_length must be at least 4 tokens")
        for name in ("lr", "eta"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise ValueError(f"config: {name} must be finite and >= 0, got {v}")
        if self.second_order and self.meta_direction != "sgd":
            raise ValueError("config: --second-order is exact for --meta-direction sgd only (the adam and "
                             "optimizer-step moves depend on grad J through AdamW's normalisation); use one or the other")
        if self.method == "metarm" and self.meta_data is None and self.eta is not None:
            raise ValueError("config: --method metarm needs --meta-data (a prompt + responses file) unless training on 'synthetic'")

    def to_dict(self) -> dict:
        """Plain values (what is saved and compared on resume); data held in memory by its summary."""
        return {f.name: _plain(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)}

    def __repr__(self) -> str:
        return "TrainConfig(" + ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items()) + ")"

    def run_differences(self, other: dict) -> list[str]:
        """Settings that change what a run computes and differ from ``other`` (a saved config dict)."""
        mine = self.to_dict()
        return sorted(k for k in mine if k not in NOT_RUN_SETTINGS and k in other and mine[k] != other[k])


# Settings that change how a run is watched, saved, or where and on how many ranks it runs, not what
# it computes (up to float32 rounding across world sizes): a resume
# may change them.
NOT_RUN_SETTINGS = frozenset({"output_dir", "progress", "log_every", "save_every", "keep_last", "resume",
                              "overwrite", "threads", "eval_batch_size", "parallel", "eval_every",
                              "keep_best", "report_to"})


# Fields that name data: a path or hub name (str), or, from Python, the records themselves.
DATA_FIELDS = ("train_data", "eval_data", "meta_data")


def is_in_memory(value) -> bool:
    """Records handed over from Python: a list of dicts, a datasets.Dataset, a pandas DataFrame."""
    return isinstance(value, (list, tuple)) or hasattr(value, "features") or hasattr(value, "columns")


def describe_data(value) -> str:
    """A data setting as messages and the saved config name it: in-memory data by kind and size."""
    if not is_in_memory(value):
        return str(value)
    return f"<{type(value).__name__} of {len(value)} records>"


def _plain(name: str, value):
    if name in DATA_FIELDS and is_in_memory(value):
        return describe_data(value)
    return value


def _check_type(name: str, value, hint) -> None:
    """One message naming the setting when a value has the wrong type (YAML and Python callers)."""
    args = typing.get_args(hint) if (typing.get_origin(hint) is typing.Union or isinstance(hint, types.UnionType)) else (hint,)
    if value is None and type(None) in args:
        return
    base = next(a for a in args if a is not type(None))
    if base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, base)
    if not ok:
        raise ValueError(f"config: {name} must be {'an' if base is int else 'a'} {base.__name__}, got {value!r} "
                         f"({type(value).__name__})")


def config_fields():
    return dataclasses.fields(TrainConfig)
