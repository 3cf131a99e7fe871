"""bench.hh_shift's data split, on a fixture (the run itself needs the MiniLM package, which CI does
not install): single-turn pairs train, multi-turn ones are the other distribution, halves disjoint."""
import gzip
import json

from bench.hh_shift import SINGLE_HELD_OUT, split_records, write_files


def _hh(prompt_turns: int, i: int) -> dict:
    prompt = "".join(f"\n\nHuman: question {i}.{t}\n\nAssistant: answer {t}" for t in range(prompt_turns - 1))
    prompt += f"\n\nHuman: last question {i}\n\nAssistant:"
    return {"chosen": prompt + f" good {i}", "rejected": prompt + f" bad {i}"}


def _read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_split_trains_on_single_turn_and_shifts_to_multi_turn(tmp_path):
    recs = [_hh(1, i) for i in range(SINGLE_HELD_OUT + 7)] + [_hh(2 + i % 2, i) for i in range(9)]
    recs.append({"chosen": "\n\nHuman: x\n\nAssistant: ", "rejected": "\n\nHuman: x\n\nAssistant: no"})  # empty
    src = tmp_path / "hh.jsonl.gz"
    with gzip.open(src, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    split = split_records(str(src))
    assert len(split["single"]) == SINGLE_HELD_OUT + 7 and len(split["multi"]) == 9  # the empty one dropped
    paths = write_files(split, str(tmp_path))
    train, held, meta, shifted = (_read(paths[k]) for k in ("train", "single_eval", "meta", "multi_eval"))
    assert len(train) == 7 and len(held) == SINGLE_HELD_OUT and len(meta) == 4 and len(shifted) == 5
    assert all(r["prompt"].count("Human:") == 1 for r in train + held)
    assert all(r["prompt"].count("Human:") >= 2 for r in meta + shifted)
    assert all(set(m) == {"prompt", "responses"} and len(m["responses"]) == 2 for m in meta)  # no labels
    assert not {m["prompt"] for m in meta} & {r["prompt"] for r in shifted}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
