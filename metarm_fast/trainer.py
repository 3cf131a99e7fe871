"""The reward-model trainer: set-up, the loop, checkpoints and the export.

The step itself lives in ``metarm_fast.steps`` (functions of the model, the batches and the
optimizer) and the meta step's transaction in ``metarm_fast.meta_step.MetaStep``. This file builds
what they need, feeds them the batches of each step (``step_inputs``: a function of the seed and
the step alone), and keeps a run resumable: ``state_dict`` holds everything an exact continuation
needs, written by ``metarm_fast.checkpoint`` between steps, never between perturb and restore.

Gradient buffers are kept allocated between steps (zeroed, not freed), as DeepSpeed and FSDP keep
theirs: the meta step stores its exact-restore information in them, so both kinds of step hold the
same buffers and the meta step's memory equals the vanilla step's.
"""
from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager
import math
import os
import random
import shutil
import signal
import threading
import time
import warnings

import torch

from metarm_fast import checkpoint as ckpt
from metarm_fast.batch import EncodedPair, meta_batch, pair_batch
from metarm_fast.config import TrainConfig
from metarm_fast.data import Encoder
from metarm_fast.lora import ADAPTER_DIR, apply_lora, merged_copy
from metarm_fast.meta_step import MetaStep
from metarm_fast.parallel import (
    any_rank,
    apply_ddp,
    apply_fsdp,
    barrier,
    broadcast_object,
    full_state_dict,
    init_distributed,
    shard,
)
from metarm_fast.model import RewardModel, choose_packing, load_model, load_tokenizer, sparse_embedding_grad_
from metarm_fast.sampler import EpochSampler
from metarm_fast.sources import meta_source, pair_source
from metarm_fast.steps import (
    NonFiniteLoss,
    group_gaps,
    l_pass,
    metarm_grads,
    optimizer_step,
    zero_grads,
)
from metarm_fast.plots import GAP_HISTOGRAM, TRAINING_CURVES, save_gap_histogram, save_training_curves
from metarm_fast.threads import busy_warning, set_threads
from metarm_fast.tracking import TENSORBOARD_DIR, Trackers, check_installed, parse_report_to

METRICS = "metrics.jsonl"
CONFIG = "metarm_fast_config.yaml"
CHECKPOINTS = "checkpoints"
INITIAL_GAPS = "meta_reward_gaps_initial.pt"  # the baseline of the gap histogram, kept across a resume
BEST = "best"  # --keep-best's export
_PAIR_STREAM, _META_STREAM = 1, 2


def adamw_impl(sharded: bool) -> dict:
    """torch AdamW's implementation: fused (one kernel per tensor: a single pass over the weight, its
    gradient and both moments, no temporaries) wherever torch has it, else the single-tensor loop.

    The single-tensor loop makes ~10 passes over each tensor with a temporary the size of the largest
    one (profiled on the bench's tiny Llama, 10.2M parameters of which 7.8M are the embedding: 63.5 ms
    of a 521 ms MetaRM step on 2 CPU cores; fused: 4.6 ms; README, "Where a step's time goes"). foreach is not used: it
    holds temporaries the size of all the weights at once. FSDP2's sharded DTensor parameters keep
    the single-tensor loop (the path every torch version steps them with)."""
    return {"foreach": False} if sharded else {"fused": True}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class RewardTrainer:
    def __init__(self, cfg: TrainConfig, log=print):
        self.cfg = cfg = cfg.resolved()
        self.log = log
        seed_everything(cfg.seed)
        self.dist = init_distributed()
        self._check_parallel()
        self.device = self.dist.device
        self.threads = set_threads(cfg.threads)
        busy = busy_warning(self.threads) if self.device.type == "cpu" else None
        if busy:
            warnings.warn(busy)
        check_installed(parse_report_to(cfg.report_to))  # before any slow step
        self.tokenizer = load_tokenizer(cfg)
        self.encoder = Encoder(self.tokenizer, cfg.max_length, chat_template=cfg.chat_template)
        self.reports = []
        self._load_data()  # read and checked before the model: a bad data path must not cost a model load
        if cfg.eval_every and not self.eval_pairs:
            raise ValueError("--eval-every needs eval pairs: pass --eval-data, or --eval-fraction to hold some out")
        packing, why = choose_packing(cfg)
        self.cfg = cfg = dataclasses.replace(cfg, packing=packing)  # saved resolved: a resume compares layouts
        self.fsdp = self.dist.distributed and cfg.parallel in ("auto", "fsdp")
        load_cfg = dataclasses.replace(cfg, precision="fp32") if self.fsdp and cfg.precision == "bf16-master" else cfg
        hf = load_model(load_cfg, self.tokenizer)
        self.peft = None
        if cfg.lora_r:
            if self.fsdp:
                raise ValueError("--lora-r with FSDP2 is not supported yet; use --parallel ddp (the frozen base "
                                 "weights are then replicated, the adapters small)")
            self.peft = apply_lora(hf, cfg.lora_r, cfg.lora_alpha or 2.0 * cfg.lora_r, cfg.lora_dropout, cfg.lora_target)
        self.rm = RewardModel(hf).to(self.device)  # the module itself (LoRA: with peft's adapters injected)
        if cfg.liger:
            from metarm_fast.liger import apply_liger_

            apply_liger_(self.rm.hf)
        if cfg.compile:
            from metarm_fast.compile import compile_blocks_

            compile_blocks_(self.rm.hf)
        if self.fsdp:
            self.model = apply_fsdp(self.rm, self.dist, bf16_compute=cfg.precision == "bf16-master")
        elif self.dist.distributed:
            self.model = apply_ddp(self.rm, self.dist)
        else:
            self.model = self.rm  # what the steps call
        if not self.dist.is_main:
            self.log = log = lambda *a, **k: None
        log(f"metarm-fast: attention {self.rm.config._attn_implementation}, packing {cfg.packing} ({why}), "
            f"device {self.device}, {self.threads} CPU threads"
            + (f", {self.dist.world_size} ranks ({'FSDP2' if self.fsdp else 'DDP'})" if self.dist.distributed else ""))
        self.model.train()

        self.param_names = [n for n, p in self.rm.named_parameters() if p.requires_grad]
        self.params = [p for p in self.rm.parameters() if p.requires_grad]
        self._sparse_embedding()
        self.masters = None
        if cfg.precision == "bf16-master" and not self.fsdp:
            # fp32 master weights; the model's bf16 parameters are their compute copy. (Under FSDP2 the
            # sharded fp32 parameters are the masters, and the bf16 copy is FSDP2's all-gather.)
            self.masters = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        self.opt_params = self.masters if self.masters is not None else self.params
        self.optimizer = self._make_optimizer()
        self.total_steps = self._count_steps()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.meta = MetaStep(self.params, self.masters, eta=cfg.eta, direction=cfg.meta_direction,
                             optimizer=self.optimizer, opt_params=self.opt_params)
        self.pair_sampler = EpochSampler(len(self.train_pairs), cfg.batch_size * cfg.grad_accum, cfg.seed, _PAIR_STREAM)
        self.meta_sampler = (EpochSampler(len(self.meta_groups), cfg.meta_batch_size, cfg.seed, _META_STREAM)
                             if self.meta_groups else None)
        self.step = 0  # optimizer steps taken
        self.warned_vanished = False
        self.best_eval_accuracy = -1.0  # of the --keep-best export; -1: none yet
        self.pairs_done = 0
        self.train_seconds = 0.0

    # -- set-up ----------------------------------------------------------------------------------
    def _sparse_embedding(self) -> None:
        """One process, no double backward: the embedding's gradient comes sparse and is added into a
        dense .grad allocated here (``sparse_embedding_grad_`` says why). DDP and FSDP2 reduce dense
        gradients; the second-order term differentiates the backward again. (--compile leaves the
        embedding eager.)"""
        cfg = self.cfg
        if self.dist.distributed or cfg.second_order:
            return
        if sparse_embedding_grad_(self.rm.hf):
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)

    def _check_parallel(self) -> None:
        cfg, world = self.cfg, self.dist.world_size
        if cfg.parallel == "fsdp" and world == 1:
            raise ValueError("--parallel fsdp needs several ranks: start with torchrun --nproc_per_node=N")
        if world > 1 and cfg.parallel in ("auto", "fsdp") and cfg.optimizer == "adamw8bit":
            raise ValueError("--optimizer adamw8bit cannot step FSDP2's sharded (DTensor) parameters: bitsandbytes' "
                             "8-bit optimizers do not support DTensor (bitsandbytes issues 89 and 1633). Use "
                             "--optimizer adamw with FSDP2, or --parallel ddp with adamw8bit")
        if cfg.parallel == "none" and world > 1:
            raise ValueError(f"--parallel none, but torchrun started {world} ranks; use --parallel ddp or auto")
        if world > 1:
            if cfg.batch_size < world or (cfg.method == "metarm" and cfg.meta_batch_size < world):
                raise ValueError(f"--batch-size {cfg.batch_size} and --meta-batch-size {cfg.meta_batch_size} are global "
                                 f"numbers per step, split across the {world} ranks: each must be at least {world}")
            if cfg.second_order:
                raise ValueError("--second-order is single-process only (its Hessian-vector product is not "
                                 "reduced across ranks); drop it or run one process")

    def _load_data(self) -> None:
        cfg = self.cfg
        pairs, rep = pair_source(cfg.train_data, cfg)
        self.reports.append(("train", rep))
        self.eval_pairs = None
        if cfg.eval_fraction > 0 and not cfg.eval_data:
            order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
            n_eval = max(1, int(len(pairs) * cfg.eval_fraction))
            if n_eval >= len(pairs):
                raise ValueError(f"{cfg.train_data}: eval_fraction {cfg.eval_fraction} leaves no training pairs")
            self.eval_pairs = self.encode_pairs([pairs[i] for i in order[:n_eval]])
            pairs = [pairs[i] for i in order[n_eval:]]
        if not pairs:
            raise ValueError(f"{cfg.train_data}: no training pairs")
        self.train_pairs = self.encode_pairs(pairs)
        self._check_known_tokens()
        if cfg.eval_data:
            pairs, rep = pair_source(cfg.eval_data, cfg)
            self.reports.append(("eval", rep))
            self.eval_pairs = self.encode_pairs(pairs)
        self.meta_groups = None
        if cfg.meta_data:
            groups, rep = meta_source(cfg.meta_data, cfg)
            self.reports.append(("meta", rep))
            self.meta_groups = [self.encoder.encode_group(g) for g in groups]

    def _check_known_tokens(self, limit: float = 0.5) -> None:
        """Stop when most of the training text is unknown to the tokenizer (say, HH-RLHF through the
        synthetic task's 68-word vocabulary): such a run trains on <unk> tokens and reports numbers."""
        unk = self.tokenizer.unk_token_id
        if unk is None:
            return
        total = known = 0
        for it in self.train_pairs[:2000]:
            for seq in (it.chosen, it.rejected):
                ids = seq.prompt_ids + seq.response_ids
                total += len(ids)
                known += sum(1 for t in ids if t != unk)
        if total and (total - known) / total > limit:
            cfg = self.cfg
            which = cfg.tokenizer or (f"{cfg.model}'s (the synthetic task's 68-word vocabulary)"
                                      if cfg.model == "tiny-llama" else cfg.model)
            raise ValueError(
                f"{cfg.train_data}: {(total - known) / total:.0%} of the tokens are unknown to the tokenizer {which}; "
                "pass --model with a pretrained reward model (its tokenizer comes with it), or --tokenizer with "
                "one that covers this text (e.g. --model tiny-llama --tokenizer <a pretrained tokenizer>)")

    def encode_pairs(self, pairs) -> list[EncodedPair]:
        out = []
        for p in pairs:
            c, r = self.encoder.encode_pair(p)
            out.append(EncodedPair(c, r, p.margin))
        return out

    def _make_optimizer(self):
        cfg = self.cfg
        if cfg.optimizer == "adamw8bit":
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(self.opt_params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        return torch.optim.AdamW(self.opt_params, lr=cfg.lr, weight_decay=cfg.weight_decay, **adamw_impl(self.fsdp))

    def _count_steps(self) -> int:
        if self.cfg.max_steps > 0:
            return self.cfg.max_steps
        per_epoch = math.ceil(len(self.train_pairs) / (self.cfg.batch_size * self.cfg.grad_accum))
        return max(1, math.ceil(per_epoch * self.cfg.epochs))

    def _lr_factor(self, step: int) -> float:
        warm = int(self.cfg.warmup_ratio * self.total_steps)
        if step < warm:
            return (step + 1) / warm
        if self.cfg.lr_schedule == "constant":
            return 1.0
        frac = (step - warm) / max(1, self.total_steps - warm)
        if self.cfg.lr_schedule == "linear":
            return max(0.0, 1.0 - frac)
        return 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))

    # -- batches ---------------------------------------------------------------------------------
    def _dense_mask(self) -> bool:
        return self.rm.config._attn_implementation in ("sdpa", "eager")

    def pair_batch(self, items: list[EncodedPair]):
        return pair_batch(items, self.cfg.packing, self.tokenizer.pad_token_id, padding_side=self.cfg.padding_side,
                          dense_mask=self._dense_mask()).to(self.device)

    def meta_batch(self, groups):
        return meta_batch(groups, self.cfg.packing, self.tokenizer.pad_token_id, padding_side=self.cfg.padding_side,
                          dense_mask=self._dense_mask()).to(self.device)

    def step_inputs(self, step: int):
        """The micro-batches of pairs and the meta groups of optimizer step ``step`` (0-based): this
        rank's share of the global ones (all of them in a single process)."""
        items = [self.train_pairs[i] for i in self.pair_sampler.indices(step)]
        bs = self.cfg.batch_size
        micro = [shard(items[i : i + bs], self.dist) for i in range(0, len(items), bs)]
        groups = None
        if self.cfg.method == "metarm":
            groups = shard([self.meta_groups[i] for i in self.meta_sampler.indices(step)], self.dist)
        return micro, groups

    # -- the step --------------------------------------------------------------------------------
    def train_step(self, micro_batches, meta_groups=None) -> dict:
        """One optimizer step from these inputs: vanilla, or MetaRM when ``meta_groups`` is given.
        Returns its metrics; a non-finite loss skips it (weights unchanged) or stops the run."""
        cfg = self.cfg
        zero_grads(self.params)
        batches = [self.pair_batch(items) for items in micro_batches]
        # The step's global numbers of pairs and meta groups: step_inputs shards full global batches.
        if self.dist.distributed:
            global_pairs, global_groups = cfg.batch_size * len(micro_batches), cfg.meta_batch_size
        else:
            global_pairs, global_groups = sum(len(b) for b in micro_batches), len(meta_groups or ())
        meta = self.meta_batch(meta_groups) if meta_groups is not None else None
        # tokens the model runs over in this step, every pass (padding included: it is computed too)
        tokens = sum(b.num_tokens for b in batches) + (meta.num_tokens if meta is not None else 0)
        try:
            if meta is not None:
                m, stats = metarm_grads(self.model, self.meta, batches, meta,
                                        center_coef=cfg.center_coef, second_order=cfg.second_order, info=self.dist,
                                        global_pairs=global_pairs, global_groups=global_groups)
                self._warn_if_vanished(stats)
            else:
                m = l_pass(self.model, batches, cfg.center_coef, info=self.dist, global_pairs=global_pairs)
        except NonFiniteLoss as e:
            zero_grads(self.params)
            if cfg.on_nonfinite == "stop":
                raise RuntimeError(f"step {self.step + 1}: {e}; the weights were left as before the step") from None
            warnings.warn(f"step {self.step + 1}: {e}; step skipped, weights unchanged")
            return {"skipped": str(e)}
        m["grad_norm"] = self.optimizer_step()
        m["lr"] = self.scheduler.get_last_lr()[0]
        m["tokens"] = tokens
        return m

    def optimizer_step(self) -> float:
        """Clip and step from the gradients in the .grad buffers (the last part of ``train_step``)."""
        return optimizer_step(self.params, self.optimizer, self.scheduler, masters=self.masters,
                              max_grad_norm=self.cfg.max_grad_norm)

    def _warn_if_vanished(self, stats) -> None:
        if not stats.vanished or self.warned_vanished:
            return
        self.warned_vanished = True
        warnings.warn(
            f"meta step {self.step + 1}: the perturbation eta * grad J was lost to rounding in the "
            f"{self.params[0].dtype} weights (realised/intended norm {stats.ratio:.3g}, "
            f"{stats.changed} of {stats.numel} weights changed); MetaRM is acting as vanilla training. "
            + ("Use a larger --eta, or --precision fp32." if self.cfg.precision == "bf16-master"
               else "Use --precision fp32 or bf16-master (fp32 master weights), or a larger --eta.")
        )

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything an exact continuation needs (a DCP state dict: nested dicts of tensors and values)."""
        model_state = self.rm.state_dict()
        if self.masters is not None:
            # The compute copy is round(master) exactly: the masters alone are saved, and re-cast on load.
            for n in self.param_names:
                model_state.pop(n)
        sd = {
            "model": model_state,
            "optimizer": ckpt.flatten(self.optimizer.state_dict()),
            "scheduler": self.scheduler.state_dict(),
            "train": {
                "step": self.step,
                "warned_vanished": self.warned_vanished,
                "best_eval_accuracy": self.best_eval_accuracy,
                "pairs_done": self.pairs_done,
                "train_seconds": self.train_seconds,
                "torch_rng": torch.get_rng_state(),
                "python_rng": random.getstate(),
                "config": self.cfg.to_dict(),
                # Where the fp32 weights are: "masters" (one process, bf16 compute copy re-cast from
                # them) or "params" (the model's own parameters: fp32 runs, FSDP2's sharded masters).
                "layout": "masters" if self.masters is not None else "params",
            },
        }
        if self.masters is not None:
            sd["masters"] = dict(zip(self.param_names, self.masters))
        return sd

    def load_state_dict_from(self, path: str) -> None:
        """Continue from the checkpoint at ``path`` (refuses one whose run settings differ)."""
        self._init_optimizer_state()
        sd = self.state_dict()
        probe = {"train": {"config": sd["train"]["config"], "layout": sd["train"]["layout"]}}
        ckpt.load_checkpoint(path, probe)
        diff = self.cfg.run_differences(probe["train"]["config"])
        if diff:
            saved = probe["train"]["config"]
            raise ValueError(
                f"--resume {path}: the checkpoint was written by a run with other settings: "
                + ", ".join(f"{k}={saved[k]!r} (now {getattr(self.cfg, k)!r})" for k in diff)
                + "; resume with the same settings, or start a new run in another --output-dir"
            )
        saved, mine = probe["train"]["layout"], sd["train"]["layout"]
        if saved == "params" and mine == "masters":  # e.g. FSDP2 bf16 -> one process: its weights are our masters
            sd["model"].update(sd.pop("masters"))
        elif saved == "masters" and mine == "params":  # one process bf16-master -> FSDP2: our params are its masters
            sd["masters"] = {n: sd["model"].pop(n) for n in self.param_names}
        ckpt.load_checkpoint(path, sd)
        if self.masters is not None:
            with torch.no_grad():
                for p, m in zip(self.params, self.masters):
                    p.copy_(m)
        self.optimizer.load_state_dict(ckpt.unflatten(sd["optimizer"]))
        self.scheduler.load_state_dict(sd["scheduler"])
        t = sd["train"]
        self.step, self.warned_vanished = int(t["step"]), bool(t["warned_vanished"])
        self.pairs_done, self.train_seconds = int(t["pairs_done"]), float(t["train_seconds"])
        self.best_eval_accuracy = float(t["best_eval_accuracy"])
        torch.set_rng_state(t["torch_rng"])
        random.setstate(t["python_rng"])

    @torch.no_grad()
    def _init_optimizer_state(self) -> None:
        """Create the optimizer's per-parameter state (a step with zero gradients and lr 0), so that a
        checkpoint's state can be loaded into tensors of the right shapes. The weights do not move."""
        if self.optimizer.state:
            return
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        for g in self.optimizer.param_groups:
            g["lr"] = 0.0
        for p in self.opt_params:
            p.grad = torch.zeros_like(p)
        self.optimizer.step()
        for p in self.opt_params:
            p.grad = None if self.masters is not None else p.grad.zero_()
        for g, lr in zip(self.optimizer.param_groups, lrs):
            g["lr"] = lr

    # -- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def score_pairs(self, pairs: list[EncodedPair]):
        self.rm.eval()
        rc, rr = [], []
        bs = self.cfg.eval_batch_size
        for i in range(0, len(pairs), bs):
            items = pairs[i : i + bs]
            r = self.rm(self.pair_batch(items))
            rc.append(r[: len(items)])
            rr.append(r[len(items) :])
        self.rm.train()
        return torch.cat(rc).cpu(), torch.cat(rr).cpu()

    def evaluate(self, pairs: list[EncodedPair] | None = None) -> dict:
        pairs = self.eval_pairs if pairs is None else pairs
        rc, rr = self.score_pairs(pairs)
        return pair_metrics(rc, rr)

    @torch.no_grad()
    def meta_gaps(self, max_groups: int = 256) -> torch.Tensor:
        self.rm.eval()
        gaps = []
        for i in range(0, min(len(self.meta_groups), max_groups), self.cfg.meta_batch_size):
            batch = self.meta_batch(self.meta_groups[i : min(i + self.cfg.meta_batch_size, max_groups)])
            gaps.append(group_gaps(self.rm(batch), batch.offsets).cpu())
        self.rm.train()
        return torch.cat(gaps)

    # -- the loop --------------------------------------------------------------------------------
    def train(self) -> dict:
        """Run (or continue) the training; returns the summary. Stopped by SIGINT/SIGTERM, it finishes
        the step, writes a checkpoint and returns with ``summary["interrupted"]`` set. With several
        ranks, rank 0 alone decides about the output folder, writes the metrics, the progress bar,
        the evaluation and the export; every rank takes part in the checkpoints."""
        from tqdm.auto import tqdm

        cfg, main = self.cfg, self.dist.is_main
        decision = None
        if main:
            try:
                decision = ("resume", prepare_output_dir(cfg))
            except ValueError as e:
                decision = ("error", str(e))
        kind, value = broadcast_object(decision, self.dist)
        if kind == "error":
            raise ValueError(value)
        resume_from = value
        if resume_from:
            self.load_state_dict_from(resume_from)
            self.log(f"metarm-fast: resuming from {resume_from} (step {self.step} of {self.total_steps})")
        if main:
            write_config(cfg)
        evaluates = main or self.fsdp  # under FSDP2 every forward is a collective: all ranks evaluate, rank 0 writes
        initial_gaps = os.path.join(cfg.output_dir, INITIAL_GAPS)
        need_baseline = broadcast_object(bool(self.meta_groups) and not os.path.exists(initial_gaps), self.dist)
        if need_baseline and evaluates:
            gaps = self.meta_gaps()  # the histogram's baseline: the model before its first step
            if main:
                torch.save(gaps, initial_gaps)
        metrics = open_metrics(cfg.output_dir, self.step) if main else open(os.devnull, "w")  # rank 0 alone writes
        trackers = Trackers(parse_report_to(cfg.report_to) if main else [], cfg.output_dir, cfg.to_dict(), self.step)
        stop = _StopRequest()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (cfg.progress and main), unit="step",
                   dynamic_ncols=True)
        root = os.path.join(cfg.output_dir, CHECKPOINTS)
        saved_at = self.step if resume_from else None
        postfix = {}
        try:
            with stop.installed():
                while self.step < self.total_steps:
                    t0 = time.perf_counter()
                    m = self.train_step(*self.step_inputs(self.step))
                    seconds = time.perf_counter() - t0
                    self.train_seconds += seconds
                    self.step += 1
                    self.pairs_done += m.get("pairs", 0)
                    rate = self.pairs_done / max(self.train_seconds, 1e-9)
                    m.update(step=self.step, pairs_per_s=round(rate, 2), step_s=round(seconds, 6))
                    if "tokens" in m:
                        m["tokens_per_s"] = round(m["tokens"] / max(seconds, 1e-9), 1)
                    if cfg.eval_every and self.step % cfg.eval_every == 0 and evaluates:
                        m["eval"] = self.evaluate()
                        postfix["eval_acc"] = f"{m['eval']['accuracy']:.3f}"
                        better = m["eval"]["accuracy"] > self.best_eval_accuracy
                        if self.fsdp:  # every rank must join the gather below, or none
                            better = broadcast_object(better, self.dist)
                        if cfg.keep_best and better:
                            self.best_eval_accuracy = m["eval"]["accuracy"]
                            full = full_state_dict(self.rm) if self.fsdp else None
                            if main:
                                self.export(os.path.join(cfg.output_dir, BEST), {"eval": m["eval"]}, full_state=full)
                    if self.step % cfg.log_every == 0 or self.step == self.total_steps or "eval" in m:
                        metrics.write(json.dumps(m) + "\n")
                        metrics.flush()
                        trackers.log(m)
                    if "loss" in m:
                        postfix.update(loss=f"{m['loss']:.4f}", acc=f"{m['accuracy']:.2f}", pairs_s=f"{rate:.1f}")
                        bar.set_postfix(postfix)
                    bar.update(1)
                    stopping = any_rank(stop.requested is not None, self.dist)
                    if stopping or (cfg.save_every and self.step % cfg.save_every == 0):
                        metrics.flush()
                        if main:  # (fsync refuses /dev/null)
                            os.fsync(metrics.fileno())
                        ckpt.save_checkpoint(root, self.step, self.state_dict(), cfg.keep_last, info=self.dist)
                        saved_at = self.step
                    if stopping:
                        bar.close()
                        metrics.close()
                        return {"interrupted": stop.requested or "a signal on another rank", "steps": self.step,
                                "checkpoint": ckpt.step_dir(root, self.step)}
        finally:
            bar.close()
            trackers.close()  # once, on any exit from the loop
        if saved_at != self.step:
            ckpt.save_checkpoint(root, self.step, self.state_dict(), cfg.keep_last, info=self.dist)
        summary = {"steps": self.step, "train_time_s": round(self.train_seconds, 2),
                   "pairs_per_s": round(self.pairs_done / max(self.train_seconds, 1e-9), 2)}
        if evaluates:
            if self.eval_pairs:
                summary["eval"] = self.evaluate()
                if cfg.train_data.startswith("synthetic") and cfg.eval_data != "synthetic:shifted":
                    shifted, _ = pair_source("synthetic:shifted", cfg)
                    summary["eval_shifted"] = self.evaluate(self.encode_pairs(shifted[:256]))
            else:
                # PPO normalises rewards with their mean and std: without an eval set they come from
                # (up to 1024 of) the training pairs, and the summary says so.
                summary["train_rewards"] = self.evaluate(self.train_pairs[:1024])
            if self.meta_groups:
                gaps = self.meta_gaps()
                summary["meta_gaps"] = {"mean": float(gaps.mean()), "median": float(gaps.median()), "n": gaps.numel()}
                if main:
                    before = torch.load(initial_gaps) if os.path.exists(initial_gaps) else None
                    if before is not None:
                        summary["meta_gaps_initial"] = {"mean": float(before.mean()), "median": float(before.median())}
                    summary["meta_gap_histogram"] = save_gap_histogram(
                        gaps, os.path.join(cfg.output_dir, GAP_HISTOGRAM), baseline=before,
                        label=f"after {self.step} steps ({cfg.method})")
        if main:
            metrics.flush()
            summary["training_curves"] = save_training_curves(os.path.join(cfg.output_dir, METRICS),
                                                              os.path.join(cfg.output_dir, TRAINING_CURVES))
            if cfg.keep_best and self.best_eval_accuracy >= 0:
                summary["best"] = {"path": os.path.join(cfg.output_dir, BEST), "eval_accuracy": self.best_eval_accuracy}
        full = full_state_dict(self.rm) if self.fsdp else None  # gathered by every rank
        if main:
            metrics.write(json.dumps({"final": summary}) + "\n")
            self.export(cfg.output_dir, summary, full_state=full)
        metrics.close()
        barrier(self.dist)
        summary["truncated_records"] = self.encoder.truncated
        summary["prompt_lost_records"] = self.encoder.prompt_lost
        return summary

    # -- the export ------------------------------------------------------------------------------
    def export(self, out_dir: str, summary: dict | None = None, full_state: dict | None = None) -> None:
        """The Hugging Face checkpoint (weights, tokenizer, reward mean/std), apart from the resume
        checkpoints. Written into a temporary folder, then each file moved into place, so a crash
        while writing never leaves a half-written weights file under the final name."""
        hf = self.rm.hf
        tmp = os.path.join(out_dir, ".export.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        stats = (summary or {}).get("eval") or (summary or {}).get("train_rewards")
        if stats:
            # PPO trainers normalise rewards with these.
            hf.config.reward_mean = stats["reward_mean"]
            hf.config.reward_std = stats["reward_std"]
            hf.config.reward_stats_from = "eval pairs" if "eval" in summary else "training pairs (no eval set)"
        state_dict = None
        if full_state is not None:  # FSDP2: the gathered fp32 weights (the masters)
            state_dict = {k.removeprefix("hf."): v for k, v in full_state.items()}
        elif self.masters is not None:
            # Save the fp32 masters, not their rounded bf16 compute copy.
            state_dict = dict(hf.state_dict())
            state_dict.update({n.removeprefix("hf."): m.detach() for n, m in zip(self.param_names, self.masters)})
        if self.peft is not None:
            # The merged model (a plain checkpoint) in the folder, the adapter with its head beside it.
            merged = merged_copy(self.peft)  # a copy: its config holds the reward statistics set above
            merged.save_pretrained(tmp)
            self.peft.save_pretrained(os.path.join(tmp, ADAPTER_DIR))
            del merged
        else:
            hf.save_pretrained(tmp, state_dict=state_dict)
        self.tokenizer.save_pretrained(tmp)
        for name in sorted(os.listdir(tmp)):
            dest = os.path.join(out_dir, name)
            if os.path.isdir(dest):  # the adapter folder of an earlier export
                shutil.rmtree(dest)
            os.replace(os.path.join(tmp, name), dest)
        os.rmdir(tmp)


class _StopRequest:
    """SIGINT/SIGTERM ask the loop to finish its step, save and return; a second SIGINT stops at once
    (KeyboardInterrupt: the meta step restores the weights on its way out)."""

    def __init__(self):
        self.requested: str | None = None

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)


# -- the output folder -------------------------------------------------------------------------------
_RUN_FILES = (METRICS, CONFIG, CHECKPOINTS, "config.json", "model.safetensors", GAP_HISTOGRAM, TRAINING_CURVES,
              INITIAL_GAPS, BEST, TENSORBOARD_DIR, ADAPTER_DIR, "wandb")



def prepare_output_dir(cfg: TrainConfig) -> str | None:
    """Decide between a fresh start and a resume; returns the checkpoint to resume from, or None.

    A fresh start into a folder holding another run's files stops with a message (``--overwrite``
    removes them first). ``--resume auto`` takes the latest complete checkpoint, or starts fresh when
    there is none (over a run of the same settings that crashed before its first checkpoint)."""
    out = cfg.output_dir
    root = os.path.join(out, CHECKPOINTS)
    if cfg.resume and cfg.resume != "auto":
        path = cfg.resume
        if not os.path.isfile(os.path.join(path, ".metadata")):
            latest = ckpt.latest_checkpoint(path) or ckpt.latest_checkpoint(os.path.join(path, CHECKPOINTS))
            if latest is None:
                raise ValueError(f"--resume {path}: no complete checkpoint there (a checkpoint is a "
                                 f"{CHECKPOINTS}/step-NNNNNNNN folder written by --save-every or a stop)")
            path = latest
        return path
    if cfg.resume == "auto":
        latest = ckpt.latest_checkpoint(root)
        if latest:
            return latest
    present = [f for f in _RUN_FILES if os.path.exists(os.path.join(out, f))]
    if present and not cfg.overwrite:
        same = cfg.resume == "auto" and _saved_config_matches(cfg)
        if not same:
            raise ValueError(f"output dir {out} holds another run's files ({', '.join(present)}); pass --overwrite "
                             "to replace them, --resume auto to continue that run, or another --output-dir")
    for f in present:
        p = os.path.join(out, f)
        shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    return None


def _saved_config_matches(cfg: TrainConfig) -> bool:
    import yaml

    path = os.path.join(cfg.output_dir, CONFIG)
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        saved = yaml.safe_load(f) or {}
    return not cfg.run_differences(saved)


def write_config(cfg: TrainConfig) -> None:
    import yaml

    os.makedirs(cfg.output_dir, exist_ok=True)
    path = os.path.join(cfg.output_dir, CONFIG)
    with open(path + ".tmp", "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    os.replace(path + ".tmp", path)


def open_metrics(out_dir: str, step: int):
    """metrics.jsonl for appending, holding exactly the lines of steps 1..``step`` (a resume drops the
    lines a crashed run wrote after its last checkpoint)."""
    path = os.path.join(out_dir, METRICS)
    kept = []
    if step > 0 and os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
                if "step" in rec and rec["step"] <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)
    return open(path, "a")


def pair_metrics(rc: torch.Tensor, rr: torch.Tensor) -> dict:
    all_r = torch.cat([rc, rr]).double()
    return {
        "pairs": int(rc.numel()),
        "accuracy": float((rc > rr).double().mean()),
        "loss": float(-torch.nn.functional.logsigmoid((rc - rr).double()).mean()),  # Bradley-Terry, no margin
        "reward_gap_mean": float((rc - rr).double().mean()),
        "reward_mean": float(all_r.mean()),
        "reward_std": float(all_r.std()) if all_r.numel() > 1 else 0.0,
    }
