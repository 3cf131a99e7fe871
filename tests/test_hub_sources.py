"""Hub datasets with a config or a data_dir (NAME?data_dir=...&name=...&split=...), read offline
from a local dataset folder (datasets.load_dataset takes a folder exactly as it takes a hub name)."""
import json

import pytest

from metarm_fast.data import DataError, load_pairs
from metarm_fast.data.readers import hub_options


def _hh(chosen, rejected):
    return {"chosen": f"\n\nHuman: hi\n\nAssistant: {chosen}", "rejected": f"\n\nHuman: hi\n\nAssistant: {rejected}"}


@pytest.fixture
def hh_like(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    for sub, n in (("harmless-base", 3), ("helpful-base", 5)):
        (tmp_path / "hh" / sub).mkdir(parents=True)
        for split in ("train", "test"):
            rows = [_hh(f"{sub} {split} good {i}", f"{sub} {split} bad {i}") for i in range(n + (split == "test"))]
            (tmp_path / "hh" / sub / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(tmp_path / "hh")


def test_data_dir_and_split_reach_load_dataset(hh_like):
    pairs, rep = load_pairs(f"{hh_like}?data_dir=harmless-base")
    assert len(pairs) == 3 and all(p.chosen.strip().startswith("harmless-base train good") for p in pairs)
    assert rep.format == "hh-rlhf"
    pairs, _ = load_pairs(f"{hh_like}?data_dir=helpful-base&split=test")
    assert len(pairs) == 6 and pairs[0].chosen.strip().startswith("helpful-base test")
    assert "[test]:record 1" in pairs[0].source


def test_hub_options_are_checked():
    assert hub_options("Anthropic/hh-rlhf?data_dir=harmless-base&name=x") == (
        "Anthropic/hh-rlhf", {"data_dir": "harmless-base", "name": "x"})
    assert hub_options("org/set") == ("org/set", {})
    with pytest.raises(DataError, match="'datadir=x' is not an option of a hub dataset"):
        hub_options("org/set?datadir=x")
