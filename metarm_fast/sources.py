"""Resolve a data source named in the config: a file or hub dataset (via the loaders), or the synthetic task.

Synthetic names: "synthetic" / "synthetic:train", "synthetic:eval", "synthetic:shifted" (labelled pairs
from the better policy) and "synthetic:meta" (prompts with k unlabelled responses from it).
"""
from __future__ import annotations

from metarm_fast.config import SYNTHETIC, TrainConfig
from metarm_fast.data import LoadReport, MetaGroup, PreferencePair, load_meta, load_pairs


def _synthetic_split(name) -> str | None:
    if not isinstance(name, str):
        return None
    if name == SYNTHETIC:
        return "train"
    if name.startswith(SYNTHETIC + ":"):
        return name.split(":", 1)[1]
    return None


def _synthetic_report(name: str, n: int, kind: str = "pairs") -> LoadReport:
    return LoadReport(path=name, format="synthetic", records_read=n, loaded=n, kind=kind)


def pair_source(name: str, cfg: TrainConfig) -> tuple[list[PreferencePair], LoadReport]:
    split = _synthetic_split(name)
    if split is not None:
        from metarm_fast.synthetic import SyntheticTask

        pairs = SyntheticTask(cfg.seed).pairs(split, n=cfg.max_records)
        return pairs, _synthetic_report(name, len(pairs))
    return load_pairs(
        name,
        format=cfg.data_format,
        split=cfg.split,
        on_bad_record=cfg.on_bad_record,
        pku_preference=cfg.pku_preference,
        max_records=cfg.max_records,
        oasst_lang=cfg.oasst_lang,
        oasst_keep_flagged=cfg.oasst_keep_flagged,
        helpsteer3_margin=cfg.helpsteer3_margin,
    )


def meta_source(name: str, cfg: TrainConfig) -> tuple[list[MetaGroup], LoadReport]:
    split = _synthetic_split(name)
    if split is not None:
        from metarm_fast.synthetic import SyntheticTask

        if split != "meta":
            raise ValueError(f"meta data {name!r}: the synthetic meta set is called '{SYNTHETIC}:meta'")
        groups = SyntheticTask(cfg.seed).meta_groups(m=cfg.max_records, k=cfg.meta_k)
        return groups, _synthetic_report(name, len(groups), kind="groups")
    return load_meta(name, split=cfg.split, on_bad_record=cfg.on_bad_record, max_records=cfg.max_records)
