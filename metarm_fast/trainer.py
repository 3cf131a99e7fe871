"""The reward-model trainer: vanilla Bradley-Terry steps and MetaRM steps on one loop.

Gradient buffers are kept allocated between steps (zeroed, not freed), as DeepSpeed and FSDP keep
theirs: the meta step stores its exact-restore information in them, so both kinds of step hold the
same buffers and the meta step's memory equals the vanilla step's (see meta_step.py).
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass

import torch

from metarm_fast.config import TrainConfig
from metarm_fast.data import Encoder, collate
from metarm_fast.kernels import bt_loss, difference_loss
from metarm_fast.meta_step import (
    MetaState,
    adam_second_moments,
    finite,
    perturb,
    perturbed,
    second_order_correction_,
    vanished,
)
from metarm_fast.model import load_model, load_tokenizer, score_batch
from metarm_fast.sources import meta_source, pair_source
from metarm_fast.threads import busy_warning, set_threads


# The J implementation the second-order term differentiates twice (see _metarm_grads).
SECOND_ORDER_J_IMPL = "torch"


@dataclass
class EncodedPair:
    chosen: object  # EncodedSeq
    rejected: object
    margin: float | None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class RewardTrainer:
    def __init__(self, cfg: TrainConfig, log=print):
        self.cfg = cfg = cfg.resolved()
        self.log = log
        seed_everything(cfg.seed)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.threads = set_threads(cfg.threads)
        busy = busy_warning(self.threads) if self.device.type == "cpu" else None
        if busy:
            warnings.warn(busy)
        self.tokenizer = load_tokenizer(cfg)
        self.model = load_model(cfg, self.tokenizer).to(self.device)
        log(f"metarm-fast: attention {self.model.config._attn_implementation}, packing {cfg.packing}, "
            f"device {self.device}, {self.threads} CPU threads")
        self.model.train()
        self.encoder = Encoder(self.tokenizer, cfg.max_length, chat_template=cfg.chat_template)
        self.reports = []

        pairs, rep = pair_source(cfg.train_data, cfg)
        self.reports.append(("train", rep))
        self.eval_pairs = None
        if cfg.eval_fraction > 0 and not cfg.eval_data:
            order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
            n_eval = max(1, int(len(pairs) * cfg.eval_fraction))
            if n_eval >= len(pairs):
                raise ValueError(f"{cfg.train_data}: eval_fraction {cfg.eval_fraction} leaves no training pairs")
            self.eval_pairs = self._encode_pairs([pairs[i] for i in order[:n_eval]])
            pairs = [pairs[i] for i in order[n_eval:]]
        self.train_pairs = self._encode_pairs(pairs)
        if cfg.eval_data:
            pairs, rep = pair_source(cfg.eval_data, cfg)
            self.reports.append(("eval", rep))
            self.eval_pairs = self._encode_pairs(pairs)
        self.meta_groups = None
        if cfg.meta_data:
            groups, rep = meta_source(cfg.meta_data, cfg)
            self.reports.append(("meta", rep))
            self.meta_groups = [self.encoder.encode_group(g) for g in groups]

        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.masters = None
        if cfg.precision == "bf16-master":
            # fp32 master weights; the model's bf16 parameters are their compute copy.
            self.masters = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        self.opt_params = self.masters if self.masters is not None else self.params
        self.optimizer = self._make_optimizer()
        self.total_steps = self._count_steps()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.meta_state = MetaState(self.params, self.masters)
        self._warned_vanished = False
        self._meta_order: list[int] = []
        self.step = 0

    # -- set-up ----------------------------------------------------------------------------------
    def _encode_pairs(self, pairs) -> list[EncodedPair]:
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
        return torch.optim.AdamW(self.opt_params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)

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
    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _pack(self, groups) -> dict:
        from metarm_fast.packing import pack

        dense = self.model.config._attn_implementation in ("sdpa", "eager")
        return pack(groups, share_prompt=self.cfg.packing == "share-prompt", dense_mask=dense)

    def pair_batch(self, items: list[EncodedPair]) -> dict:
        if self.cfg.packing != "none":
            batch = self._to_device(self._pack([[it.chosen, it.rejected] for it in items]))
            batch["pairs"] = True  # score_batch returns [chosen..., rejected...]
        else:
            seqs = [it.chosen for it in items] + [it.rejected for it in items]
            batch = self._to_device(collate(seqs, self.tokenizer.pad_token_id, self.cfg.padding_side))
        if any(it.margin is not None for it in items):
            batch["margin"] = torch.tensor([it.margin or 0.0 for it in items], device=self.device)
        return batch

    def meta_batch(self, groups: list[list]) -> dict:
        if self.cfg.packing != "none":
            return self._to_device(self._pack(groups))  # carries `offsets` already
        seqs = [s for g in groups for s in g]
        batch = self._to_device(collate(seqs, self.tokenizer.pad_token_id, self.cfg.padding_side))
        sizes = torch.tensor([len(g) for g in groups])
        batch["offsets"] = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)]).to(self.device)
        return batch

    def step_batches(self):
        """Yield, per optimizer step, its list of micro-batches of pairs (epochs reshuffled by seed)."""
        g = torch.Generator().manual_seed(self.cfg.seed)
        per_step = self.cfg.batch_size * self.cfg.grad_accum
        order: list[int] = []
        for _ in range(self.total_steps):
            if len(order) < per_step:
                order += torch.randperm(len(self.train_pairs), generator=g).tolist()
            idx, order = order[:per_step], order[per_step:]
            items = [self.train_pairs[i] for i in idx]
            yield [items[i : i + self.cfg.batch_size] for i in range(0, len(items), self.cfg.batch_size)]

    def next_meta_groups(self) -> list[list]:
        """The meta iterator cycles on its own, reshuffled each pass."""
        if len(self._meta_order) < self.cfg.meta_batch_size:
            g = torch.Generator().manual_seed(self.cfg.seed + 7919 * (self.step + 1))
            self._meta_order += torch.randperm(len(self.meta_groups), generator=g).tolist()
        idx, self._meta_order = self._meta_order[: self.cfg.meta_batch_size], self._meta_order[self.cfg.meta_batch_size :]
        return [self.meta_groups[i] for i in idx]

    # -- losses ----------------------------------------------------------------------------------
    def pair_loss(self, batch: dict):
        r = score_batch(self.model, batch)
        n = r.shape[0] // 2
        loss = bt_loss(r[:n], r[n:], margin=batch.get("margin"), center_coef=self.cfg.center_coef)
        return loss, r[:n].detach(), r[n:].detach()

    def meta_objective(self, batch: dict, impl: str = "auto"):
        r = score_batch(self.model, batch)
        return difference_loss(r, batch["offsets"], impl=impl), r.detach()

    def _l_pass(self, micro_batches, use_hooks_restorer=None) -> dict:
        """Forward/backward L over the micro-batches, each weighted by its share of the step's pairs."""
        total = sum(len(m) for m in micro_batches)
        loss_sum, correct = 0.0, 0
        for items in micro_batches:
            loss, rc, rr = self.pair_loss(self.pair_batch(items))
            if not finite(loss):
                raise _NonFinite("L", loss)
            (loss * (len(items) / total)).backward()
            loss_sum += loss.item() * len(items)
            correct += int((rc > rr).sum())
        return {"loss": loss_sum / total, "accuracy": correct / total, "pairs": total}

    # -- the step --------------------------------------------------------------------------------
    def zero_grad(self):
        for p in self.params:
            if p.grad is not None:
                p.grad.zero_()

    def train_step(self, micro_batches) -> dict:
        """One optimizer step: vanilla or MetaRM. Returns its metrics; a non-finite loss skips it."""
        self.zero_grad()
        try:
            if self.cfg.method == "metarm":
                m = self._metarm_grads(micro_batches)
            else:
                m = self._l_pass(micro_batches)
        except _NonFinite as e:
            self.zero_grad()
            if self.cfg.on_nonfinite == "stop":
                raise RuntimeError(f"step {self.step + 1}: {e}; the weights were left as before the step") from None
            warnings.warn(f"step {self.step + 1}: {e}; step skipped, weights unchanged")
            return {"skipped": str(e)}
        m["grad_norm"] = self._optimizer_step()
        m["lr"] = self.scheduler.get_last_lr()[0]
        return m

    def _metarm_grads(self, micro_batches) -> dict:
        cfg = self.cfg
        # 1. J and grad J at theta.
        meta = self.meta_batch(self.next_meta_groups())
        j, r_meta = self.meta_objective(meta)
        if not finite(j):
            raise _NonFinite("J", j)
        j.backward()
        precond = None
        if cfg.meta_direction == "adam":
            precond = adam_second_moments(self.optimizer, self.opt_params)
            if precond[0] is None:
                precond = None  # no second moments before the first optimizer step: plain gradient
        # 2. theta' = theta + eta * d, in place.
        t0 = time.perf_counter()
        stats = perturb(self.meta_state, cfg.eta, *(precond or (None, 1.0)))
        perturb_s = time.perf_counter() - t0
        # 3. L and grad L at theta'; 4. theta restored (as gradients arrive, or on exit).
        with perturbed(self.meta_state, use_hooks=len(micro_batches) == 1, stats=stats) as restorer:
            if stats.nonfinite:  # counted by the perturbation pass itself: no separate sweep over grad J
                raise _NonFinite("grad J", torch.tensor(float("nan")))
            m = self._l_pass(micro_batches)
        if cfg.second_order:
            # The Hessian-vector product differentiates J twice: the torch J (autograd all the way
            # down), since the fused kernel's backward is itself not differentiable.
            second_order_correction_(self.params, lambda: self.meta_objective(meta, impl=SECOND_ORDER_J_IMPL)[0], cfg.eta)
        ratio = math.sqrt(stats.realised_sq / stats.intended_sq) if stats.intended_sq > 0 else 0.0
        if vanished(stats) and not self._warned_vanished:
            self._warned_vanished = True
            warnings.warn(
                f"meta step {self.step + 1}: the perturbation eta * grad J was lost to rounding in the "
                f"{self.params[0].dtype} weights (realised/intended norm {ratio:.3g}, "
                f"{stats.changed} of {stats.numel} weights changed); MetaRM is acting as vanilla training. "
                + ("Use a larger --eta, or --precision fp32." if cfg.precision == "bf16-master"
                   else "Use --precision fp32 or bf16-master (fp32 master weights), or a larger --eta.")
            )
        gaps = _group_gaps(r_meta, meta["offsets"])
        m.update(
            J=j.item(),
            meta_frac_changed=stats.changed / max(stats.numel, 1),
            meta_realised_ratio=ratio,
            meta_gap_mean=float(gaps.mean()) if gaps.numel() else 0.0,
            meta_gaps=[round(x, 5) for x in gaps.tolist()],
            # Host wall time of the meta machinery. On a GPU these time the kernel launches, not the
            # kernels (no synchronisation is forced for them).
            meta_perturb_ms=perturb_s * 1e3,
            meta_restore_ms=restorer.seconds * 1e3,
        )
        return m

    def _optimizer_step(self) -> float:
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        if self.masters is None:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
            self.optimizer.step()
        else:
            norm = self._master_step(max_norm)
        self.scheduler.step()
        return norm

    @torch.no_grad()
    def _master_step(self, max_norm: float) -> float:
        """Update the fp32 masters one tensor at a time from the bf16 gradients.

        Casting every gradient to fp32 at once would hold 4 more bytes per parameter during the step
        (26 GB for a 7B model). The optimizers used here (torch AdamW, bitsandbytes' 8-bit AdamW) skip
        parameters whose .grad is None and keep per-parameter state, so stepping with one master
        gradient set at a time is the same update.
        """
        # The norm as torch's clip_grad_norm_ forms it (norm of per-tensor norms), one fp32 tensor at a time.
        norms = torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in self.params])
        total = torch.linalg.vector_norm(norms)
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p, mp in zip(self.params, self.masters):
            mp.grad = p.grad.float()
            mp.grad.mul_(scale)
            self.optimizer.step()
            mp.grad = None
            p.copy_(mp)  # the compute copy is always exactly round(master)
        return float(total)

    # -- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def score_pairs(self, pairs: list[EncodedPair]):
        self.model.eval()
        rc, rr = [], []
        bs = self.cfg.eval_batch_size
        for i in range(0, len(pairs), bs):
            items = pairs[i : i + bs]
            r = score_batch(self.model, self.pair_batch(items))
            rc.append(r[: len(items)])
            rr.append(r[len(items) :])
        self.model.train()
        return torch.cat(rc).cpu(), torch.cat(rr).cpu()

    def evaluate(self, pairs: list[EncodedPair] | None = None) -> dict:
        pairs = self.eval_pairs if pairs is None else pairs
        rc, rr = self.score_pairs(pairs)
        return pair_metrics(rc, rr)

    @torch.no_grad()
    def meta_gaps(self, max_groups: int = 256) -> torch.Tensor:
        self.model.eval()
        gaps = []
        for i in range(0, min(len(self.meta_groups), max_groups), self.cfg.meta_batch_size):
            batch = self.meta_batch(self.meta_groups[i : min(i + self.cfg.meta_batch_size, max_groups)])
            gaps.append(_group_gaps(score_batch(self.model, batch), batch["offsets"]).cpu())
        self.model.train()
        return torch.cat(gaps)

    # -- the loop --------------------------------------------------------------------------------
    def train(self) -> dict:
        from tqdm.auto import tqdm

        cfg = self.cfg
        os.makedirs(cfg.output_dir, exist_ok=True)
        metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
        t0 = time.perf_counter()
        pairs_done = 0
        bar = tqdm(total=self.total_steps, disable=not cfg.progress, unit="step", dynamic_ncols=True)
        with open(metrics_path, "w") as mf:
            for micro_batches in self.step_batches():
                m = self.train_step(micro_batches)
                self.step += 1
                pairs_done += m.get("pairs", 0)
                rate = pairs_done / (time.perf_counter() - t0)
                m.update(step=self.step, pairs_per_s=round(rate, 2))
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    mf.write(json.dumps(m) + "\n")
                    mf.flush()
                if "loss" in m:
                    bar.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{m['accuracy']:.2f}", pairs_s=f"{rate:.1f}")
                bar.update(1)
            bar.close()
            summary = {"steps": self.step, "train_time_s": round(time.perf_counter() - t0, 2), "pairs_per_s": round(rate, 2)}
            if self.eval_pairs:
                summary["eval"] = self.evaluate()
                if cfg.train_data.startswith("synthetic") and cfg.eval_data != "synthetic:shifted":
                    shifted, _ = pair_source("synthetic:shifted", cfg)
                    summary["eval_shifted"] = self.evaluate(self._encode_pairs(shifted[:256]))
            if self.meta_groups:
                gaps = self.meta_gaps()
                summary["meta_gaps"] = {"mean": float(gaps.mean()), "median": float(gaps.median()), "n": gaps.numel()}
                summary["meta_gap_histogram"] = save_gap_histogram(gaps, os.path.join(cfg.output_dir, "meta_reward_gaps.png"))
            mf.write(json.dumps({"final": summary}) + "\n")
        self.save(cfg.output_dir, summary)
        summary["truncated_records"] = self.encoder.truncated
        return summary

    # -- saving ----------------------------------------------------------------------------------
    def save(self, out_dir: str, summary: dict | None = None) -> None:
        """Write the checkpoint into a temporary folder, then move each file into place.

        A crash while writing leaves the previous checkpoint (or none) and a `.partial` folder, never a
        half-written weights file under the final name.
        """
        import yaml

        tmp = os.path.join(out_dir, ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        if summary and "eval" in summary:
            # PPO trainers normalise rewards with these.
            self.model.config.reward_mean = summary["eval"]["reward_mean"]
            self.model.config.reward_std = summary["eval"]["reward_std"]
        state_dict = None
        if self.masters is not None:
            # Save the fp32 masters, not their rounded bf16 compute copy.
            names = [n for n, p in self.model.named_parameters() if p.requires_grad]
            state_dict = dict(self.model.state_dict())
            state_dict.update({n: m.detach() for n, m in zip(names, self.masters)})
        self.model.save_pretrained(tmp, state_dict=state_dict)
        self.tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "metarm_fast_config.yaml"), "w") as f:
            yaml.safe_dump(self.cfg.to_dict(), f, sort_keys=False)
        for name in sorted(os.listdir(tmp)):
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
        os.rmdir(tmp)


class _NonFinite(Exception):
    def __init__(self, what: str, value):
        super().__init__(f"non-finite {what} ({float(value.detach())})")


def pair_metrics(rc: torch.Tensor, rr: torch.Tensor) -> dict:
    all_r = torch.cat([rc, rr]).double()
    return {
        "pairs": int(rc.numel()),
        "accuracy": float((rc > rr).double().mean()),
        "reward_gap_mean": float((rc - rr).double().mean()),
        "reward_mean": float(all_r.mean()),
        "reward_std": float(all_r.std()) if all_r.numel() > 1 else 0.0,
    }


def _group_gaps(r: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """|r_i - r_j| for every pair of responses of the same prompt (the paper's reward-gap histograms)."""
    out = []
    offs = offsets.tolist()
    for a, b in zip(offs[:-1], offs[1:]):
        g = r[a:b].detach().float()
        d = (g[:, None] - g[None, :]).abs()
        iu = torch.triu_indices(len(g), len(g), offset=1)
        out.append(d[iu[0], iu[1]])
    return torch.cat(out) if out else torch.zeros(0)


def save_gap_histogram(gaps: torch.Tensor, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(gaps.numpy(), bins=40, color="#3a6ea5")
    ax.set_xlabel("|r(x, s_i) - r(x, s_j)| on the meta set")
    ax.set_ylabel("response pairs")
    ax.set_title("Reward gaps on the shifted distribution")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
