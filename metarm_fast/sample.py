"""`metarm-fast sample`: build a meta set by sampling k responses per prompt from a causal LM policy.

The meta set S of MetaRM is a prompt and k unlabelled responses drawn from the current policy
(re-sampled before each RLHF round; the paper samples somewhat hotter than PPO, which uses
temperature 0.8, top-p 0.9, repetition penalty 1.1, at most 512 new tokens).

What this does, in order:
1. checks the settings (k >= 1, temperature > 0, 0 < top-p <= 1, ...), raising ValueError;
2. reads the prompts with ``metarm_fast.data.load_prompts`` (any pair or meta file gives its
   prompts; a .txt file gives one prompt a line; repeated prompts are kept once);
3. loads the policy (``AutoTokenizer`` + ``AutoModelForCausalLM``, from a directory or a hub name)
   on the GPU when there is one (bf16 when the GPU supports it, else fp32), fp32 on the CPU;
4. renders each prompt: chat messages go through the tokenizer's chat template (with the generation
   prompt) when it has one, else become an HH transcript "\\n\\nHuman: ...\\n\\nAssistant:"; plain
   text prompts are tokenized as they are, with the tokenizer's usual special tokens;
5. truncates prompts longer than --max-prompt-length from the left (a leading BOS is kept), groups
   them into batches of --batch-size prompts (longest first, to waste little padding and to hit an
   out-of-memory early), pads each batch on the left and calls ``generate`` with do_sample=True and
   num_return_sequences=k. top-k is switched off (top_k=0): the flags say the whole sampling
   distribution, and transformers would otherwise add its default top-k of 50. Other settings of the
   checkpoint's generation_config.json (eos ids, suppressed tokens, ...) are kept;
6. decodes the new tokens only, up to the first end-of-sequence token, without special tokens,
   stripped; writes one JSON line per prompt, in the order of the prompt file,
   ``{"prompt": <as given: a string or a list of messages>, "responses": [k strings]}``
   to ``out + ".partial"`` and renames it onto ``out``, so that ``out`` is either the old file or
   the whole new one.

The random stream is seeded once with ``torch.manual_seed(seed)`` before the first batch, so on
the CPU the same seed, prompts, batch size and model give the same file byte for byte (on a GPU,
kernels may not be deterministic).

Empty responses (the policy stopped at once) are written as they are and counted: a meta set
loader rejects a group with an empty response, so the command warns, and training with
``--on-bad-record skip`` skips those groups.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

__all__ = ["sample_meta_set", "render_prompt"]


# -- settings ------------------------------------------------------------------------------------


def _check_settings(ns) -> None:
    problems = []
    if ns.k < 1:
        problems.append(f"--k must be at least 1, got {ns.k}")
    if not ns.temperature > 0:  # also catches nan
        problems.append(f"--temperature must be > 0 (sampling at temperature 0 is greedy decoding), got {ns.temperature}")
    if not 0 < ns.top_p <= 1:
        problems.append(f"--top-p must be in (0, 1], got {ns.top_p}")
    if not ns.repetition_penalty > 0:
        problems.append(f"--repetition-penalty must be > 0 (1.0 means none), got {ns.repetition_penalty}")
    if ns.max_new_tokens < 1:
        problems.append(f"--max-new-tokens must be at least 1, got {ns.max_new_tokens}")
    if ns.batch_size < 1:
        problems.append(f"--batch-size must be at least 1, got {ns.batch_size}")
    if ns.max_prompt_length < 1:
        problems.append(f"--max-prompt-length must be at least 1, got {ns.max_prompt_length}")
    if ns.max_prompts is not None and ns.max_prompts < 1:
        problems.append(f"--max-prompts must be at least 1, got {ns.max_prompts}")
    if problems:
        raise ValueError("; ".join(problems))


def _prepare_out(out: str) -> str:
    """The absolute output path; its directory is created when missing."""
    if not out or out.endswith(("/", os.sep)) or os.path.isdir(out):
        raise ValueError(f"--out {out!r}: expected a file path (e.g. meta.jsonl), not a directory")
    path = os.path.abspath(os.path.expanduser(out))
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out!r}: cannot create the directory {parent} ({e.strerror or e})") from e
    if not os.access(parent, os.W_OK):
        raise ValueError(f"--out {out!r}: the directory {parent} is not writable")
    return path


# -- the policy ----------------------------------------------------------------------------------


def _device_and_dtype() -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.device("cuda"), dtype
    return torch.device("cpu"), torch.float32


def _load_policy(name: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = "directory" if os.path.isdir(os.path.expanduser(name)) else "name"
    try:
        tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(name))
        model, info = AutoModelForCausalLM.from_pretrained(
            os.path.expanduser(name), dtype=dtype, output_loading_info=True
        )
    except (OSError, ValueError, KeyError) as e:
        hint = "" if where == "directory" else (
            "; it is not a local directory, so it was looked up on the hub (offline users: pass the "
            "directory holding config.json, the weights and the tokenizer)"
        )
        raise ValueError(f"--policy {name}: cannot load a causal LM and its tokenizer ({e}){hint}") from e
    missing = list(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
        raise ValueError(
            f"--policy {name}: the checkpoint lacks {len(missing)} weight(s) of a causal LM ({shown}), which would "
            "be random; is it a reward-model (sequence classification) checkpoint rather than a policy?"
        )
    model.to(device)
    model.eval()
    return tokenizer, model


def _eos_ids(model, tokenizer) -> set[int]:
    ids = getattr(model.generation_config, "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return set()
    return {int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids])}


def _pad_id(model, tokenizer) -> int:
    """The id padding uses, for generation only: the tokenizer's pad, else eos, else 0 (masked anyway)."""
    for cand in (tokenizer.pad_token_id, getattr(model.generation_config, "pad_token_id", None), tokenizer.eos_token_id):
        if cand is not None:
            return int(cand)
    eos = _eos_ids(model, tokenizer)
    return min(eos) if eos else 0


# -- prompts -------------------------------------------------------------------------------------


def render_prompt(tokenizer, prompt) -> tuple[str, bool]:
    """(text, add_special_tokens) for one prompt.

    Chat messages use the tokenizer's chat template when it has one (its output already holds the
    special tokens it wants, so none are added), else an HH transcript ending with "Assistant:".
    Plain text is kept as it is and tokenized with the tokenizer's usual special tokens.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if isinstance(prompt, str) and not has_template:
        return prompt, True
    if isinstance(prompt, str):
        # As the trainer's encoder does: an HH transcript becomes chat messages for the template, so
        # the policy samples from the same prompt the reward model will score.
        from metarm_fast.data import hh_to_messages

        prompt = hh_to_messages(prompt)
    msgs = [{"role": m["role"], "content": m["content"]} for m in prompt]
    if has_template:
        try:
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja errors, e.g. templates that insist on alternating roles
            raise ValueError(f"the tokenizer's chat template failed on a prompt ({type(e).__name__}: {e})") from e
        return text, False
    from metarm_fast.data import messages_to_hh

    return messages_to_hh(msgs), True


def _encode(tokenizer, prompts, max_len: int) -> tuple[list[list[int]], int]:
    """Token ids per prompt, cut from the left to max_len (a leading BOS kept); and how many were cut."""
    bos = tokenizer.bos_token_id
    out, cut = [], 0
    for i, p in enumerate(prompts):
        text, special = render_prompt(tokenizer, p)
        ids = list(tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"])
        if not ids:
            raise ValueError(f"prompt {i + 1} encodes to no tokens ({str(p)[:60]!r})")
        if len(ids) > max_len:
            cut += 1
            if bos is not None and ids[0] == bos and max_len > 1:
                ids = [bos] + ids[len(ids) - (max_len - 1):]
            else:
                ids = ids[len(ids) - max_len:]
        out.append(ids)
    return out, cut


def _as_json_prompt(prompt):
    return prompt if isinstance(prompt, str) else [dict(m) for m in prompt]


# -- sampling ------------------------------------------------------------------------------------


def _decode(tokenizer, ids: list[int], eos: set[int]) -> str:
    for j, t in enumerate(ids):
        if t in eos:
            ids = ids[:j]
            break
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def _write_atomic(path: str, prompts, responses) -> None:
    partial = path + ".partial"
    try:
        with open(partial, "w", encoding="utf-8") as fh:
            for p, rs in zip(prompts, responses):
                fh.write(json.dumps({"prompt": _as_json_prompt(p), "responses": rs}, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(partial, path)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise


def sample_meta_set(ns) -> dict:
    """Sample ``ns.k`` responses for every prompt of ``ns.prompts`` from ``ns.policy``; write ``ns.out``.

    Returns {"prompts", "k", "responses", "empty", "empty_prompts", "truncated_prompts", "seconds", "out"}.
    Bad settings, a missing prompt file or an unloadable policy raise ValueError / FileNotFoundError
    (the command line prints them and exits with status 2).
    """
    from tqdm.auto import tqdm

    from metarm_fast.data import load_prompts

    t0 = time.perf_counter()
    _check_settings(ns)
    out = _prepare_out(ns.out)

    # Prompts first: a bad prompt file should not wait for a 7B model to load.
    prompts, report = load_prompts(ns.prompts, format=ns.data_format, max_records=ns.max_prompts,
                                   on_bad_record=getattr(ns, "on_bad_record", "error"))
    print(f"metarm-fast sample: {report.summary()}")
    if not prompts:
        raise ValueError(f"--prompts {ns.prompts}: no prompts to sample from")

    device, dtype = _device_and_dtype()
    tokenizer, model = _load_policy(ns.policy, device, dtype)
    encoded, truncated = _encode(tokenizer, prompts, ns.max_prompt_length)
    if truncated:
        print(f"metarm-fast sample: {truncated} prompt(s) longer than --max-prompt-length {ns.max_prompt_length} "
              "tokens lost tokens from their left", file=sys.stderr)
    pad_id = _pad_id(model, tokenizer)
    eos = _eos_ids(model, tokenizer)

    # Longest first (stable, so ties keep file order): little padding per batch, and an
    # out-of-memory shows in the first batch rather than the last.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    results: list[list[str] | None] = [None] * len(encoded)
    torch.manual_seed(ns.seed)
    bar = tqdm(total=len(encoded), unit="prompt", desc="sampling", file=sys.stderr)
    with torch.inference_mode():
        for start in range(0, len(order), ns.batch_size):
            idx = order[start:start + ns.batch_size]
            width = max(len(encoded[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids = encoded[i]
                input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                mask[row, width - len(ids):] = 1
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                do_sample=True,
                temperature=ns.temperature,
                top_p=ns.top_p,
                top_k=0,
                repetition_penalty=ns.repetition_penalty,
                max_new_tokens=ns.max_new_tokens,
                num_return_sequences=ns.k,
                pad_token_id=pad_id,
            )
            new = generated[:, width:].tolist()  # rows: prompt 0 x k, prompt 1 x k, ...
            for row, i in enumerate(idx):
                results[i] = [_decode(tokenizer, new[row * ns.k + j], eos) for j in range(ns.k)]
            bar.update(len(idx))
    bar.close()

    _write_atomic(out, prompts, results)
    n_resp = sum(len(rs) for rs in results)
    empty = sum(1 for rs in results for r in rs if not r)
    empty_prompts = sum(1 for rs in results if any(not r for r in rs))
    seconds = round(time.perf_counter() - t0, 2)
    if empty:
        print(
            f"metarm-fast sample: warning: {empty} of {n_resp} responses are empty (in {empty_prompts} of "
            f"{len(results)} prompts); they are written as they are, but a meta set loader rejects a prompt "
            "with an empty response: train with --on-bad-record skip to skip those prompts, or sample again "
            "(another --seed, or a policy that answers)",
            file=sys.stderr,
        )
    print(f"metarm-fast sample: {len(results)} prompts x k={ns.k} -> {n_resp} responses ({empty} empty) "
          f"written to {ns.out} in {seconds} s")
    return {
        "prompts": len(results),
        "k": ns.k,
        "responses": n_resp,
        "empty": empty,
        "empty_prompts": empty_prompts,
        "truncated_prompts": truncated,
        "seconds": seconds,
        "out": out,
    }
