"""bench.shift --quick end to end: it runs, and its JSON and figure have the structure the
table and figure of docs/experiments.md are made from. Numbers are not checked: the quick settings are too small to mean anything."""
from __future__ import annotations

import json

from bench import shift
from bench.shift_stats import bootstrap_mean


def test_quick_run_writes_json_and_figure(tmp_path):
    shift.main(["--quick", "--threads", "1", "--out", str(tmp_path)])
    png = tmp_path / "shift.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((tmp_path / "shift.json").read_text())
    for key in ("settings", "seeds", "methods", "metrics", "per_seed", "gold", "summary", "gap_histogram", "table",
                "environment", "bootstrap"):
        assert key in res, key
    for key in ("torch", "python", "platform", "threads", "command", "wall_s"):
        assert key in res["environment"], key
    assert "--quick" in res["environment"]["command"]
    methods, rounds, seeds = res["methods"], res["settings"]["rounds"], res["seeds"]
    assert methods[0] == "vanilla" and len(methods) == 3 and rounds == 3 and len(seeds) >= 2
    for seed in seeds:
        chains = res["per_seed"][str(seed)]
        assert sorted(chains) == sorted(methods)
        for meth in methods:
            assert len(chains[meth]) == rounds
            for row in chains[meth]:
                assert set(res["metrics"]) <= set(row)
                assert row["pg_curve"][0]["step"] == 0 and row["pg_curve"][0]["kl"] < 1e-6
                assert [b["n"] for b in row["best_of_n"]][:2] == [1, 2]
        assert {"pg_curve", "best_of_n"} <= set(res["gold"][str(seed)])
    for metric in res["metrics"]:
        for meth in methods:
            cis = res["summary"]["by_method"][metric][meth]
            assert len(cis) == rounds and all(c["lo"] <= c["mean"] <= c["hi"] and c["n"] == len(seeds) for c in cis)
        assert sorted(res["summary"]["paired"][metric]) == sorted(methods[1:])
    assert sorted(res["gap_histogram"]["gaps"]) == sorted(methods)
    assert res["table"].count("\n") + 1 == 2 + rounds * len(methods) + rounds * (len(methods) - 1)


def test_bootstrap_interval_holds_the_mean_and_is_repeatable():
    a, b = bootstrap_mean([0.1, 0.4, 0.2, 0.9, 0.5]), bootstrap_mean([0.1, 0.4, 0.2, 0.9, 0.5])
    assert a == b and a["lo"] <= a["mean"] <= a["hi"] and a["n"] == 5
    assert bootstrap_mean([0.3, 0.3, 0.3])["lo"] == bootstrap_mean([0.3, 0.3, 0.3])["hi"] == 0.3
