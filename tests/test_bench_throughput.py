"""bench.throughput end to end on a tiny setup: every requested row exists with positive numbers, the
targets are computed, and the results file carries the environment."""
from __future__ import annotations

import csv
import importlib.util
import json
from types import SimpleNamespace

import pytest

from bench import throughput
from bench.flops import attention_pairs
from bench.report import write_results
from bench.rows import make_row
from bench.runners import Runner
from metarm_fast.batch import EncodedPair
from metarm_fast.data import EncodedSeq

HAS_TRL = importlib.util.find_spec("trl") is not None
TINY = ["--hidden", "32", "--layers", "2", "--steps", "2", "--warmup", "1", "--batch", "4",
        "--max-records", "48", "--max-length", "48", "--threads", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "throughput.json"
    methods = "vanilla,metarm,copy" + (",trl" if HAS_TRL else "")
    result = throughput.main(TINY + ["--packing", "none,pack,share-prompt", "--methods", methods, "--out", str(out)])
    return result, out


def _positive(row: dict) -> None:
    for key in ("step_s", "pairs_per_s", "tokens_computed_per_s", "tokens_padded_per_s", "achieved_flops_per_s"):
        s = row[key]
        assert s["n"] == 2 and 0 < s["min"] <= s["median"] <= s["max"], (row["method"], key, s)
    assert row["tokens_computed_per_step"] > 0 and row["tokens_padded_per_step"] > 0
    assert row["tokens_computed_per_step"] <= row["tokens_padded_per_step"]
    assert row["pairs_per_step"] == 4
    # what the model ran (the hook on its input embedding) is what the library counts for the layout
    assert row["tokens_computed_over_expected"] == 1.0, (row["method"], row["packing"])


def test_every_requested_row_has_positive_numbers(run):
    result, _ = run
    rows = {(r["method"], r["packing"]): r for r in result["rows"]}
    skipped = {s["runner"] for s in result["skipped"]}
    expected = ["vanilla", "metarm", "copy", "metarm-parts"] + (["trl"] if HAS_TRL else [])
    for method in expected:  # padded: every method must have run
        assert (method, "none") in rows, (method, result["skipped"])
        _positive(rows[(method, "none")])
        if method != "metarm-parts":
            assert rows[(method, "none")]["peak_bytes"] > 0
    for packing in ("pack", "share-prompt"):  # a packed mode: a row, or a reason it is left out
        for method in ("vanilla", "metarm", "copy", "metarm-parts"):
            if (method, packing) in rows:
                _positive(rows[(method, packing)])
            else:
                assert f"{method}[{packing}]" in skipped, (method, packing, result["skipped"])
    parts = rows[("metarm-parts", "none")]
    assert all(parts[f"{k}_s"]["median"] > 0 for k in ("J", "L", "opt"))
    meta = rows[("metarm", "none")]  # the machinery's own time, inside the timed MetaRM steps
    assert meta["perturb_s"]["n"] == meta["restore_s"]["n"] == 2
    assert meta["perturb_s"]["min"] > 0 and meta["restore_s"]["min"] > 0
    assert 0 < meta["machinery_share"]["min"] <= meta["machinery_share"]["max"] < 1
    # the padded MetaRM step runs the model on twice the tokens of the vanilla step (meta + L pass)
    assert rows[("metarm", "none")]["tokens_computed_per_step"] == 2 * rows[("vanilla", "none")]["tokens_computed_per_step"]
    if HAS_TRL:  # TRL ran on the very same padded batches
        assert rows[("trl", "none")]["tokens_computed_per_step"] == rows[("vanilla", "none")]["tokens_computed_per_step"]
        assert rows[("trl", "none")]["attn_implementation"] == rows[("vanilla", "none")]["attn_implementation"]


def test_targets_and_environment_written(run, tmp_path):
    result, out = run
    names = {(t["target"], t["packing"]) for t in result["targets"]}
    assert ("MetaRM time / (J + L + opt)", "none") in names
    for t in result["targets"]:
        assert t["verdict"] in ("PASS", "FAIL", "n/a")
        if HAS_TRL or t["target"].startswith("MetaRM time"):
            assert t["value"] > 0 and t["verdict"] != "n/a"
    data = json.loads(out.read_text())
    env = data["environment"]
    for key in ("device", "torch", "transformers", "trl", "commit", "loadavg_start", "loadavg_end", "torch_threads"):
        assert key in env, key
    assert env["torch"] and env["transformers"]
    assert data["rows"] and data["targets"]
    # the same results as CSV: one line per row and per target, each with the environment
    path = tmp_path / "throughput.csv"
    write_results(result, str(path))
    lines = list(csv.DictReader(path.open()))
    assert sum(line["kind"] == "step" for line in lines) == len(result["rows"])
    assert sum(line["kind"] == "target" for line in lines) == len(result["targets"])
    assert all(line["env_torch"] == env["torch"] for line in lines)


def test_bad_flags_are_refused():
    with pytest.raises(SystemExit):
        throughput.main(["--methods", "vanilla,nope"])
    with pytest.raises(SystemExit):
        throughput.main(["--packing", "zip"])
    with pytest.raises(SystemExit):
        throughput.main(["--repeat", "0"])


class _Scripted(Runner):
    """A runner whose steps take the times it is given, and report them as their 'part'."""

    name = "scripted"

    def __init__(self, times):
        super().__init__("none", [[[]]] * 4)
        self.script = iter(times)
        self.counter = type("C", (), {"take": lambda self: 7})()
        self.part: list[float] = []

    def step(self, i):
        self.last = next(self.script)
        return self.last

    def run(self, i, record, rep=0):
        super().run(i, record, rep)
        if record:
            self.keep(self.part, -self.last, rep)


def test_repeat_keeps_each_batch_fastest_run_and_its_values():
    r = _Scripted([5.0, 3.0, 4.0, 2.0, 6.0, 9.0])  # batch 0: 5, 3, 4; batch 1: 2, 6, 9
    for i in range(2):
        for rep in range(3):
            r.run(i, record=True, rep=rep)
    assert r.times == [3.0, 2.0] and r.steps == [0, 1] and r.computed == [7, 7]
    assert r.part == [-3.0, -2.0]  # what the fastest run recorded, not the last one


def test_repeat_runs_end_to_end(tmp_path):
    """--repeat 2 on the MetaRM rows (and TRL's, whose repeats reuse its batch): one value per batch."""
    methods = "metarm" + (",trl" if HAS_TRL else "")
    result = throughput.main(TINY + ["--packing", "none", "--methods", methods, "--repeat", "2"])
    rows = {r["method"]: r for r in result["rows"]}
    assert not result["skipped"], result["skipped"]
    for method in ("metarm", "metarm-parts") + (("trl",) if HAS_TRL else ()):
        assert rows[method]["step_s"]["n"] == 2, method
    assert rows["metarm"]["perturb_s"]["n"] == 2 and rows["metarm-parts"]["J_s"]["n"] == 2


def test_nproc_compares_ranks_with_one_process():
    rows = throughput.main(["--nproc", "2", "--hidden", "32", "--layers", "2", "--steps", "2", "--warmup", "1",
                            "--batch", "2", "--max-records", "48", "--max-length", "48", "--threads", "1",
                            "--packing", "none", "--methods", "metarm"])["rows"]
    (row,) = rows
    assert row["nproc"] == 2 and row["pairs_per_s_1proc"] > 0 and row["pairs_per_s_all_ranks"] > 0
    assert row["per_rank_over_1proc"] == pytest.approx(row["pairs_per_s_all_ranks"] / 2 / row["pairs_per_s_1proc"])


def test_mfu_on_every_row_against_a_measured_peak(run):
    result, _ = run
    assert result["peak_flops"] > 0 and result["peak_flops_source"].startswith("measured")
    for row in result["rows"]:
        assert row["mfu"] is not None and 0 < row["mfu"]["median"] < 1.5, (row["method"], row["packing"], row["mfu"])
    names = {t["target"] for t in result["targets"]}
    assert {"meta machinery / MetaRM step", "MetaRM MFU"} <= names


# prompt of 2, responses of 1 and 3
PROMPT, CHOSEN, REJECTED = [1, 2], [3], [4, 5, 6]


def test_attention_pairs():
    # shared 3 + (1*2 + 1) + (3*2 + 6) = 18; unshared 3*4/2 + 5*6/2 = 21
    group = [[EncodedSeq(PROMPT, CHOSEN), EncodedSeq(PROMPT, REJECTED)]]
    assert attention_pairs(group, "share-prompt") == 18
    assert attention_pairs(group, "pack") == attention_pairs(group, "none") == 21


class _Timed(Runner):
    """One step of one pair, taking `seconds`, on which the model ran `tokens` tokens."""

    name = "timed"

    def __init__(self, packing, seconds, tokens):
        super().__init__(packing, [[[EncodedPair(EncodedSeq(PROMPT, CHOSEN), EncodedSeq(PROMPT, REJECTED))]]])
        self.seconds = seconds
        self.counter = SimpleNamespace(take=lambda: tokens)
        self.model = SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa"))

    def step(self, i):
        return self.seconds


@pytest.mark.parametrize("packing, tokens, pairs", [("none", 2 * 5, 21), ("share-prompt", 2 + 1 + 3, 18)])
def test_row_tokens_flops_and_mfu_against_a_hand_count(packing, tokens, pairs):
    r = _Timed(packing, seconds=0.5, tokens=tokens)
    r.run(0, record=True)
    config = SimpleNamespace(num_attention_heads=2, hidden_size=8, num_hidden_layers=1)  # head_dim 4
    row = make_row(r, nflop=100, peak_fl=1e5, config=config)
    assert row["tokens_padded_per_step"] == 2 * 5 and row["tokens_real_per_step"] == 3 + 5
    assert row["tokens_computed_over_expected"] == 1.0
    flops = 6 * 100 * tokens + 12 * 2 * 4 * 1 * pairs  # 6 N tokens + 12 heads head_dim layers pairs
    assert row["flops_per_step"] == flops
    assert row["mfu"]["median"] == pytest.approx(flops / 0.5 / 1e5)
    assert make_row(r, nflop=100, peak_fl=None, config=config)["mfu"] is None


def test_sdpa_tiles_times_every_variant():
    from bench.sdpa_tiles import main

    (row,) = main(["--lengths", "16", "--reps", "1"])
    assert row["T"] == 16 and all(row[k] > 0 for k in ("none", "is_causal", "full", "tril"))
