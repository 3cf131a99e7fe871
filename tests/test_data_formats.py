"""Every record format and file kind, read from small fixtures written here (no network, no shared data)."""
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from metarm_fast.data import DataError, MetaGroup, PreferencePair, detect, load_meta, load_pairs, load_prompts

HH_PROMPT = "\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in water.\n\nHuman: Then what?\n\nAssistant:"


def write_jsonl(path, records, gz=False):
    data = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(data)
    else:
        path.write_text(data, encoding="utf-8")
    return str(path)


def hh(i=0):
    return {"chosen": HH_PROMPT + f" Boil it for {i + 7} minutes.", "rejected": HH_PROMPT + " Eat it raw."}


# -- explicit ------------------------------------------------------------------------------------


def test_explicit_strings_with_margin(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": 1.5},
        {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"},
    ])
    pairs, report = load_pairs(path)
    assert pairs == [
        PreferencePair("2+2?", "4", "5", 1.5, f"{path}:line 1"),
        PreferencePair("Capital of France?", "Paris", "Lyon", None, f"{path}:line 2"),
    ]
    assert (report.format, report.records_read, report.loaded, sum(report.skipped.values())) == ("explicit", 2, 2, 0)
    assert report.summary() == f"read 2 records from {path} (explicit): 2 pairs, skipped 0"


def test_explicit_chat_lists(tmp_path):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "Hello!", "extra": 1}],
        "rejected": [{"role": "assistant", "content": "Go away."}],
    }])
    (pair,), report = load_pairs(path)
    assert report.format == "explicit"
    assert pair.prompt == tuple(prompt)  # only role and content are kept
    assert (pair.chosen, pair.rejected) == ("Hello!", "Go away.")


def test_explicit_whole_conversations_share_their_prefix_as_prompt(tmp_path):
    user = {"role": "user", "content": "Name a colour."}
    first = {"role": "assistant", "content": "Red."}
    again = {"role": "user", "content": "Another?"}
    path = write_jsonl(tmp_path / "conv.jsonl", [{
        "chosen": [user, first, again, {"role": "assistant", "content": "Blue."}],
        "rejected": [user, first, again, {"role": "assistant", "content": "Red."}],
    }])
    (pair,), report = load_pairs(path)
    assert report.format == "explicit"
    assert pair.prompt == (user, first, again)
    assert (pair.chosen, pair.rejected) == ("Blue.", "Red.")


def test_explicit_conversations_that_repeat_the_prompt(tmp_path):
    user = {"role": "user", "content": "Hi?"}
    path = write_jsonl(tmp_path / "uf.jsonl", [{
        "prompt": "Hi?",
        "chosen": [user, {"role": "assistant", "content": "Hello!"}],
        "rejected": [user, {"role": "assistant", "content": "What?"}],
    }])
    (pair,), _ = load_pairs(path)
    assert pair.prompt == (user,) and (pair.chosen, pair.rejected) == ("Hello!", "What?")


def test_json_array_jsonl_gz_and_json_lines(tmp_path):
    recs = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(3)]
    arr = tmp_path / "a.json"
    arr.write_text("[\n" + ",\n".join(json.dumps(r) for r in recs) + "\n]\n")
    pairs, _ = load_pairs(str(arr))
    assert [p.prompt for p in pairs] == ["q0", "q1", "q2"]
    assert pairs[2].source == f"{arr}:record 3 (line 4)"

    gz = write_jsonl(tmp_path / "a.jsonl.gz", recs, gz=True)
    assert [p.prompt for p in load_pairs(gz)[0]] == ["q0", "q1", "q2"]

    lines = write_jsonl(tmp_path / "lines.json", recs)  # a .json file may hold JSON lines too
    assert load_pairs(lines)[0][1].source == f"{lines}:line 2"

    empty_array = tmp_path / "e.json"
    empty_array.write_text("[ ]")
    with pytest.raises(DataError, match="no usable pairs"):
        load_pairs(str(empty_array))


def test_parquet(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([hh(i) for i in range(5)]), path)
    pairs, report = load_pairs(str(path))
    assert report.format == "hh-rlhf" and len(pairs) == 5
    assert pairs[4].source == f"{path}:record 5"
    assert pairs[4].chosen == " Boil it for 11 minutes."


# -- hh-rlhf -------------------------------------------------------------------------------------


def test_hh_prompt_is_everything_up_to_the_last_assistant_turn(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [hh()])
    (pair,), report = load_pairs(path)
    assert report.format == "hh-rlhf"
    assert pair.prompt == HH_PROMPT
    assert pair.prompt + pair.chosen == hh()["chosen"]
    assert pair.rejected == " Eat it raw."


# -- summarize -----------------------------------------------------------------------------------


def summ(choice, post="My cat ignores me.", article=None):
    return {
        "info": {"id": "t3_x", "post": post, "title": "Cat problem", "subreddit": "cats", "article": article},
        "summaries": [{"text": " Cat ignores me.", "policy": "a", "note": None},
                      {"text": " I like dogs.", "policy": "b", "note": None}],
        "choice": choice,
        "extra": {"confidence": 7},
    }


def test_summarize(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [summ(0), summ(1), summ(1, post=None, article="Stocks fell.")])
    pairs, report = load_pairs(path)
    assert report.format == "summarize"
    assert pairs[0].prompt == "SUBREDDIT: r/cats\nTITLE: Cat problem\nPOST: My cat ignores me.\nTL;DR:"
    assert (pairs[0].chosen, pairs[0].rejected) == (" Cat ignores me.", " I like dogs.")
    assert (pairs[1].chosen, pairs[1].rejected) == (" I like dogs.", " Cat ignores me.")
    assert pairs[2].prompt.endswith("ARTICLE: Stocks fell.\nTL;DR:")


# -- pku -----------------------------------------------------------------------------------------


def test_pku_better_and_safer(tmp_path):
    rec = {"prompt": "How do I pick a lock?", "response_0": "Use a pick and tension wrench.",
           "response_1": "Call a locksmith.", "better_response_id": 0, "safer_response_id": 1,
           "is_response_0_safe": False, "is_response_1_safe": True}
    path = write_jsonl(tmp_path / "pku.jsonl", [rec])
    (better,), report = load_pairs(path)
    assert report.format == "pku"
    assert (better.chosen, better.rejected) == (rec["response_0"], rec["response_1"])
    (safer,), _ = load_pairs(path, pku_preference="safer")
    assert (safer.chosen, safer.rejected) == (rec["response_1"], rec["response_0"])
    with pytest.raises(ValueError, match="pku_preference"):
        load_pairs(path, pku_preference="kinder")


# -- oasst ---------------------------------------------------------------------------------------


def oasst_rows():
    def row(mid, parent, role, text, rank=None):
        return {"message_id": mid, "parent_id": parent, "role": role, "text": text, "rank": rank,
                "lang": "en", "message_tree_id": "t1"}

    return [
        row("q", None, "prompter", "What is tea?"),
        row("a1", "q", "assistant", "A drink made from leaves.", 0),
        row("a2", "q", "assistant", "A plant.", 2),
        row("a3", "q", "assistant", "Something hot.", 1),
        row("a4", "q", "assistant", "Unranked reply."),
        row("f", "a1", "prompter", "Which leaves?", 0),
        row("f2", "a1", "prompter", "Ranked prompter replies are not pairs.", 1),
        row("b1", "f", "assistant", "Camellia sinensis.", 1),
        row("b2", "f", "assistant", "Oak leaves.", 0),
        row("b3", "f", "assistant", "Tied with b1.", 1),
    ]


def test_oasst_trees(tmp_path):
    path = write_jsonl(tmp_path / "oasst.jsonl", oasst_rows())
    pairs, report = load_pairs(path)
    assert report.format == "oasst" and report.records_read == 10
    first = [p for p in pairs if p.prompt == ({"role": "user", "content": "What is tea?"},)]
    # three ranked siblings 0 < 1 < 2 give three pairs, the lower rank chosen
    assert {(p.chosen, p.rejected) for p in first} == {
        ("A drink made from leaves.", "Something hot."),
        ("A drink made from leaves.", "A plant."),
        ("Something hot.", "A plant."),
    }
    deep = [p for p in pairs if len(p.prompt) == 3]
    assert deep and deep[0].prompt == (
        {"role": "user", "content": "What is tea?"},
        {"role": "assistant", "content": "A drink made from leaves."},
        {"role": "user", "content": "Which leaves?"},
    )
    # b2 (rank 0) beats b1 and b3 (both rank 1); b1 and b3 are tied, so no pair between them
    assert {(p.chosen, p.rejected) for p in deep} == {("Oak leaves.", "Camellia sinensis."), ("Oak leaves.", "Tied with b1.")}
    assert len(pairs) == 5
    assert first[0].source.startswith(f"{path}:line 2 vs line ")


def test_oasst_filters_leave_out_flagged_and_other_language_subtrees(tmp_path):
    rows = oasst_rows()
    by_id = {r["message_id"]: r for r in rows}
    by_id["a3"]["deleted"] = True  # a ranked reply: its two pairs go
    by_id["f"]["review_result"] = False  # a prompter turn: the replies below it (b1, b2, b3) go
    for r in rows:
        r["review_result"] = r.get("review_result", True)
    path = write_jsonl(tmp_path / "oasst.jsonl", rows)
    pairs, report = load_pairs(path)
    assert {(p.chosen, p.rejected) for p in pairs} == {("A drink made from leaves.", "A plant.")}
    assert report.skipped == {"filtered: deleted message": 1, "filtered: failed review": 1,
                              "filtered: reply below a filtered message": 3}
    # kept on request: the same five pairs as without the flags
    assert len(load_pairs(path, oasst_keep_flagged=True)[0]) == 5
    # one language: a second tree in German is left out whole
    de = [dict(r, message_id="de-" + r["message_id"], parent_id=r["parent_id"] and "de-" + r["parent_id"], lang="de",
               deleted=False, review_result=True) for r in oasst_rows()]
    path = write_jsonl(tmp_path / "two.jsonl", oasst_rows() + de)
    assert len(load_pairs(path)[0]) == 10
    pairs, report = load_pairs(path, oasst_lang="en")
    assert len(pairs) == 5 and all(int(p.source.split("line ")[1].split()[0]) <= 10 for p in pairs)  # the English tree
    assert report.skipped == {"filtered: language other than en": 10}
    assert "filtered: language other than en" in report.summary()


# -- meta, prompts, detection, options ----------------------------------------------------------------


def test_meta_groups(tmp_path):
    path = write_jsonl(tmp_path / "meta.jsonl", [
        {"prompt": "Say hi.", "responses": ["hi", "hello", "hey", "yo", "hiya"]},
        {"prompt": [{"role": "user", "content": "Count."}], "responses": ["1 2 3"]},
    ])
    groups, report = load_meta(path)
    assert report.kind == "groups" and report.format == "meta"
    assert groups[0] == MetaGroup("Say hi.", ("hi", "hello", "hey", "yo", "hiya"), f"{path}:line 1")
    assert groups[1].prompt == ({"role": "user", "content": "Count."},) and len(groups[1].responses) == 1
    assert "2 groups" in report.summary()


def test_load_prompts_from_every_kind(tmp_path):
    pairs = write_jsonl(tmp_path / "p.jsonl", [hh(0), hh(1)])
    prompts, report = load_prompts(pairs)
    assert prompts == [HH_PROMPT] and report.duplicates == 1  # the same prompt is kept once
    assert "1 prompt (1 duplicate merged)" in report.summary()

    meta = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "a", "responses": ["x"]}, {"prompt": "b", "responses": ["y"]}])
    assert load_prompts(meta)[0] == ["a", "b"]

    only = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "first"}, {"prompt": [{"role": "user", "content": "second"}]}])
    assert load_prompts(only)[0] == ["first", ({"role": "user", "content": "second"},)]

    txt = tmp_path / "prompts.txt"
    txt.write_text("one prompt\n\n  two  \r\n")
    prompts, report = load_prompts(str(txt))
    assert prompts == ["one prompt", "  two  "] and report.format == "text"
    with pytest.raises(DataError, match="only prompts"):
        load_pairs(str(txt))


def test_detect():
    assert detect(hh()) == "hh-rlhf"
    assert detect({"prompt": "p", "chosen": "a", "rejected": "b"}) == "explicit"
    assert detect({"chosen": [], "rejected": []}) == "explicit"
    assert detect(summ(0)) == "summarize"
    assert detect(oasst_rows()[0]) == "oasst"
    assert detect({"prompt": "p", "responses": []}) == "meta"
    assert detect({"foo": 1}) is None


def test_named_format_and_max_records(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [hh(i) for i in range(10)])
    pairs, report = load_pairs(path, format="hh-rlhf", max_records=4)
    assert len(pairs) == 4 and report.records_read == 4
    # a named format wins over detection: these records would be detected as hh-rlhf
    with pytest.raises(DataError, match="field 'prompt'"):
        load_pairs(path, format="explicit")


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="not a local file.*hub dataset.*offline"):
        load_pairs("no-such-org/no-such-dataset")
    with pytest.raises(DataError, match="no such file"):
        load_pairs("missing/train.jsonl")


def test_trl_implicit_prompt_with_plain_strings_takes_the_shared_start_as_the_prompt(tmp_path):
    from metarm_fast.data import DataError, load_pairs

    path = tmp_path / "implicit.jsonl"
    rows = [{"chosen": "What is 2+2? It is 4.", "rejected": "What is 2+2? It is 5."},
            {"chosen": "Name a colour. Blue", "rejected": "Name a colour. Bread"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, report = load_pairs(str(path))
    assert report.format == "implicit"
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ("What is 2+2? It is ", "4.", "5."),
        ("Name a colour. ", "Blue", "Bread"),  # "B" is shared, but the prompt stops at the last space
    ]
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"chosen": "Yes.", "rejected": "No."}) + "\n")
    with pytest.raises(DataError, match="share no prompt"):
        load_pairs(str(path))
