"""The metarm-fast runners of bench.throughput (vanilla, metarm, copy, metarm-parts: its docstring says
what each times): one model + optimizer per (method, packing), each timing one step on batch i.

Tokens computed are counted by a hook on the input embedding (what the model really ran). The other
counts of a step (what its layout predicts, the padded yardstick, the real tokens) are the library's
own: ``metarm_fast.batch.step_tokens`` over the step's batches built in that layout, the count the
trainer reports as its ``tokens`` metric.

A step's items are pairs (``EncodedPair``) or k-response records (``EncodedGroup``, trained as groups:
bench.groups); the helpers below take either.
"""
from __future__ import annotations

import gc
import time

import torch

from bench.flops import attention_pairs
from metarm_fast.batch import EncodedGroup, meta_batch, pair_batch, ranked_batch, step_tokens
from metarm_fast.config import TrainConfig
from metarm_fast.memory import step_peak_bytes as peak
from metarm_fast.reference import copy_based_meta_step
from metarm_fast.steps import j_pass, l_pass
from metarm_fast.trainer import RewardTrainer


def now() -> float:
    """perf_counter after the device's queued work is done."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def step_groups(micro_batches) -> list:
    """A step's items as groups: each prompt with its responses, a pair's two or a record's k (the MetaRM
    meta batch of the bench)."""
    return [list(it.seqs) if isinstance(it, EncodedGroup) else [it.chosen, it.rejected]
            for mb in micro_batches for it in mb]


def signal_pairs(item) -> int:
    """Ordered pairs with different scores an item trains on: a pair 1, a k-response record #(s_i > s_j)."""
    if isinstance(item, EncodedGroup):
        return sum(a > b for a in item.scores for b in item.scores)
    return 1


def train_batch(items, layout: str):
    """A micro-batch as the trainer builds it (``Batcher.train``): k-response records as a group batch,
    pairs as a pair batch; no pad value (None pads with 0) and no mask, neither changes a count."""
    if items and isinstance(items[0], EncodedGroup):
        return ranked_batch(items, layout, None, dense_mask=False)
    return pair_batch(items, layout, None, dense_mask=False)


def layout_tokens(micro_batches, layout: str, meta: bool = False) -> int:
    """Tokens of a step over these micro-batches (of pairs or of k-response records) in `layout`, as the
    library counts them (``step_tokens``): its training batches and, with `meta`, the meta batch of its
    own groups."""
    batches = [train_batch(mb, layout) for mb in micro_batches]
    groups = meta_batch(step_groups(micro_batches), layout, None, dense_mask=False) if meta else None
    return step_tokens(batches, groups)


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
        self.trained: list[int | None] = []  # per timed step: the ordered pairs the step itself says it trained on

    @property
    def label(self) -> str:
        return f"{self.name}[{self.packing}]"

    def tokens(self, i: int, layout: str) -> int:
        """Tokens of step i, all passes, in `layout` (the meta batch holds the step's own groups)."""
        return layout_tokens(self.batches[i], layout, meta=self.passes > 1)

    def expected_tokens(self, i: int) -> int:
        return self.tokens(i, self.packing)

    def padded_tokens(self, i: int) -> int:
        """The yardstick that makes layouts comparable: each pass's sequences padded to their longest."""
        return self.tokens(i, "none")

    def real_tokens(self, i: int) -> int:
        """Every token of every sequence, each pass: the packed layout's count (no padding, nothing shared)."""
        return self.tokens(i, "pack")

    def attention_pairs(self, i: int) -> int:
        """Attended (query, key) pairs of step i, all passes (the meta batch holds the step's own groups)."""
        return self.passes * attention_pairs(step_groups(self.batches[i]), self.packing)

    def run(self, i: int, record: bool, rep: int = 0) -> None:
        """One step on batch i. With --repeat, batch i runs again (rep = 1, 2, ...) and the batch keeps
        the time of its fastest run, with what the subclasses record from that same run."""
        gc.collect()
        self.counter.take()
        t = self.step(i)
        n = self.counter.take()
        if not hasattr(self, "first_computed"):
            self.first_computed = (i, n)
            self.first_loss = self.step_loss()  # at the initial weights, which every runner shares
        self.best = record and (rep == 0 or t < self.times[-1])
        if record and rep == 0:
            self.times.append(t)
            self.computed.append(n)
            self.steps.append(i)
            self.trained.append(self.trained_pairs())
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

    def trained_pairs(self) -> int | None:
        """The labelled pairs (ordered pairs of different scores) the last step reports it trained on."""
        return None

    def step_loss(self) -> float | None:
        """The training loss the last step reports (for a MetaRM step: at theta')."""
        return None


class TrainerRunner(Runner):
    """Our RewardTrainer, built for this packing mode."""

    def __init__(self, cfg: TrainConfig, packing: str, batches, init_state):
        super().__init__(packing, batches)
        torch.manual_seed(cfg.seed)
        self.tr = RewardTrainer(cfg, log=lambda *a, **k: None)
        if init_state is not None:
            self.tr.rm.hf.load_state_dict(init_state)
        self.model = self.tr.rm.hf
        self.counter = TokenCounter(self.model)

    def groups(self, i: int):
        # the meta batch: the step's prompts, each with its two responses as one unlabelled group
        return step_groups(self.batches[i])

    def _train_step(self, i: int, groups=None) -> None:
        m = self.last_metrics = self.tr.train_step(self.batches[i], groups)
        if "skipped" in m:
            raise RuntimeError(f"{self.label}: step {i} was skipped: {m['skipped']}")

    def measure_peak(self, i: int) -> None:
        self.peak_bytes = peak(self.tr.weights, self.tr.optimizer, lambda: self.step(i))

    def trained_pairs(self) -> int | None:
        m = getattr(self, "last_metrics", None)  # l_pass and group_pass count them ("pairs")
        return m.get("pairs") if m else None

    def step_loss(self) -> float | None:
        m = getattr(self, "last_metrics", None)
        return m.get("loss") if m else None


class VanillaRunner(TrainerRunner):
    name = "vanilla"

    def step(self, i: int) -> float:
        t0 = now()
        self._train_step(i)
        return now() - t0


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
        t0 = now()
        self._train_step(i, groups)
        return now() - t0


class CopyRunner(TrainerRunner):
    name = "copy"
    passes = 2

    def step(self, i: int) -> float:
        groups = self.groups(i)
        t0 = now()
        tr = self.tr
        tr.weights.zero_grads()  # as train_step does
        copy_based_meta_step(tr.model, tr.weights, tr.optimizer, tr.batcher, self.batches[i], groups, eta=tr.cfg.eta,
                             center_coef=tr.cfg.center_coef, scheduler=tr.scheduler, max_grad_norm=tr.cfg.max_grad_norm)
        return now() - t0


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
        t0 = now()
        j_pass(tr.model, tr.batcher.groups(self.groups(i)))
        t1 = now()
        l_pass(tr.model, [tr.batcher.pairs(items) for items in self.batches[i]], tr.cfg.center_coef)
        t2 = now()
        tr.optimizer_step()
        tr.weights.zero_grads()
        t3 = now()
        self._last = {"J": t1 - t0, "L": t2 - t1, "opt": t3 - t2}
        return t3 - t0

    def run(self, i: int, record: bool, rep: int = 0) -> None:
        super().run(i, record, rep)
        if record:
            for k, v in self._last.items():
                self.keep(self.parts[k], v, rep)

    def measure_peak(self, i: int) -> None:
        pass  # not a step anyone runs


