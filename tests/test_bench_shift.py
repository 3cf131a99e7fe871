"""`python -m bench.shift --quick` end to end, started from the repository root as the README gives it
(2 rounds, vanilla and one MetaRM chain, 2 seeds), and what its JSON must hold whatever the numbers:
the summary computed from the per-seed numbers beside it, the rounds chained (round r's policy is
round r-1's optimised one), the samples shared where the design says they are. The numbers themselves
are not checked: the quick settings are too small to mean anything."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from bench.shift_stats import bootstrap_mean, fmt


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The README's command (round 0 from scratch, round 1 continuing: every part), from the root."""
    out = tmp_path_factory.mktemp("shift")
    r = subprocess.run([sys.executable, "-m", "bench.shift", "--quick", "--threads", "1", "--out", str(out)], cwd=ROOT,
                       env={k: v for k, v in dict(os.environ, HF_HUB_OFFLINE="1").items() if k != "TRITON_INTERPRET"}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return out, json.loads((out / "shift.json").read_text())


def test_quick_run_writes_json_and_figure(quick):
    out, res = quick
    assert (out / "shift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for key in ("torch", "python", "platform", "threads", "command", "wall_s"):
        assert key in res["environment"], key
    assert "--quick" in res["environment"]["command"]
    methods, rounds, seeds = res["methods"], res["settings"]["rounds"], res["seeds"]
    assert methods == ["vanilla", "metarm eta=1lr"] and rounds == 2 and seeds == [0, 1]
    for seed in seeds:
        chains = res["per_seed"][str(seed)]
        assert sorted(chains) == sorted(methods)
        for meth in methods:
            assert len(chains[meth]) == rounds
            for row in chains[meth]:
                assert set(res["metrics"]) <= set(row)
                assert row["pg_curve"][0]["step"] == 0 and row["pg_curve"][0]["kl"] < 1e-6
                assert [b["n"] for b in row["best_of_n"]] == [1, 2, 4, 8, 16]
        assert {"pg_curve", "best_of_n"} <= set(res["gold"][str(seed)])
    assert sorted(res["gap_histogram"]["gaps"]) == sorted(methods)
    # what the meta step did: read from the MetaRM chains' own diagnostic steps, summarised per round
    for seed in seeds:
        for row in res["per_seed"][str(seed)]["metarm eta=1lr"]:
            assert 0 < row["meta_rel_change"] and -1 <= row["meta_cosine"] <= 1 and row["meta_max_move"] > 0
        assert all("meta_rel_change" not in row for row in res["per_seed"][str(seed)]["vanilla"])
    assert res["meta_table"].count("\n") + 1 == 2 + rounds * (len(methods) - 1)
    for r in range(rounds):
        values = [res["per_seed"][str(s)]["metarm eta=1lr"][r]["meta_max_move"] for s in seeds]
        assert res["meta_summary"]["meta_max_move"]["metarm eta=1lr"][r] == bootstrap_mean(values)
    assert res["table"].count("\n") + 1 == 2 + rounds * len(methods) + rounds * (len(methods) - 1)


def test_the_summary_is_made_of_the_per_seed_numbers(quick):
    _, res = quick
    per_seed, seeds, base = res["per_seed"], [str(s) for s in res["seeds"]], res["methods"][0]
    for metric in res["metrics"]:
        for meth in res["methods"]:
            for r in range(res["settings"]["rounds"]):
                values = [per_seed[s][meth][r][metric] for s in seeds]
                ci = res["summary"]["by_method"][metric][meth][r]
                assert ci == bootstrap_mean(values) and ci["n"] == len(seeds)
                assert ci["mean"] == pytest.approx(sum(values) / len(values), rel=1e-12, abs=1e-15)
                assert ci["lo"] <= ci["mean"] <= ci["hi"]
                assert fmt(ci) in res["table"]
                if meth == base:
                    continue
                # the paired difference: per seed first, then over seeds
                diffs = [per_seed[s][meth][r][metric] - per_seed[s][base][r][metric] for s in seeds]
                paired = res["summary"]["paired"][metric][meth][r]
                assert paired["mean"] == pytest.approx(sum(diffs) / len(diffs), rel=1e-12, abs=1e-15)
                assert paired["lo"] <= paired["mean"] <= paired["hi"]
                assert fmt(paired, signed=True) in res["table"]


def test_rounds_chain_and_chains_share_their_samples(quick):
    _, res = quick
    for s in map(str, res["seeds"]):
        chains = res["per_seed"][s]
        first = [rows[0] for rows in chains.values()]
        # round 0: every chain faces the base policy, with the same samples
        assert len({row["current_policy_true"] for row in first}) == 1
        assert len({row["pairs_current"] for row in first}) == 1
        for rows in chains.values():
            for prev, row in zip(rows, rows[1:]):  # round r's policy is round r-1's optimised one
                assert row["current_policy_true"] == pytest.approx(prev["pg_true"], rel=1e-6)
            # best-of-1 picks nothing: the base samples' true score, whatever the reward
            for row in rows:
                assert row["best_of_n"][0]["true"] == res["gold"][s]["best_of_n"][0]["true"]
        # the meta step changed the reward model: its gaps on the common samples are its own
        assert chains["vanilla"][0]["gap_common"] != chains["metarm eta=1lr"][0]["gap_common"]
    # the seeds are separate experiments
    a, b = (res["per_seed"][str(s)]["vanilla"][0] for s in res["seeds"])
    assert (a["gap_common"], a["pg_true"]) != (b["gap_common"], b["pg_true"])


def test_bootstrap_interval_holds_the_mean_and_is_repeatable():
    a, b = bootstrap_mean([0.1, 0.4, 0.2, 0.9, 0.5]), bootstrap_mean([0.1, 0.4, 0.2, 0.9, 0.5])
    assert a == b and a["lo"] <= a["mean"] <= a["hi"] and a["n"] == 5
    assert a["lo"] < a["hi"]  # values that differ give an interval, not a point
    assert bootstrap_mean([0.3, 0.3, 0.3])["lo"] == bootstrap_mean([0.3, 0.3, 0.3])["hi"] == 0.3


def test_meta_directions_make_chains_of_their_own():
    from bench.shift import Settings, methods_of

    chains = methods_of(Settings(eta_multiples=(1.0, 10.0), meta_directions=("sgd", "adam"), lr=1e-3))
    assert [(n, d) for n, _, _, d in chains] == [
        ("vanilla", "sgd"), ("metarm eta=1lr", "sgd"), ("metarm eta=10lr", "sgd"),
        ("metarm adam eta=1lr", "adam"), ("metarm adam eta=10lr", "adam")]
    assert [e for _, _, e, _ in chains] == [None, 1e-3, 1e-2, 1e-3, 1e-2]
