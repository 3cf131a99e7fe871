"""--meta-diagnostic-every: how much the meta step changed the update, checked against a direct
computation (plain L passes at theta and at the theta' the step used)."""
import pytest
import torch

from metarm_fast.trainer import RewardTrainer
from tests.helpers import assert_bitwise_equal, l_grads, snapshot, tiny_config


@pytest.mark.parametrize("eta", [1e-3, 1e-1])
def test_logged_change_and_cosine_match_a_direct_computation(tmp_path, eta):
    """Direct: grad L by plain L passes of a second trainer, at theta and at the theta' the meta step's
    L pass saw (captured by a forward hook: the in-place step leaves an element unperturbed where its
    restore would not be bit-exact, so at large eta theta' is not exactly theta + eta grad J)."""
    cfg = tiny_config(tmp_path, method="metarm", eta=eta, meta_diagnostic_every=1)
    tr, ref = RewardTrainer(cfg), RewardTrainer(cfg)
    micro, groups = tr.step_inputs(0)
    seen = []  # the weights at each forward: J at theta, L at theta', the diagnostic's L at theta
    hook = tr.model.register_forward_pre_hook(lambda *_: seen.append(snapshot(tr.weights.params)))
    m = tr.train_step(micro, groups)
    hook.remove()
    assert len(seen) == 3
    theta_prime = seen[1]

    l_grads(ref, micro)  # grad L at theta, same batch
    g0 = [p.grad.double() for p in ref.weights.params]
    with torch.no_grad():
        for p, t in zip(ref.weights.params, theta_prime):
            p.copy_(t)
    l_grads(ref, micro)
    g_prime = [p.grad.double() for p in ref.weights.params]
    diff = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(g_prime, g0)))
    norm0 = torch.sqrt(sum((b ** 2).sum() for b in g0))
    normp = torch.sqrt(sum((a ** 2).sum() for a in g_prime))
    rel = float(diff / norm0)
    cos = float(sum((a * b).sum() for a, b in zip(g_prime, g0)) / (norm0 * normp))
    print(f"eta {eta}: logged rel {m['meta_grad_rel_change']:.9g} vs direct {rel:.9g}; "
          f"cos {m['meta_grad_cosine']:.12f} vs {cos:.12f}")
    assert rel > 0  # the meta step did change the gradient
    # Same weights, same batch, the same L pass: float32 rounding of the two gradients only.
    # Measured: the relative change agrees to 1e-7 relative, the cosine to 1e-12.
    assert m["meta_grad_rel_change"] == pytest.approx(rel, rel=1e-5)
    assert m["meta_grad_cosine"] == pytest.approx(cos, abs=1e-9)
    assert tr.step == 1  # the optimizer stepped (with grad L(theta'): test_meta_step holds that path)


def test_off_by_default_and_logged_every_n(tmp_path):
    tr = RewardTrainer(tiny_config(tmp_path, method="metarm", eta=1e-2, meta_diagnostic_every=2, max_steps=4))
    seen = [("meta_grad_cosine" in tr.train_step(*tr.step_inputs(s))) for s in range(4)]
    assert seen == [False, True, False, True]
    tr = RewardTrainer(tiny_config(tmp_path, method="metarm", eta=1e-2))
    assert "meta_grad_cosine" not in tr.train_step(*tr.step_inputs(0))


def test_the_diagnostic_leaves_the_training_unchanged(tmp_path):
    """Its extra L pass and gradient copy must not reach the update: same weights, bit for bit."""
    runs = []
    for every in (0, 1):
        tr = RewardTrainer(tiny_config(tmp_path, method="metarm", eta=1e-2, meta_diagnostic_every=every))
        for s in range(3):
            tr.train_step(*tr.step_inputs(s))
        runs.append(tr.weights.params)
    assert_bitwise_equal(*runs)


@pytest.mark.parametrize("direction", ["sgd", "adam"])
def test_logged_max_move_is_the_largest_eta_d(tmp_path, direction):
    """meta_max_move_over_eta against max |d| computed here in fp64 from grad J (and AdamW's v_hat for
    adam, where the floor of perturb_spec keeps it <= 1), and against the move the L pass saw."""
    from metarm_fast.steps import j_pass

    eta = 1e-2
    cfg = tiny_config(tmp_path, method="metarm", eta=eta, meta_direction=direction, meta_diagnostic_every=1,
                      max_steps=4)
    tr = RewardTrainer(cfg)
    for s in range(2):  # AdamW has second moments
        tr.train_step(*tr.step_inputs(s))
    micro, groups = tr.step_inputs(2)
    tr.weights.zero_grads()
    j_pass(tr.model, tr.batcher.groups(groups))
    opt = tr.optimizer
    beta2, step = opt.param_groups[0]["betas"][1], int(opt.state[tr.weights.params[0]]["step"])
    top = 0.0
    for p in tr.weights.params:
        g = p.grad.double()
        if direction == "adam":
            root = (opt.state[p]["exp_avg_sq"].double() / (1 - beta2**step)).sqrt()
            g = g / (torch.maximum(root, g.abs()) + 1e-8)
        top = max(top, float(g.abs().max()))
    theta, seen = snapshot(tr.weights.params), []
    hook = tr.model.register_forward_pre_hook(lambda *_: seen.append(snapshot(tr.weights.params)))
    m = tr.train_step(micro, groups)
    hook.remove()
    realised = max(float((a.double() - b.double()).abs().max()) for a, b in zip(seen[1], theta))
    print(f"{direction}: logged {m['meta_max_move_over_eta']:.9g}, fp64 {top:.9g}, realised {realised / eta:.9g}")
    # d in fp32 against fp64: two fp32 ulps (2.4e-7) allowed; measured 2.8e-8 (adam), 0 (sgd)
    assert m["meta_max_move_over_eta"] == pytest.approx(top, rel=2.4e-7)
    assert realised / eta <= m["meta_max_move_over_eta"] * (1 + 1e-6)  # a kept step is the intended one, rounded
    if direction == "adam":
        assert m["meta_max_move_over_eta"] <= 1.0  # the floor: never eta / eps


def _bert_with_dropout(tmp_path) -> str:
    """A tiny BERT reward model (dropout 0.1, transformers' default) over the synthetic vocabulary."""
    from transformers import BertConfig, BertForSequenceClassification

    from metarm_fast.synthetic import SyntheticTask

    folder = tmp_path / "bert"
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=80, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32, num_labels=1)).save_pretrained(folder)
    SyntheticTask(0).tokenizer().save_pretrained(folder)
    return str(folder)


def test_with_dropout_the_reading_is_the_meta_steps_not_the_masks(tmp_path):
    """At eta = 0 theta' is theta: the diagnostic's pass must draw the same dropout masks and read no
    change at all (before it replayed them, a tiny BERT read a relative change of ~1)."""
    bert = _bert_with_dropout(tmp_path)
    tr = RewardTrainer(tiny_config(tmp_path, model=bert, packing="none", method="metarm", eta=0.0,
                                   meta_diagnostic_every=1))
    for s in range(2):
        m = tr.train_step(*tr.step_inputs(s))
        assert m["meta_grad_rel_change"] == 0.0 and m["meta_grad_cosine"] == pytest.approx(1.0, abs=1e-12)


def test_with_dropout_the_diagnostic_leaves_the_training_unchanged(tmp_path):
    """Its rerun restores the generators: the steps after it draw the masks they would have drawn."""
    bert = _bert_with_dropout(tmp_path)
    runs = []
    for every in (0, 1):
        tr = RewardTrainer(tiny_config(tmp_path / str(every), model=bert, packing="none", method="metarm", eta=1e-2,
                                       meta_diagnostic_every=every))
        for s in range(3):
            tr.train_step(*tr.step_inputs(s))
        runs.append(tr.weights.params)
    assert_bitwise_equal(*runs)
