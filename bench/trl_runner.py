"""TRL's RewardTrainer as a bench.throughput runner.

A model with the same class, size, attention backend and initial weights as ours, over a
datasets.Dataset of the same token ids (`chosen_ids`/`rejected_ids`, TRL's processed format, in the
same order: sequential sampler), with TRL's own collator, optimizer (its default, fused AdamW) and
scheduler, prepared by Trainer's own `_prepare_for_training`. One step = what Trainer's inner loop
does per optimizer step: the step's micro-batches from `get_train_dataloader()` (its own
`get_batch_samples`; collation happens there, our steps collate inside train_step too), `training_step`
on each (the loss divided by their number, as Trainer does), clip to max_grad_norm, `optimizer.step()`,
`lr_scheduler.step()`, `model.zero_grad()`. Not included: its callbacks, logging and FLOP
bookkeeping (all cheap here). TRL has no padding-free reward training, so it runs padded only.
Each step's micro-batches are the runner's `batches[i]` (every one of the same number of pairs).
"""
from __future__ import annotations


import torch

from bench.runners import Runner, TokenCounter, now
from metarm_fast.config import TrainConfig
from metarm_fast.memory import step_peak_bytes as peak
from metarm_fast.weights import Weights


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

    def _update(self, micro: list[dict]) -> None:
        tt = self.trainer
        # set by Trainer's loop before each optimizer step; training_step divides the loss by it
        tt.current_gradient_accumulation_steps = len(micro)
        self.last_pairs = sum(inputs["input_ids"].shape[0] // 2 for inputs in micro)  # [chosen..., rejected...]
        loss = 0.0
        for inputs in micro:
            loss += tt.training_step(self.model, inputs, None)
        self.last_loss = float(loss)
        if tt.args.max_grad_norm > 0:
            tt._clip_grad_norm(self.model)
        tt.optimizer.step()
        tt.lr_scheduler.step()
        self.model.zero_grad()
        tt.state.global_step += 1

    def step(self, i: int) -> float:
        if i == self.next_i - 1:  # --repeat: the micro-batches its dataloader gave last time (no new fetch)
            micro = [dict(inputs) for inputs in self.last_inputs]
            t0 = now()
            self._update(micro)
            return now() - t0
        if i != self.next_i:
            raise RuntimeError(f"trl: steps must come in order (asked for {i}, next is {self.next_i})")
        self.next_i += 1
        t0 = now()
        micro, _ = self.trainer.get_batch_samples(self.iter, len(self.batches[i]), self.model.device)
        self.last_inputs = [dict(inputs) for inputs in micro]
        check = None if self.checked_batch else [inputs["input_ids"].clone() for inputs in micro]
        self._update(micro)
        t = now() - t0
        if check is not None:  # the same batches as ours, token for token (outside the timing)
            from metarm_fast.data import collate

            pad = self.trainer.processing_class.pad_token_id
            for mb, theirs in zip(self.batches[i], check, strict=True):
                ours = collate([p.chosen for p in mb] + [p.rejected for p in mb], pad)["input_ids"]
                if not torch.equal(ours, theirs.cpu()):
                    raise RuntimeError("trl: its batch differs from ours (order or padding)")
            self.checked_batch = True
        return t

    def trained_pairs(self) -> int:
        return self.last_pairs

    def step_loss(self) -> float:
        return self.last_loss

    def measure_peak(self, i: int) -> None:
        ds = self.trainer.train_dataset
        batch, n_micro = len(self.batches[0][0]), len(self.batches[0])
        start = i * n_micro * batch
        micro = [self.trainer.data_collator([ds[k] for k in range(s, s + batch)])
                 for s in range(start, start + n_micro * batch, batch)]
        device = self.model.device
        micro = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in m.items()} for m in micro]
        optimizer = getattr(self.trainer.optimizer, "optimizer", self.trainer.optimizer)
        self.peak_bytes = peak(Weights(self.model), optimizer, lambda: self._update([dict(m) for m in micro]))

