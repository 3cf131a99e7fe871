"""Does a seeded CPU run depend on the number of threads? Two answers, each able to fail:

- op by op: every op of a training step is run twice on the same inputs, with 1 and with 2 threads,
  and any op whose outputs differ is named (this is how the perturbation's fp64 statistics, then
  taken by torch.dot and a full .sum(), were found to depend on the thread count);
- end to end: the same steps at 1 and at 2 threads give the same weights, optimizer state and
  logged statistics, bit for bit.

The tensors must be larger than torch's parallel grain size (32768 elements) for any op to split
its work among threads, hence tiny_hidden=256 here.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from metarm_fast.trainer import RewardTrainer
from tests.helpers import assert_bitwise_equal, run_steps, tiny_config


def _same(a, b) -> bool:
    for x, y in zip(tree_flatten(a)[0], tree_flatten(b)[0]):
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape:
                return False
            if x.layout != torch.strided:  # the embedding's row-sparse gradient: compare what it adds up to
                x, y = x.to_dense(), y.to_dense()
            if x.is_floating_point():
                if not bool(((x == y) | (x.isnan() & y.isnan())).all()):
                    return False
            elif not torch.equal(x, y):
                return False
    return True


class ThreadReplay(TorchDispatchMode):
    """Runs each op first on copies of its inputs with ``threads[1]`` threads, then for real with
    ``threads[0]``, and records the ops whose outputs (or mutated inputs) differ. Aliasing among the
    inputs is kept in the copies (``where(..., out=param)`` reads and writes one tensor), and the RNG
    states an op consumes are put back before the real call."""

    def __init__(self, threads=(1, 2)):
        super().__init__()
        self.threads = threads
        self.differs: dict[str, int] = {}
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        copies = {}

        def copy(x):
            if isinstance(x, torch.Tensor):
                if x.layout != torch.strided:  # sparse: no storage of its own, aliased by nothing here
                    return copies.setdefault(("sparse", id(x)), x.clone())
                key = (x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), tuple(x.stride()))
                return copies.setdefault(key, x.clone())
            return x

        args2, kwargs2 = tree_map(copy, (args, kwargs))
        gens = [g for g in tree_flatten((args, kwargs))[0] if isinstance(g, torch.Generator)]
        states, cpu_state = [g.get_state() for g in gens], torch.get_rng_state()
        torch.set_num_threads(self.threads[1])
        try:
            out2 = func(*args2, **kwargs2)
        finally:
            torch.set_num_threads(self.threads[0])
            for g, st in zip(gens, states):
                g.set_state(st)
            torch.set_rng_state(cpu_state)
        out = func(*args, **kwargs)
        self.calls += 1
        if not _same((out, args, kwargs), (out2, args2, kwargs2)):
            self.differs[str(func)] = self.differs.get(str(func), 0) + 1
        return out


SETTINGS = {
    "fp32": dict(),
    "bf16-master, adam direction": dict(precision="bf16-master", meta_direction="adam"),
    "grad_accum 2": dict(grad_accum=2, batch_size=4),
}


def _steps(tr, n):
    return run_steps(tr, n)


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("method", ["vanilla", "metarm"])
def test_no_op_of_a_step_depends_on_the_thread_count(tmp_path, threads, method):
    cfg = tiny_config(tmp_path, method=method, eta=1e-2, tiny_hidden=256, max_steps=2, batch_size=4)
    tr = RewardTrainer(cfg)
    with ThreadReplay() as replay:
        _steps(tr, 2)
    assert replay.calls > 1000  # the replay saw the whole step
    assert not replay.differs, f"ops whose result depends on the thread count: {replay.differs}"


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_metarm_steps_repeat_bitwise_at_1_and_2_threads(tmp_path, threads, setting):
    runs = []
    for n in (1, 2):
        torch.set_num_threads(n)
        cfg = tiny_config(tmp_path / str(n), method="metarm", eta=1e-2, tiny_hidden=256, max_steps=3,
                          **SETTINGS[setting])
        tr = RewardTrainer(cfg)
        metrics = _steps(tr, 3)
        for m in metrics:
            m.pop("meta_perturb_ms"), m.pop("meta_restore_ms")  # host timings
        runs.append((tr, metrics))
    (a, ma), (b, mb) = runs
    assert ma == mb
    assert_bitwise_equal(a.weights.opt_params, b.weights.opt_params)
    assert_bitwise_equal(a.weights.params, b.weights.params)
    for p, q in zip(a.weights.opt_params, b.weights.opt_params):
        sa, sb = a.optimizer.state[p], b.optimizer.state[q]
        assert_bitwise_equal([sa[k] for k in sorted(sa)], [sb[k] for k in sorted(sb)])


def test_threads_setting_is_applied_and_a_busy_machine_is_told_what_to_pass(tmp_path, threads):
    from metarm_fast.threads import busy_warning

    tr = RewardTrainer(tiny_config(tmp_path, threads=1))
    assert tr.threads == 1 and torch.get_num_threads() == 1
    assert busy_warning(2, load=0.1, cores=2) is None
    msg = busy_warning(2, load=1.0, cores=2)
    assert msg and "--threads 1" in msg
    with pytest.raises(ValueError, match="threads"):
        RewardTrainer(tiny_config(tmp_path, threads=-1))
