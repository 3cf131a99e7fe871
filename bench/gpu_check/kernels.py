"""Section ``kernels``: the Triton kernels compiled and launched on the device, against their references.

- ``bt_loss``, ``difference_loss`` and ``group_loss`` (impl="triton") against the torch references on the same
  device and an fp64 reference: values and gradients, fp32 / fp16 / bf16, odd sizes, strided inputs,
  extreme gaps (+-1e4) and ties, with the rules and bounds of tests/kernel_tests/tolerances.py; and
  bitwise repeatability (the reductions promise no atomics).
- ``perturb_`` / ``restore_`` (impl="triton", ``Perturbation``): the weights, the stored steps and the
  statistics bit for bit against the torch path *on the CPU* (the path the suite holds to the
  oracle, tests/kernel_tests/perturb_oracle.py), and the restore bitwise three ways (the whole
  perturbation, a restore plan tensor by tensor in reverse order, ``restore_``); fp32 and bf16
  weights, fp32 masters, AdamW second moments, -0.0, subnormals, values at the overflow threshold,
  NaN and inf; the paper's eta and a large one.
- The PTX the device's JIT produced for them (on a GPU): FMA contractions and atomics counted, and
  the promises held (no atomics anywhere; no fma.rn.f32 in the perturbation kernels).

On a CPU dry run the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set by
``python -m bench.gpu_check --dry-run`` before the kernels are imported), at smaller sizes.
"""
from __future__ import annotations

import math

import torch

from bench.gpu_check.report import Skip

# The rules and bounds of tests/kernel_tests/tolerances.py, where they were measured (the suite's
# tests/test_gpu_check.py holds these copies equal to them): a kernel's error against fp64 at most
# ERR_FACTOR x the torch reference's + FLOOR_ULPS fp32 ulps of the scale; against the reference
# directly at most LOSS_RTOL (fp32 outputs) / GRAD_RTOL[dtype] of the largest |reference|.
ERR_FACTOR = 2.0
FLOOR_ULPS = 1.0
FP32_ULP = 2.0**-23
LOSS_RTOL = 1e-6
GRAD_RTOL = {torch.float32: 1e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_BITS = {4: torch.int32, 2: torch.int16}


def run(ctx, rec) -> None:
    from metarm_fast.kernels import HAS_TRITON
    from metarm_fast.kernels._dispatch import is_interpreted
    from metarm_fast.kernels.bt_loss import _bt_loss_fwd_bwd_kernel

    if not HAS_TRITON:
        raise Skip("Triton is not installed (it has Linux wheels only)")
    if not ctx.cuda and not is_interpreted(_bt_loss_fwd_bwd_kernel):
        raise Skip("no CUDA, and the kernels were defined without TRITON_INTERPRET=1 (python -m bench.gpu_check "
                   "--dry-run sets it before importing them)")
    rec.tolerance("ERR_FACTOR", ERR_FACTOR, "tests/kernel_tests/tolerances.py (measured worst ratio 1.26)")
    rec.tolerance("LOSS_RTOL", LOSS_RTOL, "tests/kernel_tests/tolerances.py (measured <= 2.6e-7)")
    rec.tolerance("GRAD_RTOL", {_NAMES[k]: v for k, v in GRAD_RTOL.items()},
                  "tests/kernel_tests/tolerances.py (measured fp32 2.4e-7, fp16 5.2e-4, bf16 0)")
    dev = ctx.device
    big = not ctx.dry_run
    check_bt_loss(rec, dev, (1, 3, 257) + ((4097, 1_000_003) if big else (1025,)))
    check_difference_loss(rec, dev, big)
    check_group_loss(rec, dev, big)
    check_perturbation(rec, dev, big)
    if ctx.cuda:
        check_device_ptx(rec)
    else:
        rec.skip_part("device PTX", "no CUDA: the interpreter runs the kernels' Python; the compiler's output for "
                                    "sm_80 and sm_90 is tests/kernel_tests' compile tests")
    rec.measure(_headline=["checks"], checks=len(rec.checks))


# -- the losses --------------------------------------------------------------------------------
def _errors(kernel, reference, truth, rtol: float, direct: bool = True) -> tuple[float, float]:
    """(max |kernel - reference| / (rtol * max |reference|), kernel error / the fp64 rule's limit): <= 1 passes.
    ``direct=False``: the first is 0 (where the reference itself is not the yardstick, see the caller)."""
    k, r, t = kernel.double().cpu(), reference.double().cpu(), truth.double().cpu()
    if not torch.isfinite(k).all():
        return math.inf, math.inf
    scale = r.abs().max().item() if r.numel() else 0.0
    err = (k - r).abs().max().item() if k.numel() else 0.0
    direct = 0.0 if not direct else err / (rtol * scale) if scale > 0 else (0.0 if err == 0 else math.inf)
    err_k = (k - t).abs().max().item()
    limit = ERR_FACTOR * (r - t).abs().max().item() + FLOOR_ULPS * FP32_ULP * t.abs().max().item()
    rule = err_k / limit if limit > 0 else (0.0 if err_k == 0 else math.inf)
    return direct, rule


class _Worst:
    """The worst normalised error of a family of cases, and which case it was."""

    def __init__(self):
        self.value, self.case = 0.0, ""

    def add(self, value: float, case: str) -> None:
        if not value <= self.value:  # NaN and inf count as worst
            self.value, self.case = value, case


def check_bt_loss(rec, dev, sizes) -> None:
    from metarm_fast.kernels import bt_loss, bt_loss_reference

    def run_one(c0, r0, margin, center, impl):
        if impl == "fp64":
            c0, r0 = c0.double(), r0.double()
        c, r = c0.detach().clone().requires_grad_(), r0.detach().clone().requires_grad_()
        if impl == "fp64":
            loss = bt_loss_reference(c, r, margin, center, compute_dtype=torch.float64)
        else:
            loss = bt_loss(c, r, margin, center, impl=impl)
        loss.backward()
        return loss.detach(), c.grad, r.grad

    for dtype in DTYPES:
        worst = _Worst()
        for n in sizes:
            g = torch.Generator().manual_seed(n)
            for scale in (2.0, 1e4):  # 1e4: gaps where a naive softplus overflows
                base = (torch.randn(2 * n, generator=g) * scale).to(dtype).to(dev)
                chosen, rejected = base[0::2], (torch.randn(n, generator=g) * scale).to(dtype).to(dev)  # chosen strided
                if n > 2:
                    rejected[1] = chosen[1]  # a tie: x == 0
                for case, (margin, center) in {"plain": (None, 0.0), "float-margin": (0.5, 0.0),
                                               "tensor-margin+center": (torch.rand(n, generator=g).to(dev), 0.01)}.items():
                    outs = {impl: run_one(chosen, rejected, margin, center, impl) for impl in ("triton", "torch", "fp64")}
                    label = f"n={n} x{scale:g} {case}"
                    for i, what in enumerate(("loss", "dchosen", "drejected")):
                        rtol = LOSS_RTOL if i == 0 else GRAD_RTOL[dtype]
                        direct, rule = _errors(outs["triton"][i], outs["torch"][i], outs["fp64"][i], rtol)
                        worst.add(max(direct, rule), f"{label} {what}")
        rec.check(f"bt_loss {_NAMES[dtype]}: values and grads vs torch and fp64", worst.value <= 1.0,
                  round(worst.value, 4), 1.0, f"worst: {worst.case} (error / allowed)")
    n = max(sizes)
    c, r = torch.randn(n, device=dev), torch.randn(n, device=dev)
    a, b = (run_one(c, r, None, 0.01, "triton") for _ in range(2))
    rec.check("bt_loss repeatable bitwise (no atomics)", all(torch.equal(x, y) for x, y in zip(a, b)), n)


def check_difference_loss(rec, dev, big: bool) -> None:
    from metarm_fast.kernels import difference_loss

    groupings = {"k=1": [1, 1, 1], "k=2": [2, 2, 2], "k=5": [5] * 7, "k=17": [17, 17, 17],
                 "mixed": [1, 2, 5, 17, 3, 1, 5], "k=100 (two tiles)": [100, 64, 65]}
    if big:
        groupings["4096 groups of k 1-9"] = [1 + i % 9 for i in range(4096)]
    else:  # the interpreter walks a 64 x 64 tile in ~0.1 s
        groupings = {"k=1": [1, 1, 1], "mixed": [1, 2, 5, 17, 3, 1, 5], "k=65 (two tiles)": [65]}

    def run_one(rewards, offsets, impl):
        if impl == "fp64":
            return difference_loss_truth(rewards, offsets)
        r = rewards.detach().clone().requires_grad_()
        j = difference_loss(r, offsets, impl=impl)
        j.backward()
        return j.detach(), r.grad

    for dtype in DTYPES:
        worst = _Worst()
        for name, sizes in groupings.items():
            offsets = torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist(), dtype=torch.int64, device=dev)
            n = int(offsets[-1])
            g = torch.Generator().manual_seed(n)
            for scale in (1.0, 1e4):
                base = (torch.randn(2 * n, generator=g) * scale).to(dtype).to(dev)
                rewards = base[0::2]  # strided
                if n > 3:
                    rewards[2] = rewards[3]  # a tie (sign 0: no gradient)
                outs = {impl: run_one(rewards, offsets, impl) for impl in ("triton", "torch", "fp64")}
                for i, what in enumerate(("J", "dJ/dr")):
                    rtol = LOSS_RTOL if i == 0 else GRAD_RTOL[dtype]
                    # At gaps of ~1e4 the torch reference's sigmoid(|d|)(1 - sigmoid(|d|)) cancels to 0
                    # where the kernel's t / (1 + t)^2 keeps e.g. 5e-21: there only the fp64 rule holds.
                    direct, rule = _errors(outs["triton"][i], outs["torch"][i], outs["fp64"][i], rtol,
                                           direct=scale == 1.0 or i == 0)
                    worst.add(max(direct, rule), f"{name} x{scale:g} {what}")
        rec.check(f"difference_loss {_NAMES[dtype]}: J and dJ/dr vs torch and fp64", worst.value <= 1.0,
                  round(worst.value, 4), 1.0, f"worst: {worst.case} (error / allowed)")
    offsets = torch.tensor([0, 5, 7, 40], dtype=torch.int64, device=dev)
    r = torch.randn(40, device=dev)
    a, b = (run_one(r, offsets, "triton") for _ in range(2))
    rec.check("difference_loss repeatable bitwise (no atomics)", all(torch.equal(x, y) for x, y in zip(a, b)))


def difference_loss_truth(rewards: torch.Tensor, offsets: torch.Tensor):
    """(J, dJ/dr) in fp64 from the formulas of metarm_fast.kernels.difference_loss's docstring, with
    sigmoid'(a) = t / (1 + t)^2, t = exp(-a): the torch reference's autograd forms sigmoid(1 - sigmoid),
    which cancels to 0 in fp64 too once |d| > ~37."""
    r = rewards.detach().double().cpu()
    bounds = offsets.tolist()
    m = len(bounds) - 1
    j, grad = torch.zeros((), dtype=torch.float64), torch.zeros_like(r)
    sizes = torch.tensor(bounds[1:]) - torch.tensor(bounds[:-1])
    starts = torch.tensor(bounds[:-1])
    for k in sorted(set(sizes.tolist())):
        idx = starts[sizes == k][:, None] + torch.arange(k)  # (m_k, k)
        d = r[idx][:, :, None] - r[idx][:, None, :]  # (m_k, k, k)
        t = torch.exp(-d.abs())
        off = ~torch.eye(k, dtype=torch.bool)
        j = j + (torch.where(off, 1.0 / (1.0 + t), 0.0).sum() / (k * k))
        g = torch.where(off, t / (1.0 + t) ** 2 * torch.sign(d), 0.0).sum(dim=2) * (2.0 / (k * k * m))
        grad.index_put_((idx.reshape(-1),), g.reshape(-1))
    return j / m, grad


def check_group_loss(rec, dev, big: bool) -> None:
    """group_loss (bt, bt with a score margin, pl) against its reference and fp64, with the scales of
    tests/kernel_tests/test_group_loss.py: errors relative to max(max |reference|, floor), floor 1 for
    L and 1/(groups with a pair x the largest group's pairs) for dL/dr (rounding errors there are
    of the size of the O(1) terms the results are differences of)."""
    try:
        from metarm_fast.kernels.group_loss import group_loss, group_loss_reference
    except ImportError:
        rec.skip_part("group_loss", "this tree has no metarm_fast.kernels.group_loss")
        return
    groupings = {"k=1": [1, 1, 1], "k=2": [2, 2, 2], "odd k": [3, 1, 7, 2, 5, 3, 7, 1, 2], "k=70 (two tiles)": [70, 3]}
    if big:
        groupings["2048 groups of k 1-8"] = [1 + i % 8 for i in range(2048)]

    def run_one(r, scores, offsets, impl, kind, margin_scale):
        x = (r.double() if impl == "fp64" else r).detach().clone().requires_grad_()
        if impl == "fp64":
            loss = group_loss_reference(x, scores, offsets, kind=kind, margin_scale=margin_scale,
                                        compute_dtype=torch.float64)
        else:
            loss = group_loss(x, scores, offsets, kind=kind, margin_scale=margin_scale, impl=impl)
        loss.backward()
        return loss.detach(), x.grad

    for dtype in DTYPES:
        worst = _Worst()
        for name, sizes in groupings.items():
            offsets = torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist(), dtype=torch.int64, device=dev)
            g = torch.Generator().manual_seed(len(sizes))
            r = (torch.randn(sum(sizes), generator=g) * 2.0).to(dtype).to(dev)
            scores = torch.randint(0, 4, (sum(sizes),), generator=g).float().to(dev)  # 4 levels: ties
            groups = scores.cpu().split(list(sizes))
            n_valid = sum(int(x.max() > x.min()) for x in groups)
            n_pairs = max(int((x[:, None] > x[None, :]).sum()) for x in groups)
            floors = (1.0, 1.0 / (max(n_valid, 1) * max(n_pairs, 1)))
            for mode, (kind, margin_scale) in {"bt": ("bt", 0.0), "bt+margin": ("bt", 0.5), "pl": ("pl", 0.0)}.items():
                outs = {impl: run_one(r, scores, offsets, impl, kind, margin_scale) for impl in ("triton", "torch", "fp64")}
                for i, what in enumerate(("L", "dL/dr")):
                    ref = outs["torch"][i]
                    rtol = (LOSS_RTOL if i == 0 else GRAD_RTOL[dtype])
                    rtol *= max(1.0, floors[i] / max(ref.abs().max().item(), 1e-30))
                    direct, rule = _errors(outs["triton"][i], ref, outs["fp64"][i], rtol)
                    worst.add(max(direct, rule), f"{name} {mode} {what}")
        rec.check(f"group_loss {_NAMES[dtype]}: L and dL/dr vs torch and fp64", worst.value <= 1.0,
                  round(worst.value, 4), 1.0, f"worst: {worst.case} (error / allowed)")


# -- the perturbation --------------------------------------------------------------------------
def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(_BITS[t.element_size()])


def _specials(t: torch.Tensor, g: torch.Tensor, dtype) -> None:
    """Edge values in the first elements (when the tensor is long enough): -0.0, a subnormal, a weight at
    the overflow threshold with a step that overflows, NaN and inf gradients, a NaN weight."""
    if t.numel() < 8:
        return
    tiny = {torch.float32: 1e-40, torch.bfloat16: 1e-39, torch.float16: 3e-6}[dtype]
    top = torch.finfo(dtype).max
    t[0], t[1], t[2], t[3] = -0.0, tiny, top, -top
    g[2], g[3] = 1e30, -1e30  # theta + eta * g overflows: left alone and counted
    g[4], g[5] = float("nan"), float("inf")
    t[6] = float("nan")


def _case_inputs(sizes, dtype, masters: bool, adam: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    ws, gs, ms, vs = [], [], [], []
    for n in sizes:
        w = torch.randn(n, generator=gen) * 0.02
        g = torch.randn(n, generator=gen) * 0.01
        if masters:
            ms.append(w.clone())
            p = w.to(dtype)
        else:
            p = w.to(dtype)
            g = g.to(dtype)
            _specials(p, g, dtype)
        ws.append(p)
        gs.append(g.to(dtype) if not masters else g.to(dtype))
        vs.append(torch.rand(n, generator=gen) * 1e-4 if adam else None)
    return ws, gs, (ms if masters else None), (vs if adam else None)


def _stats_equal(a, b) -> bool:
    return (a.numel, a.changed, a.nonfinite) == (b.numel, b.changed, b.nonfinite) and \
        math.isclose(a.intended_sq, b.intended_sq, rel_tol=1e-9, abs_tol=1e-300) and \
        math.isclose(a.realised_sq, b.realised_sq, rel_tol=1e-9, abs_tol=1e-300)


def check_perturbation(rec, dev, big: bool) -> None:
    from metarm_fast.kernels import Perturbation, perturb_, restore_

    # The interpreter takes seconds per call at these sizes: a dry run checks a few cases, small.
    sizes = [1, 7, 1023, 1025, 8193, 65537, 1_000_037] if big else [1, 7, 1025]
    cases = {
        "fp32 weights": (torch.float32, False, False),
        "bf16 weights": (torch.bfloat16, False, False),
        "fp16 weights": (torch.float16, False, False),
        "fp32 weights, AdamW v": (torch.float32, False, True),
        "bf16 compute copy + fp32 masters": (torch.bfloat16, True, False),
        "bf16 compute copy + fp32 masters, AdamW v": (torch.bfloat16, True, True),
    }
    etas = {label: (1e-3, 5e-6) for label in cases}
    if not big:
        etas = {"fp32 weights": (1e-3,), "bf16 weights": (5e-6,), "bf16 compute copy + fp32 masters, AdamW v": (1e-3,)}
    measured = {}
    for label, (dtype, masters, adam) in cases.items():
        for eta in etas.get(label, ()):
            name = f"{label}, eta {eta:g}"
            ws, gs, ms, vs = _case_inputs(sizes, dtype, masters, adam, seed=len(name))
            kw = dict(bias_correction2=0.1) if adam else {}
            # The yardstick: the torch path on the CPU.
            p_ref, g_ref = [w.clone() for w in ws], [g.clone() for g in gs]
            ref = perturb_(p_ref, g_ref, eta, masters=ms, exp_avg_sq=vs, impl="torch", **kw)
            on = lambda ts: None if ts is None else [None if t is None else t.to(dev) for t in ts]  # noqa: E731
            p, g = on(ws), on(gs)
            pert = perturb_(p, g, eta, masters=on(ms), exp_avg_sq=on(vs), impl="triton", **kw)
            same = all(torch.equal(_bits(a.cpu()), _bits(b)) for a, b in zip(p, p_ref)) and \
                all(torch.equal(_bits(a.cpu()), _bits(b)) for a, b in zip(g, g_ref))
            rec.check(f"perturb_ triton == torch on the CPU, bitwise: {name}", same and _stats_equal(pert.stats, ref.stats),
                      {"changed": pert.stats.changed, "cpu_changed": ref.stats.changed, "bitwise": same})
            # (the realised ratio is not reported here: the edge values' overflowing steps dominate it)
            measured[name] = {"frac_changed": pert.stats.frac_changed, "nonfinite": pert.stats.nonfinite}
            # The restore, three ways, each from a fresh perturbation.
            ok = {}
            pert.restore()
            ok["whole"] = all(torch.equal(_bits(a.cpu()), _bits(b)) for a, b in zip(p, ws))
            p, g = on(ws), on(gs)
            plan = perturb_(p, g, eta, masters=on(ms), exp_avg_sq=on(vs), impl="triton", **kw).restore_plan()
            for i in reversed(range(len(p))):
                plan.restore(i)
            ok["plan, reversed"] = all(torch.equal(_bits(a.cpu()), _bits(b)) for a, b in zip(p, ws))
            p, g = on(ws), on(gs)
            perturb_(p, g, eta, masters=on(ms), exp_avg_sq=on(vs), impl="triton", **kw)
            restore_(p, None if masters else g, masters=on(ms), impl="triton")
            ok["restore_"] = all(torch.equal(_bits(a.cpu()), _bits(b)) for a, b in zip(p, ws))
            rec.check(f"restore bitwise: {name}", all(ok.values()), ok)
            if dev.type == "cuda":  # the torch path on the GPU: informative (auto takes Triton there)
                try:
                    p, g = on(ws), on(gs)
                    perturb_(p, g, eta, masters=on(ms), exp_avg_sq=on(vs), impl="torch", **kw)
                    measured[name]["torch_path_on_gpu_elements_differing_from_cpu"] = sum(
                        int((_bits(a.cpu()) != _bits(b)).sum()) for a, b in zip(p, p_ref))
                except Exception as e:  # noqa: BLE001 - a measurement, not a check
                    measured[name]["torch_path_on_gpu"] = f"{type(e).__name__}: {e}"[:300]
    # Perturbation.concat: two calls on disjoint tensors restore as one.
    ws, gs, _, _ = _case_inputs([1025, 33], torch.bfloat16, False, False, seed=3)
    p, g = [w.to(dev) for w in ws], [x.to(dev) for x in gs]
    both = Perturbation.concat([perturb_(p[:1], g[:1], 1e-3, impl="triton"), perturb_(p[1:], g[1:], 1e-3, impl="triton")])
    both.restore()
    rec.check("Perturbation.concat restores both calls bitwise",
              all(torch.equal(_bits(a.cpu()), _bits(b)) for a, b in zip(p, ws)))
    rec.measure(perturbation=measured)


# -- what the device's compiler emitted -----------------------------------------------------------
PTX_COUNTS = ("fma.rn.f32", "fma.rn.f64", "sqrt.rn.f32", "div.rn.f32", "atom.", "red.")


def compiled_ptx(jit_fn) -> list[str]:
    """The PTX of every variant of ``jit_fn`` compiled in this process (Triton's per-device cache; its
    layout is internal, so this is tried, not relied on)."""
    out = []
    for entry in getattr(jit_fn, "device_caches", {}).values():
        cache = entry[0] if isinstance(entry, tuple) else entry
        for compiled in cache.values():
            ptx = getattr(compiled, "asm", {}).get("ptx")
            if ptx:
                out.append(ptx)
    return out


def check_device_ptx(rec) -> None:
    from metarm_fast.kernels._partial_sum import _partial_sum_kernel
    from metarm_fast.kernels.bt_loss import _bt_loss_fwd_bwd_kernel
    from metarm_fast.kernels.difference_loss import _difference_loss_fwd_bwd_kernel
    from metarm_fast.kernels.perturb_triton import _perturb_kernel, _restore_kernel

    kernels = {"bt_loss": _bt_loss_fwd_bwd_kernel, "difference_loss": _difference_loss_fwd_bwd_kernel,
               "partial_sum": _partial_sum_kernel, "perturb": _perturb_kernel, "restore": _restore_kernel}
    try:
        from metarm_fast.kernels import group_loss as gl

        kernels.update({name: getattr(gl, name) for name in dir(gl) if name.startswith("_group_") and name.endswith("_kernel")})
    except ImportError:
        pass
    found = {}
    for name, fn in kernels.items():
        try:
            ptxs = compiled_ptx(fn)
        except Exception as e:  # noqa: BLE001 - Triton's cache layout is not an API
            rec.skip_part("device PTX", f"Triton's compiled-kernel cache could not be read: {type(e).__name__}: {e}")
            return
        if ptxs:
            found[name] = {"variants": len(ptxs), **{op: sum(p.count(op) for p in ptxs) for op in PTX_COUNTS}}
    if not found:
        rec.skip_part("device PTX", "Triton's compiled-kernel cache held no PTX (its layout changed?)")
        return
    rec.measure(device_ptx=found)
    rec.check("device PTX: no atomics in any kernel", all(v["atom."] == 0 and v["red."] == 0 for v in found.values()),
              {k: v["atom."] + v["red."] for k, v in found.items()}, 0)
    pert = {k: v["fma.rn.f32"] for k, v in found.items() if k in ("perturb", "restore")}
    rec.check("device PTX: no fma.rn.f32 in the perturbation kernels (bitwise agreement with torch)",
              all(v == 0 for v in pert.values()), pert, 0)
