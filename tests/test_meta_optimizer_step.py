"""--meta-direction optimizer-step: theta' is one step of the run's optimizer on -J (the DeepSpeed
reading of the authors' account), the weights come back bit for bit, and the optimizer keeps what
that step did to its state. Checked against AdamW's update written out here in fp64."""
import pytest
import torch

from metarm_fast.steps import j_pass
from metarm_fast.trainer import RewardTrainer
from tests.helpers import assert_bitwise_equal, meta_grads, snapshot, tiny_config


def _state(opt, q):
    st = opt.state[q]
    return st["exp_avg"].clone(), st["exp_avg_sq"].clone(), int(st["step"])


@pytest.mark.parametrize("precision", ["fp32", "bf16-master"])
def test_theta_prime_is_adamw_on_minus_grad_j_and_the_state_keeps_it(tmp_path, precision):
    eta, wd = 3e-3, 0.01
    cfg = tiny_config(tmp_path, method="metarm", meta_direction="optimizer-step", eta=eta, precision=precision,
                      weight_decay=wd, max_grad_norm=1.0, max_steps=6, lr_schedule="cosine", warmup_ratio=0.0)
    tr = RewardTrainer(cfg)
    for s in range(2):  # AdamW has state (and the schedule has moved) before the step checked
        tr.train_step(*tr.step_inputs(s))
    opt, group = tr.optimizer, tr.optimizer.param_groups[0]
    steps_before = _state(opt, tr.weights.opt_params[0])[2]
    assert steps_before == 4  # two training steps, each counted twice: the meta step's and the update's
    factor = group["lr"] / group["initial_lr"]
    assert 0 < factor < 1  # cosine after 2 of 6 steps
    beta1, beta2 = group["betas"]
    adam_eps = group["eps"]

    micro, groups = tr.step_inputs(2)
    # Expected theta', in fp64 from grad J at theta and AdamW's state: clip to max_grad_norm, then
    # m = b1 m + (1-b1)(-g), v = b2 v + (1-b2) g^2, t + 1, theta (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps),
    # lr = eta * the schedule's factor.
    tr.weights.zero_grads()
    j_pass(tr.model, tr.batcher.groups(groups))
    g = [p.grad.double() for p in tr.weights.params]
    norm = torch.sqrt(sum((x * x).sum() for x in g))
    clip = min(1.0, 1.0 / (float(norm) + 1e-6))
    lr, t = eta * factor, steps_before + 1
    expected, states = [], []
    for q, gi in zip(tr.weights.opt_params, g):
        m, v, _ = _state(opt, q)
        gi = -gi * clip
        m1 = beta1 * m.double() + (1 - beta1) * gi
        v1 = beta2 * v.double() + (1 - beta2) * gi * gi
        mh, vh = m1 / (1 - beta1**t), v1 / (1 - beta2**t)
        expected.append(q.detach().double() * (1 - lr * wd) - lr * mh / (vh.sqrt() + adam_eps))
        states.append((m1, v1, beta1 * m.double().abs() + (1 - beta1) * gi.abs()))

    theta, masters = snapshot(tr.weights.params), snapshot(tr.weights.opt_params)
    seen = []
    hook = tr.model.register_forward_pre_hook(
        lambda *_: seen.append((snapshot(tr.weights.params), snapshot(tr.weights.opt_params))))
    metrics = meta_grads(tr, micro, groups)
    hook.remove()
    assert len(seen) == 2  # J at theta, L at theta'
    assert_bitwise_equal(seen[0][0], theta)
    if precision == "bf16-master":  # the L pass sees round(master after the step)
        assert_bitwise_equal(seen[1][0], [m.to(torch.bfloat16) for m in seen[1][1]])
    assert_bitwise_equal(tr.weights.params, theta)  # the restore, bit for bit
    assert_bitwise_equal(tr.weights.opt_params, masters)
    moves, worst = [], 0.0
    for prime, want, q in zip(seen[1][1], expected, tr.weights.opt_params):
        # The fp32 weights the optimizer stepped (bf16-master: the masters). Error budget: two fp32
        # ulps of the larger of |theta|, |expected| for the two roundings at the weight's scale (decay,
        # then the Adam update), plus AdamW's fp32 arithmetic, which scales with the move (~lr) and
        # grows where m's update cancels; counted in units of lr * 2^-23 (an fp32 ulp of lr).
        big = torch.maximum(want.abs(), q.detach().double().abs()).float()
        ulp = (torch.nextafter(big, torch.full_like(big, float("inf"))) - big).double()
        excess = ((prime.double() - want).abs() - 2 * ulp).clamp(min=0) / (lr * 2.0**-23)
        worst = max(worst, float(excess.max()))
        moves.append((want - q.detach().double()).abs().max())
    print(f"{precision}: theta' - AdamW in fp64 beyond two ulps: {worst:.2f} fp32 ulps of lr")
    # Measured: 0.80 (fp32), 0.63 (bf16-master masters).
    assert worst <= 2.0
    # The largest per-weight move, in the fp32 weights the optimizer steps: AdamW's is about lr per weight.
    assert metrics["meta_max_move_over_eta"] == pytest.approx(float(max(moves)) / eta, rel=1e-4)
    # The state keeps the meta step: -grad J in m, grad J^2 in v, one more step.
    # m's error is counted against the size of its two terms (they can cancel), in fp32 ulps (2^-23).
    m_err = v_err = 0.0
    for q, (m1, v1, m_scale) in zip(tr.weights.opt_params, states):
        m, v, step = _state(opt, q)
        assert step == steps_before + 1
        m_err = max(m_err, float(((m.double() - m1).abs() / (m_scale * 2.0**-23)).max()))
        v_err = max(v_err, float(((v.double() - v1).abs() / (v1 * 2.0**-23)).nan_to_num(0.0).max()))
    print(f"{precision}: AdamW's m within {m_err:.2f}, v within {v_err:.2f} fp32 ulps of fp64")
    # Measured: m 0.88, v 1.06 (fp32); m 0.81, v 1.12 (bf16-master).
    assert m_err <= 2.0 and v_err <= 2.0
    assert group["lr"] == pytest.approx(cfg.lr * factor)  # the schedule's rate is back


def test_non_finite_grad_j_leaves_weights_and_optimizer_untouched(tmp_path):
    cfg = tiny_config(tmp_path, method="metarm", meta_direction="optimizer-step", eta=1e-3, max_steps=4)
    tr = RewardTrainer(cfg)
    tr.train_step(*tr.step_inputs(0))
    q = tr.weights.opt_params[0]
    before, state = snapshot(tr.weights.params), _state(tr.optimizer, q)
    for p in tr.weights.params:
        p.grad.fill_(float("nan"))
    with tr.meta.perturbed() as stats:
        assert stats.nonfinite == sum(p.numel() for p in tr.weights.params)
        assert_bitwise_equal(tr.weights.params, before)  # no step was taken
    assert_bitwise_equal(tr.weights.params, before)
    m, v, step = _state(tr.optimizer, q)
    assert step == state[2] and torch.equal(m, state[0]) and torch.equal(v, state[1])


@pytest.mark.parametrize("precision", ["fp32", "bf16-master"])
def test_an_error_inside_the_step_restores_theta(tmp_path, precision):
    tr = RewardTrainer(tiny_config(tmp_path, method="metarm", meta_direction="optimizer-step", eta=1e-2,
                                   precision=precision))
    tr.train_step(*tr.step_inputs(0))
    theta = snapshot(tr.weights.params)
    tr.weights.zero_grads()
    j_pass(tr.model, tr.batcher.groups(tr.step_inputs(1)[1]))
    with pytest.raises(KeyboardInterrupt):
        with tr.meta.perturbed():
            assert any(not torch.equal(a, b) for a, b in zip(tr.weights.params, theta))
            raise KeyboardInterrupt
    assert_bitwise_equal(tr.weights.params, theta)


def test_the_state_carries_j_into_the_kept_weights_whatever_eta(tmp_path):
    """docs/experiments.md: the -grad J entry that the meta step leaves in AdamW's first moment acts in
    the updates that are kept, so even a vanishing eta is not vanilla; sgd at that eta is, to rounding.
    Measured after 3 steps, max |weights - vanilla's|: sgd 0, optimizer-step 3.2e-3 (lr 1e-3)."""
    runs = {}
    for name, kw in {"vanilla": dict(method="vanilla"), "sgd": dict(method="metarm", eta=1e-12),
                     "optimizer-step": dict(method="metarm", eta=1e-12, meta_direction="optimizer-step")}.items():
        tr = RewardTrainer(tiny_config(tmp_path / name, **kw))
        for s in range(3):
            tr.train_step(*tr.step_inputs(s))
        runs[name] = snapshot(tr.weights.params)

    def gap(a, b):
        return max(float((x - y).abs().max()) for x, y in zip(a, b))

    d_sgd, d_os = gap(runs["sgd"], runs["vanilla"]), gap(runs["optimizer-step"], runs["vanilla"])
    print(f"max |weights - vanilla| after 3 steps at eta 1e-12: sgd {d_sgd:.3g}, optimizer-step {d_os:.3g}")
    assert d_sgd <= 1e-9 and d_os > 1e-4


@pytest.mark.parametrize("settings", [dict(optimizer="adamw8bit", tiny_hidden=64),
                                      dict(optimizer="adamw8bit", precision="bf16-master", tiny_hidden=64),
                                      dict(lora_r=2), dict(grad_accum=2, batch_size=2)],
                         ids=["8-bit AdamW", "bf16-master 8-bit AdamW", "LoRA", "grad_accum 2"])
def test_moves_and_restores_with_every_optimizer_and_layout(tmp_path, settings):
    tr = RewardTrainer(tiny_config(tmp_path, method="metarm", meta_direction="optimizer-step", eta=1e-2, **settings))
    tr.train_step(*tr.step_inputs(0))
    micro, groups = tr.step_inputs(1)
    theta = snapshot(tr.weights.params)
    tr.weights.zero_grads()
    j_pass(tr.model, tr.batcher.groups(groups))
    with tr.meta.perturbed(micro_batches=len(micro)) as stats:
        assert stats.changed > 0 and any(not torch.equal(a, b) for a, b in zip(tr.weights.params, theta))
    assert_bitwise_equal(tr.weights.params, theta)
    m = tr.train_step(micro, groups)  # and the trainer's whole step
    assert "skipped" not in m and m["meta_max_move_over_eta"] > 0
