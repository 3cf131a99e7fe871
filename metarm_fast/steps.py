"""One optimizer step, as functions of their inputs: the model, the batches, the optimizer.

- ``l_pass``: forward/backward of the Bradley-Terry loss over micro-batches (gradients accumulate);
- ``j_pass``: forward/backward of the difference loss J on a meta batch (grad J in the .grad buffers);
- ``metarm_grads``: Algorithm 1's gradient: J pass, perturbation, L pass at theta', restore, and
  the optional second-order term;

The optimizer step itself (clipping, fp32 masters) is ``metarm_fast.weights.Weights.step``. The
trainer's loop and the benchmarks call these; nothing here keeps state between steps.
"""
from __future__ import annotations

import torch

from metarm_fast.kernels import bt_loss, difference_loss, group_loss
from metarm_fast.meta_step import MetaStep
from metarm_fast.second_order import second_order_correction_
from metarm_fast.parallel import all_finite, no_sync, sum_over_ranks

# The J implementation the second-order term differentiates twice: the torch J (autograd all the way
# down), since the fused kernel's backward is itself not differentiable.
SECOND_ORDER_J_IMPL = "torch"


class NonFiniteLoss(Exception):
    def __init__(self, what: str, value: float):
        super().__init__(f"non-finite {what} ({value})")
        self.what = what


def pair_loss(model, batch, center_coef: float = 0.0):
    """(L, chosen rewards, rejected rewards) of one pair batch."""
    r = model(batch)
    n = r.shape[0] // 2
    loss = bt_loss(r[:n], r[n:], margin=batch.margin, center_coef=center_coef)
    return loss, r[:n].detach(), r[n:].detach()


def l_pass(model, batches, center_coef: float = 0.0, loss_fn=None, *, info=None, global_pairs=None) -> dict:
    """Forward/backward L over the micro-batches, each weighted by its share of the step's pairs.

    Data parallel (``info`` with world size N): this rank's micro-batches hold part of the step's
    ``global_pairs``; each is weighted by N * its share, so that DDP's average of the gradients is the
    gradient of the global batch's L. Non-finite losses are agreed across ranks before any backward."""
    loss_fn = loss_fn or pair_loss
    world = info.world_size if info is not None else 1
    local = sum(b.num_sequences // 2 for b in batches)
    total = global_pairs if global_pairs is not None else local
    loss_sum, correct = 0.0, 0
    for i, b in enumerate(batches):
        n = b.num_sequences // 2
        loss, rc, rr = loss_fn(model, b, center_coef)
        if not all_finite(loss, info):
            raise NonFiniteLoss("L", float(loss.detach()))
        with no_sync(model, last=i == len(batches) - 1):
            (loss * (n * world / total)).backward()
        loss_sum += loss.item() * n
        correct += int((rc > rr).sum())
    loss_sum, correct = sum_over_ranks([loss_sum, float(correct)], info)
    return {"loss": loss_sum / total, "accuracy": correct / total, "pairs": total}


def pair_counts(r: torch.Tensor, scores: torch.Tensor, offsets: torch.Tensor) -> tuple[int, int]:
    """(ordered pairs i better than j inside the groups, those whose rewards agree strictly): the
    training signal of k-response records, and the accuracy over it. One pass over the groups."""
    pairs = right = 0
    for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        s, x = scores[a:b], r[a:b]
        better = s[:, None] > s[None, :]
        pairs += int(better.sum())
        right += int((better & (x[:, None] > x[None, :])).sum())
    return pairs, right


def group_pass(model, batches, *, kind: str = "bt", margin_scale: float = 0.0, info=None, global_groups=None) -> dict:
    """Forward/backward of the group loss over micro-batches of k-response records, each micro-batch
    weighted by its share of the step's records (each record one unit). Returns the loss, the
    accuracy over ordered pairs, and the step's record and ordered-pair counts (all ranks summed)."""
    world = info.world_size if info is not None else 1
    local = sum(b.offsets.numel() - 1 for b in batches)
    total = global_groups if global_groups is not None else local
    loss_sum = right = pairs = 0.0
    for i, b in enumerate(batches):
        n = b.offsets.numel() - 1
        r = model(b)
        loss = group_loss(r, b.scores, b.offsets, kind=kind, margin_scale=margin_scale)
        if not all_finite(loss, info):
            raise NonFiniteLoss("L", float(loss.detach()))
        with no_sync(model, last=i == len(batches) - 1):
            (loss * (n * world / total)).backward()
        loss_sum += loss.item() * n
        n_pairs, n_right = pair_counts(r.detach().float().cpu(), b.scores.cpu(), b.offsets.cpu())
        pairs += n_pairs
        right += n_right
    loss_sum, right, pairs = sum_over_ranks([loss_sum, float(right), float(pairs)], info)
    return {"loss": loss_sum / total, "accuracy": right / max(pairs, 1.0), "pairs": int(pairs), "groups": total}


def j_pass(model, batch, impl: str = "auto", *, info=None, global_groups=None):
    """J at the current weights and its backward; returns (J, rewards).

    Data parallel: this rank's J is the mean over its groups; weighted by N * its share of the
    ``global_groups``, DDP's average of the gradients is grad J of the global meta batch, and the
    J returned is the global one (the rewards are this rank's)."""
    r = model(batch)
    j = difference_loss(r, batch.offsets, impl=impl)
    if not all_finite(j, info):
        raise NonFiniteLoss("J", float(j.detach()))
    if info is None or not info.distributed:
        j.backward()
        return j.detach(), r.detach()
    share = (batch.offsets.numel() - 1) / global_groups
    (j * (share * info.world_size)).backward()
    (j_global,) = sum_over_ranks([float(j.detach()) * share], info)
    return torch.tensor(j_global), r.detach()


def group_gaps(r: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """|r_i - r_j| for every pair of responses of the same prompt (the paper's reward-gap histograms)."""
    out = []
    offs = offsets.tolist()
    for a, b in zip(offs[:-1], offs[1:]):
        g = r[a:b].detach().float()
        d = (g[:, None] - g[None, :]).abs()
        iu = torch.triu_indices(len(g), len(g), offset=1)
        out.append(d[iu[0], iu[1]])
    return torch.cat(out) if out else torch.zeros(0)


def metarm_grads(model, meta: MetaStep, pair_batches, meta_batch, *, center_coef: float = 0.0,
                 second_order: bool = False, loss_fn=None, info=None, global_pairs=None, global_groups=None,
                 l_pass_fn=None, measure_move: bool = False) -> dict:
    """grad_{theta'} L(theta') in the .grad buffers (plus eta * H_J grad L with ``second_order``), the
    weights back at theta. Returns (metrics: L's, J and the perturbation's; its PerturbStats). Data parallel:
    see ``l_pass`` and ``j_pass``; every rank perturbs with the same all-reduced grad J.
    ``measure_move``: also ``meta_max_move_over_eta``, the largest per-weight move over eta."""
    if second_order and info is not None and info.distributed:
        raise ValueError("--second-order is single-process only (its Hessian-vector product is not reduced across ranks)")
    j, r_meta = j_pass(model, meta_batch, info=info, global_groups=global_groups)
    with meta.perturbed(micro_batches=len(pair_batches), measure_move=measure_move) as stats:
        if stats.nonfinite:  # counted by the perturbation pass itself: no separate sweep over grad J
            raise NonFiniteLoss("grad J", float("nan"))
        m = l_pass_fn() if l_pass_fn is not None else \
            l_pass(model, pair_batches, center_coef, loss_fn, info=info, global_pairs=global_pairs)
    if second_order:
        params = meta.params
        second_order_correction_(params, lambda: difference_loss(model(meta_batch), meta_batch.offsets,
                                                                 impl=SECOND_ORDER_J_IMPL), meta.eta)
    gaps = group_gaps(r_meta, meta_batch.offsets)
    m.update(
        J=j.item(),
        meta_frac_changed=stats.frac_changed,
        meta_realised_ratio=stats.ratio,
        meta_gap_mean=float(gaps.mean()) if gaps.numel() else 0.0,
        meta_gaps=[round(x, 5) for x in gaps.tolist()],
        # Host wall time of the meta machinery. On a GPU these time the kernel launches, not the
        # kernels (no synchronisation is forced for them).
        meta_perturb_ms=stats.perturb_s * 1e3,
        meta_restore_ms=stats.restore_s * 1e3,
    )
    if stats.max_move is not None:
        m["meta_max_move_over_eta"] = stats.max_move / meta.eta if meta.eta else 0.0
    return m, stats


@torch.no_grad()
def dot_products(a: list[torch.Tensor], b: list[torch.Tensor], info=None) -> tuple[float, float, float, float]:
    """(a.b, a.a, b.b, |a - b|^2) summed in float64 over the tensors of two lists, one tensor at a time
    (FSDP2: this rank's shards, then summed over the ranks). The difference is taken per element, not
    as a.a - 2 a.b + b.b, which cancels when a and b nearly agree."""
    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    dot = aa = bb = dd = 0.0
    for x, y in zip(a, b):
        x, y = local(x).double().flatten(), local(y).double().flatten()
        d = x - y
        dot, aa, bb, dd = dot + float(x @ y), aa + float(x @ x), bb + float(y @ y), dd + float(d @ d)
    if info is not None and info.distributed and any(hasattr(t, "to_local") for t in a):
        dot, aa, bb, dd = sum_over_ranks([dot, aa, bb, dd], info)
    return dot, aa, bb, dd


def gradient_readings(g_prime: list[torch.Tensor], g0: list[torch.Tensor], info=None) -> dict:
    """How far grad L(theta') = ``g_prime`` is from grad L(theta) = ``g0``: ``meta_grad_rel_change`` =
    ||g_prime - g0|| / ||g0|| and ``meta_grad_cosine`` between the two."""
    dot, pp, oo, dd = dot_products(g_prime, g0, info)
    return {"meta_grad_rel_change": dd ** 0.5 / max(oo ** 0.5, 1e-30),
            "meta_grad_cosine": dot / max((pp * oo) ** 0.5, 1e-30)}


class Replayable:
    """A pass that can be run again with the random numbers of its first run (a model with dropout
    draws the same masks), leaving the generators as they were before the rerun: ``first()`` runs it
    and keeps the RNG state it started from; ``again()`` reruns it from that state."""

    def __init__(self, fn, device):
        self.fn = fn
        self.cuda = [device] if torch.device(device).type == "cuda" else []
        self.state = None

    def first(self):
        self.state = (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in self.cuda])
        return self.fn()

    def again(self):
        if self.state is None:
            raise RuntimeError("Replayable.again: the pass has not run yet")
        with torch.random.fork_rng(devices=self.cuda):
            torch.set_rng_state(self.state[0])
            for d, st in zip(self.cuda, self.state[1]):
                torch.cuda.set_rng_state(st, d)
            return self.fn()


def gradient_change(params, l_pass_fn, info=None) -> dict:
    """With grad L(theta') in the .grad buffers and the weights back at theta: run ``l_pass_fn`` once
    more at theta, and return how much the meta step changed the update (``gradient_readings``).
    The .grad buffers hold grad L(theta') again on return. Costs one more L forward/backward and one
    gradient-sized copy. With dropout, ``l_pass_fn`` must draw the masks of the pass at theta'
    (``Replayable.again``): else the reading is mostly the masks' difference."""
    g_prime = [p.grad.detach().clone() for p in params]
    for p in params:
        p.grad.zero_()
    l_pass_fn()
    out = gradient_readings(g_prime, [p.grad.detach() for p in params], info)
    with torch.no_grad():
        for p, g in zip(params, g_prime):
            p.grad.copy_(g)
    return out
