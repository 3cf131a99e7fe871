"""`metarm-fast sample`: a meta set sampled from a tiny random Llama policy, built and saved offline."""
from __future__ import annotations

import json
import os

import pytest
import torch

from metarm_fast.cli import build_parser, main
from metarm_fast.data import load_meta
from metarm_fast.sample import render_prompt, sample_meta_set
from metarm_fast.synthetic import SyntheticTask

PROMPTS = [
    "w01 w02 w03 w04",
    "w10 w11 w12 w13 w14 w15 w16 w17",
    [{"role": "user", "content": "w20 w21"}, {"role": "assistant", "content": "w22"}, {"role": "user", "content": "w23"}],
    "w30",
    "w40 w41 w42",
]


def _save_policy(path, *, suppress: str) -> str:
    """A random 1-layer Llama over the synthetic task's word vocabulary, saved with its tokenizer.

    suppress="specials": the generation config forbids every special token, so responses are never
    empty (6 words each). suppress="all-but-eos": only </s> may be sampled, so every response is empty.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = SyntheticTask(0).tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    specials = [tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id]
    if suppress == "specials":
        model.generation_config.suppress_tokens = specials
    else:
        model.generation_config.suppress_tokens = [i for i in range(len(tok)) if i != tok.eos_token_id]
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return _save_policy(tmp_path_factory.mktemp("policy"), suppress="specials")


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("prompts")
    jsonl = d / "prompts.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    txt = d / "prompts.txt"
    txt.write_text("w01 w02\n\nw03 w04 w05\nw06\n")
    return str(jsonl), str(txt)


def _args(policy, prompts, out, *extra) -> list[str]:
    return ["sample", "--policy", policy, "--prompts", prompts, "--out", str(out), "--k", "3",
            "--max-new-tokens", "6", "--batch-size", "2", *map(str, extra)]


def _read(path) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def test_sample_writes_k_responses_per_prompt_and_loads_as_meta_set(policy, prompt_files, tmp_path, capsys):
    out = tmp_path / "new_dir" / "meta.jsonl"  # the directory does not exist yet
    ns = build_parser().parse_args(_args(policy, prompt_files[0], out))
    summary = sample_meta_set(ns)

    rows = _read(out)
    assert [r["prompt"] for r in rows] == PROMPTS  # file order, chat prompts kept as message lists
    assert all(len(r["responses"]) == 3 for r in rows)
    for r in rows:
        for resp in r["responses"]:
            words = resp.split()
            assert len(words) == 6 and all(w.startswith("w") for w in words), resp  # new tokens only
    assert not os.path.exists(str(out) + ".partial")
    assert summary["prompts"] == 5 and summary["k"] == 3 and summary["responses"] == 15
    assert summary["empty"] == 0 and summary["truncated_prompts"] == 0
    printed = capsys.readouterr().out
    assert "5 prompts x k=3 -> 15 responses (0 empty)" in printed

    groups, report = load_meta(str(out))
    assert len(groups) == 5 and report.loaded == 5
    assert [len(g.responses) for g in groups] == [3] * 5


def test_same_seed_repeats_exactly_and_another_seed_differs(policy, prompt_files, tmp_path):
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    assert main(_args(policy, prompt_files[0], a, "--seed", 7)) == 0
    assert main(_args(policy, prompt_files[0], b, "--seed", 7)) == 0
    assert main(_args(policy, prompt_files[0], c, "--seed", 8)) == 0
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    # prompts are the same, only the responses differ
    assert [r["prompt"] for r in _read(a)] == [r["prompt"] for r in _read(c)]


def test_txt_prompts_max_prompts_and_left_truncation(policy, prompt_files, tmp_path):
    out = tmp_path / "meta.jsonl"
    ns = build_parser().parse_args(_args(policy, prompt_files[1], out, "--max-prompts", 2,
                                         "--max-prompt-length", 2, "--k", 2))
    summary = sample_meta_set(ns)
    rows = _read(out)
    assert [r["prompt"] for r in rows] == ["w01 w02", "w03 w04 w05"]  # the blank line is not a prompt
    assert all(len(r["responses"]) == 2 for r in rows)
    assert summary["truncated_prompts"] == 1  # "w03 w04 w05" is 3 tokens


def test_empty_responses_are_written_and_reported(tmp_path, prompt_files, capsys):
    policy = _save_policy(tmp_path / "eos_policy", suppress="all-but-eos")
    out = tmp_path / "meta.jsonl"
    ns = build_parser().parse_args(_args(policy, prompt_files[0], out))
    summary = sample_meta_set(ns)
    rows = _read(out)
    assert len(rows) == 5 and all(r["responses"] == ["", "", ""] for r in rows)
    assert summary["empty"] == 15 and summary["empty_prompts"] == 5
    err = capsys.readouterr().err
    assert "15 of 15 responses are empty" in err and "--on-bad-record skip" in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--k", 0), "--k must be at least 1"),
        (("--temperature", 0), "--temperature must be > 0"),
        (("--top-p", 1.5), "--top-p must be in (0, 1]"),
        (("--top-p", 0), "--top-p must be in (0, 1]"),
        (("--max-new-tokens", 0), "--max-new-tokens must be at least 1"),
    ],
)
def test_bad_settings_exit_2_with_a_clear_message(policy, prompt_files, tmp_path, capsys, extra, message):
    out = tmp_path / "meta.jsonl"
    assert main(_args(policy, prompt_files[0], out, *extra)) == 2
    err = capsys.readouterr().err
    assert "metarm-fast sample: error:" in err and message in err
    assert not out.exists()


def test_missing_policy_or_prompts_exit_2(policy, prompt_files, tmp_path, capsys):
    out = tmp_path / "meta.jsonl"
    assert main(_args(str(tmp_path / "no_such_policy"), prompt_files[0], out)) == 2
    assert "--policy" in capsys.readouterr().err
    assert main(_args(policy, str(tmp_path / "missing.jsonl"), out)) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert main(_args(policy, prompt_files[0], tmp_path)) == 2  # --out is a directory
    assert "not a directory" in capsys.readouterr().err
    assert not out.exists()


def test_a_failed_run_leaves_the_old_file_alone(policy, prompt_files, tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    out = tmp_path / "meta.jsonl"
    out.write_text("old\n")

    def boom(self, *a, **kw):
        raise RuntimeError("generation failed")

    monkeypatch.setattr(LlamaForCausalLM, "generate", boom)
    with pytest.raises(RuntimeError, match="generation failed"):
        main(_args(policy, prompt_files[0], out))
    assert out.read_text() == "old\n"
    assert not os.path.exists(str(out) + ".partial")


def test_render_prompt_chat_template_and_hh_fallback():
    tok = SyntheticTask(0).tokenizer()
    msgs = ({"role": "user", "content": "w01"}, {"role": "assistant", "content": "w02"}, {"role": "user", "content": "w03"})
    assert render_prompt(tok, "w05 w06") == ("w05 w06", True)
    assert render_prompt(tok, msgs) == ("\n\nHuman: w01\n\nAssistant: w02\n\nHuman: w03\n\nAssistant:", True)
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    assert render_prompt(tok, msgs) == ("<user>w01<assistant>w02<user>w03<assistant>", False)
    # A text prompt goes through the template as the trainer's encoder sends it (one user turn, or
    # the turns of an HH transcript), so the policy sees what the reward model will score.
    assert render_prompt(tok, "w05 w06") == ("<user>w05 w06<assistant>", False)
    assert render_prompt(tok, "\n\nHuman: w01\n\nAssistant:") == ("<user>w01<assistant>", False)
