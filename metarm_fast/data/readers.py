"""Reading sources: local .jsonl / .json / .parquet files (gzipped too, except parquet), .txt prompt
lists, and hub datasets by name; then load_pairs / load_meta / load_prompts.

JSON files are read here line by line with gzip + json rather than through
``datasets.load_dataset("json")``: that loader parses whole blocks with pyarrow and its errors do not
say which line was bad, while every error here must name the line. Parquet files are read with
pyarrow (a dependency of datasets) batch by batch; their records are named "record N" (1-based).
A source that is not an existing path and does not look like one is a hub dataset name.

Bad records go to one place (``_Collector.bad``): with on_bad_record="error" the first one raises,
with "skip" it is counted under its reason in ``LoadReport.skipped``. Errors about the source as a
whole (missing file, unknown format, a JSON array broken mid-way, no usable record) always raise.
"""
from __future__ import annotations

import gzip
import json
import os
from contextlib import closing
from typing import Iterator

from metarm_fast.data.formats import (
    META_FORMATS, PAIR_FORMATS, PROMPT_FORMATS, RANKED_FORMATS, Format, Loc, Oasst, detect, make_format,
)
from metarm_fast.data.records import DataError, LoadReport, MetaGroup, PreferencePair, Prompt, RankedGroup, bad_record

_JSON_EXT = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
_PATHLIKE_EXT = _JSON_EXT + (".parquet", ".txt", ".gz", ".csv", ".tsv", ".arrow")

Record = tuple[Loc, "dict | DataError"]


# -- sources -------------------------------------------------------------------------------------


def _looks_like_path(source: str) -> bool:
    return (
        source.lower().endswith(_PATHLIKE_EXT)
        or source.startswith(("/", "./", "../", "~"))
    )


HUB_OPTIONS = ("name", "data_dir", "split")  # NAME?name=CONFIG&data_dir=DIR&split=SPLIT


def hub_options(source: str) -> tuple[str, dict[str, str]]:
    """A hub source's dataset and its load_dataset options: ``Anthropic/hh-rlhf?data_dir=harmless-base``,
    ``org/set?name=CONFIG``, ``org/set?split=test``; ({} for a source without a '?')."""
    if "?" not in source:
        return source, {}
    name, query = source.split("?", 1)
    opts = {}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        if key not in HUB_OPTIONS or not eq or not value:
            raise DataError(f"{source}: {part!r} is not an option of a hub dataset; use "
                            + ", ".join(f"{k}=..." for k in HUB_OPTIONS) + " joined by '&' after the '?' "
                            "(e.g. Anthropic/hh-rlhf?data_dir=harmless-base)", location=source)
        opts[key] = value
    return name, opts


def describe_source(source) -> str:
    """How a source is named in messages and reports: a path or hub name as given; in-memory data by
    its kind and size (never its contents)."""
    if isinstance(source, str):
        return source
    n = len(source) if hasattr(source, "__len__") else "?"
    return f"<{type(source).__name__} of {n} records>"


def _open_source(source, split: str) -> tuple[str, Iterator[Record]]:
    """(kind, records): kind is "json", "parquet", "text", "hub", "dataset" or "memory"."""
    if not isinstance(source, str):
        return "memory", _memory_records(source)
    path_part, _, query = source.partition("?")
    if os.path.isdir(os.path.expanduser(path_part)):
        _, opts = hub_options(source)
        if not set(opts) - {"split"}:  # with data_dir / name, datasets' own loader reads the folder below
            return _open_dir(source, os.path.expanduser(path_part), opts.get("split", split))
    if "?" in source:
        return "hub", _hub_records(source, split)
    path = os.path.expanduser(source)
    if os.path.isfile(path):
        return _open_file(source, path)
    if _looks_like_path(source):
        raise DataError(f"{source}: no such file", location=source)
    return "hub", _hub_records(source, split)


def _open_file(source: str, path: str) -> tuple[str, Iterator[Record]]:
    low = path.lower()
    if low.endswith(_JSON_EXT):
        return "json", _json_records(source, path)
    if low.endswith(".parquet"):
        return "parquet", _parquet_records(source, path)
    if low.endswith(".txt"):
        return "text", _text_records(source, path)
    if low.endswith(".parquet.gz"):
        raise DataError(f"{source}: gzipped parquet is not read; parquet is compressed already, so gunzip it", location=source)
    raise DataError(
        f"{source}: unsupported file type; use .jsonl, .json (an array or JSON lines) or .parquet, "
        "optionally gzipped (.jsonl.gz, .json.gz), a folder of them, or a datasets save_to_disk folder",
        location=source,
    )


_SPLIT_NAMES = ("train", "test", "validation", "valid", "dev", "eval")
_DATA_EXT = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")


def _open_dir(source: str, path: str, split: str) -> tuple[str, Iterator[Record]]:
    """A local folder: a ``datasets`` save_to_disk folder (a Dataset, or a DatasetDict whose ``split``
    is read), or a folder of .jsonl/.json/.parquet files. Files named for a split (train*.jsonl,
    test/part-0.parquet, ...) are read for that split only; otherwise every file is read, in name order."""
    if os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json")):
        return "dataset", _saved_dataset_records(source, path, split)
    files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names
                   if f.lower().endswith(_DATA_EXT) and not f.startswith("."))
    if not files:
        raise DataError(f"{source}: the folder holds no .jsonl, .json or .parquet file, and is not a folder written by "
                        "datasets' save_to_disk; pass one of those", location=source)

    def split_of(f: str) -> str | None:
        parts = os.path.relpath(f, path).lower().split(os.sep)
        return next((s for part in parts for s in _SPLIT_NAMES if part.startswith(s)), None)

    named = {split_of(f) for f in files} - {None}
    if named:
        files = [f for f in files if split_of(f) == split]
        if not files:
            raise DataError(f"{source}: no file for split {split!r}; its files are named for the splits "
                            f"{', '.join(sorted(named))}: pass {source.split('?')[0]}?split=NAME (or --split NAME)",
                            location=source)

    def records() -> Iterator[Record]:
        for f in files:
            yield from _open_file(f, f)[1]

    return "json", records()


def _saved_dataset_records(source: str, path: str, split: str) -> Iterator[Record]:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:
        raise DataError(f"{source}: cannot read the save_to_disk folder: {type(e).__name__}: {e}", location=source) from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{source}: a DatasetDict without the split {split!r}; its splits are "
                            f"{', '.join(ds)}: pass {source.split('?')[0]}?split=NAME (or --split NAME)", location=source)
        ds, origin = ds[split], f"{source.split('?')[0]}[{split}]"
    else:
        origin = source.split("?")[0]
    for n, rec in enumerate(ds, 1):
        yield Loc(origin, "record", n), rec


def _memory_records(data) -> Iterator[Record]:
    """Records handed over from Python: a list of dicts, a ``datasets.Dataset`` or a pandas DataFrame."""
    origin = describe_source(data)
    if hasattr(data, "to_dict") and hasattr(data, "columns"):  # pandas
        rows = data.to_dict(orient="records")
    elif isinstance(data, (list, tuple)) or hasattr(data, "features"):  # a list, or a datasets.Dataset
        rows = data
    else:
        raise DataError(f"{origin}: data from Python must be a list of dicts, a datasets.Dataset or a pandas "
                        "DataFrame", location=origin)
    for n, rec in enumerate(rows, 1):
        yield Loc(origin, "record", n), rec


def _lines(source: str, path: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) of a possibly gzipped file; a broken gzip stream names the file."""
    opener = gzip.open if path.lower().endswith(".gz") else open
    n = 0
    try:
        with opener(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                yield n, raw
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        where = f" after line {n}" if n else ""
        raise DataError(f"{source}: cannot read the file{where} (damaged or cut short?): {e}", location=source) from e


def _json_records(source: str, path: str) -> Iterator[Record]:
    lines = _lines(source, path)
    for n, raw in lines:
        if raw.strip():
            break
    else:
        return  # an empty file: no records (the loader then reports "no usable records")
    if raw.lstrip().startswith(b"["):
        with closing(lines):
            rest = b"".join(r for _, r in lines)
        yield from _json_array_records(source, b"\n" * (n - 1) + raw + rest)
        return
    yield _json_line(source, n, raw)
    for n, raw in lines:
        if raw.strip():
            yield _json_line(source, n, raw)


def _json_line(source: str, n: int, raw: bytes) -> Record:
    loc = Loc(source, "line", n)
    try:
        return loc, json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return loc, bad_record(str(loc), None, f"the line is not valid UTF-8 ({e.reason} at byte {e.start})", "unreadable line")
    except json.JSONDecodeError as e:
        return loc, bad_record(str(loc), None, f"the line is not valid JSON ({e.msg} at column {e.colno}); each line must hold one whole JSON object",
                               "unreadable line")


def _json_array_records(source: str, data: bytes) -> Iterator[Record]:
    """The elements of a JSON array, each named by its index and the line it starts on.

    A syntax error inside an array cannot be stepped over (nothing says where the next element
    starts), so it raises even when skipping."""
    try:
        s = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{source}:line {line}: not valid UTF-8 ({e.reason})", location=f"{source}:line {line}") from e
    decoder = json.JSONDecoder()
    ws = " \t\r\n"

    def skip(i: int) -> int:
        while i < len(s) and s[i] in ws:
            i += 1
        return i

    def broken(i: int, what: str) -> DataError:
        line = s.count("\n", 0, i) + 1
        col = i - (s.rfind("\n", 0, i) + 1) + 1
        return DataError(
            f"{source}:line {line}: {what} at column {col}; a JSON array cannot be read past a syntax error "
            "(not even when skipping bad records): fix the file, or write it as JSON lines, one record a line",
            location=f"{source}:line {line}", reason="unreadable line",
        )

    i = skip(0) + 1  # past "["
    line, counted, index = 1, 0, 0
    i = skip(i)
    if i < len(s) and s[i] == "]":
        i += 1
    else:
        while True:
            line += s.count("\n", counted, i)
            counted = i
            index += 1
            try:
                obj, i = decoder.raw_decode(s, i)
            except json.JSONDecodeError as e:
                raise broken(e.pos, f"not valid JSON ({e.msg})") from e
            yield Loc(source, "record", index, line), obj
            i = skip(i)
            if i < len(s) and s[i] == ",":
                i = skip(i + 1)
                continue
            if i < len(s) and s[i] == "]":
                i += 1
                break
            raise broken(i, "expected ',' or ']' after an array element")
    if skip(i) != len(s):
        raise broken(skip(i), "unexpected text after the JSON array")


def _parquet_records(source: str, path: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"{source}: cannot read it as parquet: {e}", location=source) from e
    n = 0
    for batch in pf.iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            n += 1
            yield Loc(source, "record", n), rec


def _text_records(source: str, path: str) -> Iterator[Record]:
    """A .txt file: one prompt a line (blank lines are not records). Prompts with line breaks need
    a .jsonl file of {"prompt": ...} records instead."""
    for n, raw in _lines(source, path):
        loc = Loc(source, "line", n)
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            yield loc, bad_record(str(loc), None, f"the line is not valid UTF-8 ({e.reason})", "unreadable line")
            continue
        if line.strip():
            yield loc, {"prompt": line}


def _hub_records(source: str, split: str) -> Iterator[Record]:
    name, opts = hub_options(source)
    split = opts.pop("split", split)
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split, **opts)
    except Exception as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or "offline" in str(e).lower()
        why = (
            "the machine is offline (or HF_HUB_OFFLINE is set)" if offline
            else "the hub could not provide it (no network, a wrong name, or a split that does not exist)"
        )
        raise DataError(
            f"{source}: not a local file, and loading it as a hub dataset (split {split!r}) failed: {why}. "
            f"Error: {type(e).__name__}: {e}. Pass a local .jsonl/.json/.parquet file instead, "
            "or download the dataset on a machine with network access first",
            location=source,
        ) from e
    origin = f"{source}[{split}]"
    for n, rec in enumerate(ds, 1):
        yield Loc(origin, "record", n), rec


# -- loading -------------------------------------------------------------------------------------


class _Collector:
    def __init__(self, report: LoadReport, on_bad_record: str):
        self.report = report
        self.skip = on_bad_record == "skip"

    def bad(self, err: DataError) -> None:
        if not self.skip:
            raise err
        self.report.skipped[err.reason] += 1


def _check_args(on_bad_record: str, max_records: int | None) -> None:
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    if max_records is not None and max_records < 1:
        raise ValueError(f"max_records must be a positive number or None, got {max_records!r}")


def _load(source: str, kind: str, allowed: tuple[str, ...], format: str, split: str, on_bad_record: str,
          max_records: int | None, pku_preference: str = "better", **format_options) -> tuple[list, LoadReport]:
    _check_args(on_bad_record, max_records)
    if pku_preference not in ("better", "safer"):
        raise ValueError(f"pku_preference must be 'better' or 'safer', got {pku_preference!r}")
    if format != "auto" and format not in allowed:
        raise DataError(f"{describe_source(source)}: format {format!r} cannot be read here; use one of: auto, {', '.join(allowed)}", location=source)
    src_kind, records = _open_source(source, split)
    if src_kind == "text":
        if "text" not in allowed:
            raise DataError(f"{source}: a .txt file holds one prompt a line; only prompts can be loaded from it", location=source)
        format = "text"
    report = LoadReport(path=describe_source(source), format=format, kind=kind)
    out = _Collector(report, on_bad_record)
    handler: Format | None = None if format == "auto" else make_format(format, pku_preference, **format_options)
    items: list = []
    with closing(records):
        for loc, rec in records:
            if max_records is not None and report.records_read >= max_records:
                if isinstance(handler, Oasst):
                    handler.read_all = False
                break
            report.records_read += 1
            if isinstance(rec, DataError):
                out.bad(rec)
                continue
            if not isinstance(rec, dict):
                out.bad(bad_record(str(loc), None, f"expected a JSON object, got {type(rec).__name__}", "non-object record"))
                continue
            if handler is None:
                handler = make_format(_detect(rec, loc, allowed, kind), pku_preference, **format_options)
                report.format = handler.name
            if handler.name in RANKED_FORMATS and kind == "pairs":
                report.kind = "groups"  # k-response records: one ranked group each
            try:
                items.extend(handler.convert(rec, loc))
            except DataError as e:
                out.bad(e)
    if handler is not None:
        items.extend(handler.finish(out.bad))
        for why, n in handler.filtered.items():
            report.skipped[f"filtered: {why}"] += n
    report.loaded = len(items)
    if not items:
        raise DataError(
            f"{describe_source(source)}: no usable {kind} ({report.summary()}); check the file and its format",
            location=describe_source(source),
            reason="no records",
        )
    return items, report


def _detect(rec: dict, loc: Loc, allowed: tuple[str, ...], kind: str) -> str:
    fmt = detect(rec)
    if fmt in allowed:
        return fmt
    fields = ", ".join(sorted(map(str, rec))) or "none"
    if fmt == "meta":
        why = "it looks like a meta set (prompt + responses); load it as the meta set (load_meta, --meta-data)"
    elif fmt == "prompts":
        why = "it has a prompt but no responses"
    elif fmt is not None:
        why = f"it looks like {fmt!r} data, which cannot be loaded as {kind}"
    else:
        why = "no known format has these fields"
    raise DataError(
        f"{loc}: cannot tell the format from the record's fields ({fields}): {why}. Known formats: "
        f"{', '.join(allowed)}; name one with format=... (--data-format)",
        location=str(loc), reason="unknown format",
    )


def read_records(source: str, *, split: str = "train", max_records: int | None = None):
    """The raw records of a file or hub dataset as (location, dict) pairs, for readers of formats of
    their own (the RewardBench report). A record that is not a JSON object raises a DataError."""
    _check_args("error", max_records)
    _, records = _open_source(source, split)
    with closing(records):
        for n, (loc, rec) in enumerate(records, 1):
            if max_records is not None and n > max_records:
                break
            if isinstance(rec, DataError):
                raise rec
            if not isinstance(rec, dict):
                raise bad_record(str(loc), None, f"expected a JSON object, got {type(rec).__name__}", "non-object record")
            yield loc, rec


def load_pairs(source: str, *, format: str = "auto", split: str = "train", on_bad_record: str = "error",
               pku_preference: str = "better", max_records: int | None = None, oasst_lang: str | None = None,
               oasst_keep_flagged: bool = False, helpsteer3_margin: bool = False
               ) -> tuple[list[PreferencePair], LoadReport]:
    """Preference pairs from a file or hub dataset, and a report of what was read and skipped.

    format: "auto" (from the first record's fields) or one of explicit, hh-rlhf, summarize, pku,
    oasst. on_bad_record: "error" stops at the first bad record, "skip" counts it in the report.
    pku_preference: which PKU-SafeRLHF label makes the pair ("better" or "safer").
    max_records: read at most this many records (lines / rows) of the source.
    oasst_lang, oasst_keep_flagged: oasst1's filters (one language; keep deleted / failed-review rows).
    helpsteer3_margin: HelpSteer3's |overall_preference| as the pairs' margin.
    source: a path, a hub name, or records from Python (a list of dicts, a datasets.Dataset, a DataFrame).
    """
    return _load(source, "pairs", PAIR_FORMATS, format, split, on_bad_record, max_records, pku_preference,
                 oasst_lang=oasst_lang, oasst_keep_flagged=oasst_keep_flagged, helpsteer3_margin=helpsteer3_margin)


def load_meta(source: str, *, format: str = "auto", split: str = "train", on_bad_record: str = "error",
              max_records: int | None = None) -> tuple[list[MetaGroup], LoadReport]:
    """The meta set: {"prompt": str | messages, "responses": [k >= 1 strings]} records."""
    return _load(source, "groups", META_FORMATS, format, split, on_bad_record, max_records)


def _prompt_key(p: Prompt) -> object:
    return p if isinstance(p, str) else tuple((m["role"], m["content"]) for m in p)


def load_prompts(source: str, *, format: str = "auto", split: str = "train", on_bad_record: str = "error",
                 pku_preference: str = "better", max_records: int | None = None
                 ) -> tuple[list[Prompt], LoadReport]:
    """The prompts of any pair format, of a meta set, of {"prompt": ...} records, or of a .txt file
    with one prompt a line. Records are checked as in load_pairs / load_meta (a bad pair is a bad
    record here too). A prompt that occurs more than once is kept once, at its first place; the
    report counts the merged duplicates."""
    items, report = _load(source, "prompts", PROMPT_FORMATS, format, split, on_bad_record, max_records, pku_preference)
    seen: set = set()
    prompts: list[Prompt] = []
    for it in items:
        p = it.prompt if isinstance(it, (PreferencePair, MetaGroup, RankedGroup)) else it
        key = _prompt_key(p)
        if key not in seen:
            seen.add(key)
            prompts.append(p)
    report.duplicates = len(items) - len(prompts)
    report.loaded = len(prompts)
    return prompts, report
