"""The reward-model trainer: the wiring of a run, its step and its loop.

A step, in order: ``step_inputs`` picks the step's pairs and meta groups (a function of the seed and
the step alone), ``train_step`` batches them and runs the step functions of ``metarm_fast.steps``
(the meta step's transaction is ``metarm_fast.meta_step.MetaStep``), then ``optimizer_step`` steps
the weights and advances the step count. The parts have their own owners: ``Weights`` (params,
masters, the master step), ``Batcher`` (the layout), ``Checkpointer`` over ``TrainState`` (resume),
``RunLog`` (metrics, trackers, progress; rank 0), ``scoring`` and ``export``.
Gradient buffers stay allocated between steps (zeroed, not freed): the meta step keeps its
exact-restore information in them, so its memory equals the vanilla step's.
"""
from __future__ import annotations

import dataclasses
import os
import random
import time
import warnings

import torch

from metarm_fast.batch import Batcher, step_tokens
from metarm_fast.build import build_model, check_parallel, count_steps, make_optimizer, make_scheduler
from metarm_fast.config import TrainConfig
from metarm_fast.data import Encoder
from metarm_fast.export import export_model
from metarm_fast.meta_step import MetaStep, rounding_message
from metarm_fast.model import choose_packing, load_tokenizer
from metarm_fast.parallel import any_rank, barrier, broadcast_object, full_state_dict, init_distributed, shard
from metarm_fast.plots import GAP_HISTOGRAM, TRAINING_CURVES, gap_report, save_training_curves
from metarm_fast.run_dir import BEST, CHECKPOINTS, INITIAL_GAPS, METRICS, agree_on_start, check_output_dir, write_config
from metarm_fast.run_log import RunLog
from metarm_fast.sampler import EpochSampler
from metarm_fast.scoring import evaluate_pairs, meta_gaps
from metarm_fast.steps import NonFiniteLoss, Replayable, gradient_change, group_pass, l_pass, metarm_grads
from metarm_fast.stop import StopRequest
from metarm_fast.threads import busy_warning, set_threads
from metarm_fast.tracking import check_installed, parse_report_to
from metarm_fast.train_data import load_train_data
from metarm_fast.train_state import Checkpointer, TrainState
from metarm_fast.weights import Weights

_PAIR_STREAM, _META_STREAM = 1, 2


class RewardTrainer:
    def __init__(self, cfg: TrainConfig, log=print):
        self.cfg = cfg = cfg.resolved()
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.dist = init_distributed()
        check_parallel(cfg, self.dist.world_size)
        self.threads = set_threads(cfg.threads)
        busy = busy_warning(self.threads) if self.dist.device.type == "cpu" and self.dist.is_main else None
        if busy:
            warnings.warn(busy)
        check_installed(parse_report_to(cfg.report_to))  # before any slow step
        check_output_dir(cfg)
        self.tokenizer = load_tokenizer(cfg)
        self.encoder = Encoder(self.tokenizer, cfg.max_length, chat_template=cfg.chat_template)
        self.data = load_train_data(cfg, self.encoder, self.tokenizer)  # before the model: a bad path costs no load
        packing, why = choose_packing(cfg)
        self.cfg = cfg = dataclasses.replace(cfg, packing=packing)  # saved resolved: a resume compares layouts
        built = build_model(cfg, self.tokenizer, self.dist)
        self.rm, self.model, self.peft, self.fsdp = built.rm, built.model, built.peft, built.fsdp
        self.log = log if self.dist.is_main else (lambda *a, **k: None)
        self.log(f"metarm-fast: attention {self.rm.config._attn_implementation}, packing {cfg.packing} ({why}), "
                 f"device {self.dist.device}, {self.threads} CPU threads"
                 + (f", {self.dist.world_size} ranks ({'FSDP2' if self.fsdp else 'DDP'})" if self.dist.distributed else ""))
        self.model.train()
        # bf16-master: fp32 masters with the model's bf16 parameters as their compute copy (under FSDP2
        # the sharded fp32 parameters are the masters, and the bf16 copy is FSDP2's all-gather).
        self.weights = Weights(self.rm, masters=cfg.precision == "bf16-master" and not self.fsdp)
        if not (self.dist.distributed or cfg.second_order):  # DDP/FSDP2 reduce dense gradients
            self.weights.sparse_embedding(self.rm.hf)
        self.batcher = Batcher.for_model(self.rm, cfg, self.tokenizer.pad_token_id, self.dist.device)
        self.optimizer = make_optimizer(cfg, self.weights.opt_params, sharded=self.fsdp)
        self.total_steps = count_steps(cfg, len(self.data.train_pairs))
        self.scheduler = make_scheduler(cfg, self.optimizer, self.total_steps)
        self.meta = MetaStep(self.weights, eta=cfg.eta, direction=cfg.meta_direction, optimizer=self.optimizer,
                             max_grad_norm=cfg.max_grad_norm)
        self.pair_sampler = EpochSampler(len(self.data.train_pairs), cfg.batch_size * cfg.grad_accum, cfg.seed,
                                         _PAIR_STREAM)
        self.meta_sampler = (EpochSampler(len(self.data.meta_groups), cfg.meta_batch_size, cfg.seed, _META_STREAM)
                             if self.data.meta_groups else None)
        self.state = TrainState()
        self.checkpointer = Checkpointer(os.path.join(cfg.output_dir, CHECKPOINTS), cfg, self.weights, self.optimizer,
                                         self.scheduler, self.state, keep_last=cfg.keep_last, info=self.dist)

    @property
    def step(self) -> int:
        """Optimizer steps taken (advanced by ``optimizer_step`` alone)."""
        return self.state.step

    # -- the step --------------------------------------------------------------------------------
    def step_inputs(self, step: int):
        """The micro-batches of pairs and the meta groups of optimizer step ``step`` (0-based): this
        rank's share of the global ones (all of them in a single process)."""
        items = [self.data.train_pairs[i] for i in self.pair_sampler.indices(step)]
        bs = self.cfg.batch_size
        micro = [shard(items[i : i + bs], self.dist) for i in range(0, len(items), bs)]
        groups = None
        if self.cfg.method == "metarm":
            groups = shard([self.data.meta_groups[i] for i in self.meta_sampler.indices(step)], self.dist)
        return micro, groups

    def train_step(self, micro_batches, meta_groups=None) -> dict:
        """One optimizer step from these inputs: vanilla, or MetaRM when ``meta_groups`` is given; the
        step count advances. Returns its metrics; a non-finite loss skips it (weights unchanged) or
        stops the run."""
        cfg = self.cfg
        self.weights.zero_grads()
        batches = [self.batcher.train(items) for items in micro_batches]
        meta = self.batcher.groups(meta_groups) if meta_groups is not None else None
        # The step's global numbers of pairs (or k-response records) and meta groups: step_inputs
        # shards full global batches.
        if self.dist.distributed:
            global_items, global_groups = cfg.batch_size * len(micro_batches), cfg.meta_batch_size
        else:
            global_items, global_groups = sum(len(b) for b in micro_batches), len(meta_groups or ())
        if batches[0].scores is not None:  # k-response records: the group loss over each record
            def l_pass_fn():
                return group_pass(self.model, batches, kind=cfg.group_loss, margin_scale=cfg.score_margin,
                                  info=self.dist, global_groups=global_items)
        else:
            def l_pass_fn():
                return l_pass(self.model, batches, cfg.center_coef, info=self.dist, global_pairs=global_items)
        try:
            if meta is not None:
                diagnose = bool(cfg.meta_diagnostic_every) and (self.step + 1) % cfg.meta_diagnostic_every == 0
                # the diagnostic's pass at theta draws the dropout masks of the pass at theta'
                replay = Replayable(l_pass_fn, self.dist.device) if diagnose else None
                m, stats = metarm_grads(self.model, self.meta, batches, meta, second_order=cfg.second_order,
                                        info=self.dist, global_groups=global_groups,
                                        l_pass_fn=replay.first if replay else l_pass_fn, measure_move=diagnose)
                self._warn_if_rounded(stats)
                if replay:
                    m.update(gradient_change(self.weights.params, replay.again, self.dist))
            else:
                m = l_pass_fn()
        except NonFiniteLoss as e:
            self.weights.zero_grads()
            if cfg.on_nonfinite == "stop":
                raise RuntimeError(f"step {self.step + 1}: {e}; the weights were left as before the step") from None
            warnings.warn(f"step {self.step + 1}: {e}; step skipped, weights unchanged")
            self.state.step += 1
            return {"skipped": str(e)}
        m["grad_norm"] = self.optimizer_step()
        m["lr"] = self.scheduler.get_last_lr()[0]
        m["tokens"] = step_tokens(batches, meta)
        return m

    def optimizer_step(self) -> float:
        """Clip and step from the .grad buffers, advance the schedule and the step count: the end of
        every step. Returns the gradient norm before clipping."""
        norm = self.weights.step(self.optimizer, self.scheduler, self.cfg.max_grad_norm)
        self.state.step += 1
        return norm

    def _warn_if_rounded(self, stats) -> None:
        """Once per run: the perturbation was lost to rounding, or rounding dominated it."""
        message = None if self.state.warned_vanished else \
            rounding_message(stats, self.step + 1, self.weights.params[0].dtype, self.cfg.precision)
        if message:
            self.state.warned_vanished = True
            warnings.warn(message)

    # -- evaluation and export -------------------------------------------------------------------
    def evaluate(self, pairs=None) -> dict:
        pairs = self.data.eval_pairs if pairs is None else pairs
        return evaluate_pairs(self.rm, self.batcher, pairs, self.cfg.eval_batch_size)

    def meta_gaps(self) -> torch.Tensor:
        return meta_gaps(self.rm, self.batcher, self.data.meta_groups, self.cfg.meta_batch_size)

    def export(self, out_dir: str, summary: dict | None = None) -> None:
        """The Hugging Face checkpoint. Under FSDP2 every rank joins the gather; rank 0 writes."""
        state = full_state_dict(self.rm) if self.fsdp else self.weights.export_state()
        if self.dist.is_main:
            if self.fsdp:
                state = {k.removeprefix("hf."): v for k, v in state.items()}
            export_model(out_dir, self.rm.hf, self.tokenizer, state_dict=state, peft=self.peft, summary=summary,
                         cfg=self.cfg)

    # -- the loop --------------------------------------------------------------------------------
    def train(self) -> dict:
        """Run (or continue) the training; returns the summary. Stopped by SIGINT/SIGTERM, it finishes
        the step, writes a checkpoint and returns with ``summary["interrupted"]`` set. With several
        ranks, rank 0 alone decides about the output folder and writes the metrics, the progress bar
        and the export; every rank takes part in the checkpoints (and under FSDP2 in every forward)."""
        resumed = self._start()
        cfg, state = self.cfg, self.state
        log = RunLog(cfg, state.step, self.total_steps, main=self.dist.is_main)
        stop = StopRequest()
        saved_at = state.step if resumed else None
        try:
            with stop.installed():
                while state.step < self.total_steps:
                    t0 = time.perf_counter()
                    m = self.train_step(*self.step_inputs(state.step))
                    seconds = time.perf_counter() - t0
                    state.train_seconds += seconds
                    state.pairs_done += m.get("pairs", 0)
                    m.update(step=state.step, pairs_per_s=round(state.pairs_per_s, 2), step_s=round(seconds, 6))
                    if "tokens" in m:
                        m["tokens_per_s"] = round(m["tokens"] / max(seconds, 1e-9), 1)
                    if cfg.eval_every and state.step % cfg.eval_every == 0:
                        self._evaluate_during(m)
                    log.step(m, state.pairs_per_s)
                    stopping = any_rank(stop.requested is not None, self.dist)
                    if stopping or (cfg.save_every and state.step % cfg.save_every == 0):
                        log.durable()
                        self.checkpointer.save()
                        saved_at = state.step
                    if stopping:
                        return {"interrupted": stop.requested or "a signal on another rank", "steps": state.step,
                                "checkpoint": self.checkpointer.step_dir()}
            if saved_at != state.step:
                self.checkpointer.save()
            summary = self._summary(log)
        finally:
            log.close()  # once, on any exit from the loop
        barrier(self.dist)
        return summary

    def _start(self) -> bool:
        """The output folder (rank 0 decides), the resume, the saved config and the gap histogram's
        baseline; returns whether the run resumed."""
        cfg, main = self.cfg, self.dist.is_main
        resume_from = agree_on_start(cfg, self.dist)
        if resume_from:
            self.checkpointer.load(resume_from)
            self.log(f"metarm-fast: resuming from {resume_from} (step {self.step} of {self.total_steps})")
        if main:
            write_config(cfg)
        initial = os.path.join(cfg.output_dir, INITIAL_GAPS)
        if broadcast_object(bool(self.data.meta_groups) and not os.path.exists(initial), self.dist) and self._evaluates:
            gaps = self.meta_gaps()  # the histogram's baseline: the model before its first step
            if main:
                torch.save(gaps, initial)
        return bool(resume_from)

    @property
    def _evaluates(self) -> bool:
        return self.dist.is_main or self.fsdp  # under FSDP2 every forward is a collective: all ranks evaluate

    def _evaluate_during(self, m: dict) -> None:
        """--eval-every: the eval metrics into ``m``; --keep-best: export a better model to BEST."""
        if not self._evaluates:
            return
        m["eval"] = self.evaluate()
        better = broadcast_object(m["eval"]["accuracy"] > self.state.best_eval_accuracy, self.dist) \
            if self.fsdp else m["eval"]["accuracy"] > self.state.best_eval_accuracy  # every rank joins the gather, or none
        if self.cfg.keep_best and better:
            self.state.best_eval_accuracy = m["eval"]["accuracy"]
            self.export(os.path.join(self.cfg.output_dir, BEST), {"eval": m["eval"]})

    def _summary(self, log: RunLog) -> dict:
        """The closing evaluation, figures and export; returns the summary."""
        cfg, state, out = self.cfg, self.state, self.cfg.output_dir
        summary = {"steps": state.step, "train_time_s": round(state.train_seconds, 2),
                   "pairs_per_s": round(state.pairs_per_s, 2)}
        if self._evaluates:
            if self.data.eval_pairs:
                summary["eval"] = self.evaluate()
                if self.data.shifted_pairs:
                    summary["eval_shifted"] = self.evaluate(self.data.shifted_pairs)
            else:
                # PPO normalises rewards with their mean and std: without an eval set they come from
                # (up to 1024 of) the training pairs, and the summary says so.
                summary["train_rewards"] = self.evaluate(self.data.train_pairs[:1024])
            if self.data.meta_groups:
                summary.update(gap_report(self.meta_gaps(), os.path.join(out, INITIAL_GAPS), os.path.join(out, GAP_HISTOGRAM),
                                          f"after {state.step} steps ({cfg.method})", write=self.dist.is_main))
        if self.dist.is_main:
            log.flush()
            summary["training_curves"] = save_training_curves(os.path.join(out, METRICS), os.path.join(out, TRAINING_CURVES))
            if cfg.keep_best and state.best_eval_accuracy >= 0:
                summary["best"] = {"path": os.path.join(out, BEST), "eval_accuracy": state.best_eval_accuracy}
            log.final(summary)
        self.export(out, summary)
        summary["truncated_records"] = self.encoder.truncated
        summary["prompt_lost_records"] = self.encoder.prompt_lost
        return summary
