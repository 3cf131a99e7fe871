"""Each kind of bad input, in both modes: "error" stops with a message that names the file, the line
(or record) and the field; "skip" loads the rest and counts the reason. Nothing is dropped silently."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from metarm_fast.data import DataError, load_meta, load_pairs

T = "\n\nHuman: Hi\n\nAssistant:"
GOOD = {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}
GOOD_HH = {"chosen": T + " Hello!", "rejected": T + " Go away."}
GOOD_META = {"prompt": "Hi", "responses": ["a", "b"]}

# (id, loader, good record, bad record as written on its line, field named, reason counted)
CASES = [
    ("bad-json", load_pairs, GOOD, '{"prompt": "Hi", "chosen": "Hello!", ', None, "unreadable line"),
    ("not-an-object", load_pairs, GOOD, "[1, 2]", None, "non-object record"),
    ("missing-field", load_pairs, GOOD, {"prompt": "Hi", "chosen": "Hello!"}, "rejected", "missing field"),
    ("null-field", load_pairs, GOOD, {"prompt": "Hi", "chosen": None, "rejected": "x"}, "chosen", "missing field"),
    ("non-string", load_pairs, GOOD, {"prompt": "Hi", "chosen": 5, "rejected": "x"}, "chosen", "wrong-type field"),
    ("non-string-prompt", load_pairs, GOOD, {"prompt": 3.5, "chosen": "a", "rejected": "b"}, "prompt", "wrong-type field"),
    ("empty-response", load_pairs, GOOD, {"prompt": "Hi", "chosen": "Hello", "rejected": " \n\t"}, "rejected", "empty response"),
    ("identical", load_pairs, GOOD, {"prompt": "Hi", "chosen": "Same.", "rejected": " Same. "}, "rejected", "identical responses"),
    ("bad-margin", load_pairs, GOOD, {**GOOD, "margin": "big"}, "margin", "wrong-type field"),
    ("bad-message", load_pairs, GOOD,
     {"prompt": [{"role": "user"}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "prompt[0].content", "missing field"),
    ("hh-no-assistant", load_pairs, GOOD_HH, {"chosen": "\n\nHuman: Hi there", "rejected": T + " Go."}, "chosen",
     "missing assistant turn"),
    ("hh-prompt-mismatch", load_pairs, GOOD_HH, {"chosen": T + " Hello!", "rejected": "\n\nHuman: Bye\n\nAssistant: Go."},
     "rejected", "prompt mismatch"),
    ("hh-empty", load_pairs, GOOD_HH, {"chosen": T + " ", "rejected": T + " Go."}, "chosen", "empty response"),
    ("hh-identical", load_pairs, GOOD_HH, {"chosen": T + " Go.", "rejected": T + " Go."}, "rejected", "identical responses"),
    ("pku-bad-id", load_pairs, {"prompt": "p", "response_0": "a", "response_1": "b", "better_response_id": 1},
     {"prompt": "p", "response_0": "a", "response_1": "b", "better_response_id": 2}, "better_response_id", "bad value"),
    ("summarize-bad-choice", load_pairs,
     {"info": {"post": "x"}, "summaries": [{"text": "a"}, {"text": "b"}], "choice": 0},
     {"info": {"post": "x"}, "summaries": [{"text": "a"}, {"text": "b"}], "choice": "first"}, "choice", "wrong-type field"),
    ("meta-no-responses", load_meta, GOOD_META, {"prompt": "Hi", "responses": []}, "responses", "empty response list"),
    ("meta-empty-response", load_meta, GOOD_META, {"prompt": "Hi", "responses": ["ok", ""]}, "responses[1]", "empty response"),
    ("meta-non-string", load_meta, GOOD_META, {"prompt": "Hi", "responses": ["ok", 7]}, "responses[1]", "wrong-type field"),
    ("meta-not-a-list", load_meta, GOOD_META, {"prompt": "Hi", "responses": "ok"}, "responses", "wrong-type field"),
]


def write(tmp_path, good, bad, bad_line=3, n=5):
    lines = [bad if i == bad_line else good for i in range(1, n + 1)]
    path = tmp_path / "data.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


@pytest.mark.parametrize("loader, good, bad, field, reason", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_record_stops_with_a_message_naming_file_line_and_field(tmp_path, loader, good, bad, field, reason):
    path = write(tmp_path, good, bad)
    with pytest.raises(DataError) as e:
        loader(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:line 3")
    if field is not None:
        assert f"field '{field}'" in msg and e.value.field == field
    assert "on_bad_record='skip'" in msg  # says what to do
    assert e.value.reason == reason


@pytest.mark.parametrize("loader, good, bad, field, reason", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_record_is_skipped_and_counted(tmp_path, loader, good, bad, field, reason):
    path = write(tmp_path, good, bad)
    items, report = loader(path, on_bad_record="skip")
    assert len(items) == 4 and report.records_read == 5 and report.loaded == 4
    assert dict(report.skipped) == {reason: 1}
    assert report.summary().endswith(f"skipped 1 (1 {reason})")


def test_parquet_and_json_array_name_the_record(tmp_path):
    rows = [GOOD, GOOD, {"prompt": "Hi", "chosen": "", "rejected": "b"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet")
    with pytest.raises(DataError, match=r"x\.parquet:record 3: field 'chosen': the response is empty"):
        load_pairs(str(tmp_path / "x.parquet"))
    arr = tmp_path / "x.json"
    arr.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "]")
    with pytest.raises(DataError, match=r"x\.json:record 3 \(line 4\): field 'chosen'"):
        load_pairs(str(arr))
    assert load_pairs(str(arr), on_bad_record="skip")[1].skipped == {"empty response": 1}


def test_broken_json_array_stops_even_when_skipping(tmp_path):
    arr = tmp_path / "x.json"
    arr.write_text('[\n{"prompt": "a", "chosen": "b", "rejected": "c"},\n{"prompt": oops}\n]')
    with pytest.raises(DataError, match=r"x\.json:line 3: not valid JSON.*cannot be read past"):
        load_pairs(str(arr), on_bad_record="skip")


def test_unknown_format_always_stops(tmp_path):
    path = write(tmp_path, {"question": "q", "answer": "a"}, {"question": "q", "answer": "a"})
    for mode in ("error", "skip"):
        with pytest.raises(DataError, match=r"data\.jsonl:line 1: cannot tell the format.*answer, question.*--data-format"):
            load_pairs(path, on_bad_record=mode)
    with pytest.raises(DataError, match="meta set"):
        load_pairs(write(tmp_path, GOOD_META, GOOD_META))
    with pytest.raises(DataError, match="format 'meta' cannot be read here"):
        load_pairs(write(tmp_path, GOOD, GOOD), format="meta")


def test_nothing_usable_is_an_error_naming_the_file(tmp_path):
    path = write(tmp_path, {"prompt": "p", "chosen": "x", "rejected": "x"}, "{broken")
    with pytest.raises(DataError, match=r"data\.jsonl: no usable pairs .*skipped 5 \(4 identical responses, 1 unreadable line\)"):
        load_pairs(path, on_bad_record="skip")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl: no usable pairs"):
        load_pairs(str(empty))


def test_oasst_bad_trees(tmp_path):
    def row(mid, parent, role, text, rank=None):
        return {"message_id": mid, "parent_id": parent, "role": role, "text": text, "rank": rank}

    rows = [
        row("q", None, "prompter", "Q?"),
        row("a", "q", "assistant", "Same.", 0),
        row("b", "q", "assistant", "Same.", 1),
        row("c", "q", "assistant", " ", 2),  # an empty ranked reply
        row("d", "q", "assistant", "Fine.", 3),
        row("x", "gone", "assistant", "Orphan.", 0),
        row("y", "gone", "assistant", "Orphan 2.", 1),
    ]
    path = tmp_path / "o.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"o\.jsonl:line 4: field 'text': the response is empty"):
        load_pairs(str(path))
    pairs, report = load_pairs(str(path), on_bad_record="skip")
    assert dict(report.skipped) == {"empty response": 1, "identical responses": 1, "missing parent": 1}
    # a-d and b-d; a-b are identical, c is empty, x and y have no parent
    assert [(p.chosen, p.rejected) for p in pairs] == [("Same.", "Fine."), ("Same.", "Fine.")]
    rows[3]["text"] = "Fixed."
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"o\.jsonl:line 2 vs line 3: field 'text': two replies ranked 0 and 1 are identical"):
        load_pairs(str(path))


def test_bad_arguments(tmp_path):
    path = write(tmp_path, GOOD, GOOD)
    with pytest.raises(ValueError, match="on_bad_record"):
        load_pairs(path, on_bad_record="ignore")
    with pytest.raises(ValueError, match="max_records"):
        load_pairs(path, max_records=0)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_pairs(str(tmp_path / "x.csv"))
