"""Encoding (plain text and chat template), truncation, and collation with left and right padding.

The tokenizer is built offline: a byte-level BPE with no merges, so every byte of text is one token
and lengths are easy to reason about."""
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2Model, PreTrainedTokenizerFast

from metarm_fast.data import EncodedSeq, Encoder, MetaGroup, PreferencePair, collate, hh_to_messages

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def byte_tokenizer(**specials):
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer(bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# -- plain text -----------------------------------------------------------------------------------


def test_plain_text_adds_bos_and_eos(tok):
    enc = Encoder(tok, 512)
    assert not enc.use_template
    c, r = enc.encode_pair(PreferencePair("\n\nHuman: Hi\n\nAssistant:", " Hello!", " Go."))
    assert c.prompt_ids == r.prompt_ids == [tok.bos_token_id] + ids(tok, "\n\nHuman: Hi\n\nAssistant:")
    assert c.response_ids == ids(tok, " Hello!") + [tok.eos_token_id]
    assert r.response_ids == ids(tok, " Go.") + [tok.eos_token_id]
    assert (enc.truncated, enc.encoded) == (0, 1)


def test_bos_eos_fall_back_to_cls_sep_or_nothing():
    bert_like = byte_tokenizer(cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]")
    c, _ = Encoder(bert_like, 64).encode_pair(PreferencePair("q", "a", "b"))
    assert c.prompt_ids[0] == bert_like.cls_token_id and c.response_ids[-1] == bert_like.sep_token_id
    bare = byte_tokenizer()
    c, _ = Encoder(bare, 64).encode_pair(PreferencePair("q", "a", "b"))
    assert (c.prompt_ids, c.response_ids) == (ids(bare, "q"), ids(bare, "a"))


def test_chat_prompt_without_template_is_written_hh_style(tok):
    msgs = ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes?"}, {"role": "user", "content": "Bye"})
    c, _ = Encoder(tok, 512).encode_pair(PreferencePair(msgs, "Ciao", "No"))
    assert tok.decode(c.prompt_ids) == "<s>\n\nHuman: Hi\n\nAssistant: Yes?\n\nHuman: Bye\n\nAssistant:"
    assert tok.decode(c.response_ids) == " Ciao</s>"


# -- truncation ---------------------------------------------------------------------------------------


def test_truncation_cuts_the_prompt_from_the_left_and_shares_it(tok):
    enc = Encoder(tok, 15)
    prompt = "0123456789abcdefghij"  # 20 tokens
    c, r = enc.encode_pair(PreferencePair(prompt, "ABCDE", "VWXYZabc"))  # 6 and 9 tokens with eos
    # the longest response (9) leaves 15 - 1 (bos) - 9 = 5 prompt tokens: the prompt's last five
    assert c.prompt_ids == r.prompt_ids == [tok.bos_token_id] + ids(tok, "fghij")
    assert c.response_ids == ids(tok, "ABCDE") + [tok.eos_token_id]
    assert r.response_ids == ids(tok, "VWXYZabc") + [tok.eos_token_id]
    assert (len(c), len(r)) == (12, 15)
    assert enc.truncated == 1 and enc.prompt_lost == 0  # part of the prompt survives
    enc.encode_pair(PreferencePair("short", "a", "b"))
    assert (enc.truncated, enc.encoded) == (1, 2)


def test_a_response_alone_too_long_keeps_its_end(tok):
    enc = Encoder(tok, 10)
    c, r = enc.encode_pair(PreferencePair("prompt", "the quick brown fox", "ok"))
    assert c.prompt_ids == r.prompt_ids == [tok.bos_token_id]  # the leading BOS survives
    assert c.response_ids == ids(tok, "rown fox") + [tok.eos_token_id]  # 9 tokens: the end survives
    assert r.response_ids == ids(tok, "ok") + [tok.eos_token_id]
    assert len(c) == 10 and enc.truncated == 1
    assert enc.prompt_lost == 1  # counted apart: this pair is rewarded with no prompt at all


def test_group_truncation(tok):
    enc = Encoder(tok, 8)
    seqs = enc.encode_group(MetaGroup("abcdefgh", ("x", "yyy", "zz")))
    assert all(s.prompt_ids == [tok.bos_token_id] + ids(tok, "fgh") for s in seqs)  # 8 - 1 - 4 = 3 kept
    assert [len(s) for s in seqs] == [6, 8, 7] and enc.truncated == 1


def test_bad_settings(tok):
    with pytest.raises(ValueError, match="chat_template"):
        Encoder(tok, 16, chat_template="sometimes")
    with pytest.raises(ValueError, match="max_length"):
        Encoder(tok, 1)
    with pytest.raises(ValueError, match="has no chat template"):
        Encoder(tok, 16, chat_template="always")


# -- chat template -----------------------------------------------------------------------------------


def test_chat_template(tok):
    tmpl = byte_tokenizer(bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tmpl.chat_template = TEMPLATE
    enc = Encoder(tmpl, 512)
    assert enc.use_template
    c, r = enc.encode_pair(PreferencePair("\n\nHuman: Hi\n\nAssistant: Yes?\n\nHuman: Bye\n\nAssistant:", " Ciao", " No"))
    assert tmpl.decode(c.prompt_ids) == "<s><|user|>Hi</s><|assistant|>Yes?</s><|user|>Bye</s><|assistant|>"
    assert c.prompt_ids[0] == tmpl.bos_token_id
    assert tmpl.decode(c.response_ids) == "Ciao</s>" and c.response_ids[-1] == tmpl.eos_token_id
    assert tmpl.decode(r.response_ids) == "No</s>"

    msgs = ({"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"})
    c, _ = enc.encode_pair(PreferencePair(msgs, "Hello", "Bye"))
    assert tmpl.decode(c.prompt_ids) == "<s><|system|>Be kind.</s><|user|>Hi</s><|assistant|>"

    # truncation keeps the template's leading BOS and the response's end
    short = Encoder(tmpl, 12)
    c, _ = short.encode_pair(PreferencePair("Tell me a long story please", "Once upon a time", "No"))
    assert c.prompt_ids == [tmpl.bos_token_id] and tmpl.decode(c.response_ids).endswith("a time</s>")
    assert len(c) == 12 and short.truncated == 1

    plain = Encoder(tmpl, 512, chat_template="never")
    c, _ = plain.encode_pair(PreferencePair("Q", "A", "B"))
    assert tmpl.decode(c.prompt_ids) == "<s>Q"


def test_template_whose_prompt_is_not_a_prefix_is_a_clear_error():
    bad = byte_tokenizer(bos_token="<s>", eos_token="</s>")
    bad.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]\n{% endif %}"
    )
    with pytest.raises(ValueError, match=r"x\.jsonl:line 4: the chat template.*not a prefix.*chat_template='never'"):
        Encoder(bad, 64).encode_pair(PreferencePair("Q", "A", "B", source="x.jsonl:line 4"))


def test_hh_to_messages():
    assert hh_to_messages("\n\nHuman: a\n\nAssistant: b\n\nAssistant: c\n\nHuman: d\n\nAssistant:") == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b\n\nc"},  # consecutive turns of one role are merged
        {"role": "user", "content": "d"},
    ]
    assert hh_to_messages("Just a question") == [{"role": "user", "content": "Just a question"}]


# -- collate --------------------------------------------------------------------------------------------


SEQS = [EncodedSeq([1, 2], [3]), EncodedSeq([1, 4, 5], [6, 7])]


def test_collate_right_padding():
    b = collate(SEQS, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 0, 0], [1, 4, 5, 6, 7]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 0], [0, 1, 2, 3, 4]]
    assert b["last_index"].tolist() == [2, 4]
    assert all(t.dtype == torch.long for t in b.values())


def test_collate_left_padding():
    b = collate(SEQS, pad_id=9, padding_side="left")
    assert b["input_ids"].tolist() == [[9, 9, 1, 2, 3], [1, 4, 5, 6, 7]]
    assert b["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert b["position_ids"].tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert b["last_index"].tolist() == [4, 4]
    with pytest.raises(ValueError, match="padding_side"):
        collate(SEQS, 0, padding_side="middle")
    with pytest.raises(ValueError, match="at least one"):
        collate([], 0)


def test_reward_position_is_the_same_with_left_and_right_padding(tok):
    """pad == eos, the case where looking for the last non-pad id reads one token early: gathering by
    position gives, for a real model, the same last hidden state padded either way and alone.
    GPT-2 rather than Llama: its absolute position embeddings make wrong position_ids under left
    padding visible (without them the left-padded row differs by ~2 here), while RoPE is relative,
    so a constant position offset cancels out."""
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=64,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = GPT2Model(cfg).eval()
    enc = Encoder(tok, 32)
    seqs = list(enc.encode_pair(PreferencePair("Hello there", " Hi", " A much longer answer")))
    pad = tok.eos_token_id

    def last_states(batch):
        with torch.no_grad():
            h = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      position_ids=batch["position_ids"]).last_hidden_state  # (B, T, H)
        return h[torch.arange(h.shape[0]), batch["last_index"]]  # (B, H)

    right = collate(seqs, pad, "right")
    left = collate(seqs, pad, "left")
    assert right["input_ids"][0, right["last_index"][0]] == tok.eos_token_id
    alone = torch.cat([last_states(collate([s], pad)) for s in seqs])
    torch.testing.assert_close(last_states(right), alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last_states(left), alone, atol=1e-5, rtol=1e-5)
