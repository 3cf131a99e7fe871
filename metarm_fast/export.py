"""The trained reward model as a Hugging Face checkpoint, apart from the resume checkpoints."""
from __future__ import annotations

import os
import shutil

from metarm_fast.config import describe_data
from metarm_fast.lora import ADAPTER_DIR, merged_copy


def encoding_of(cfg, tokenizer) -> dict:
    """How the model was fed (prompt, response): recorded in config.json, so that every reader of the
    export (``load_reward_model``, ``metarm-fast eval``, a user's own code) encodes the same way."""
    uses_template = bool(getattr(tokenizer, "chat_template", None)) and cfg.chat_template != "never"
    return {
        "format": "chat_template" if uses_template else "plain",
        "chat_template": cfg.chat_template,
        "max_length": cfg.max_length,
        "plain": "[bos or cls] + tokens(prompt) + tokens(response) + [eos or sep], each part tokenized "
                 "without special tokens; a chat-message prompt is first written out as "
                 "'\\n\\nHuman: ...\\n\\nAssistant:' and the response gets a leading space",
        "chat": "apply_chat_template(prompt messages + [{'role': 'assistant', 'content': response.strip()}]); "
                "a string prompt is one user message (an HH transcript is split into its turns)",
        "reward_at": "the last token",
    }


def model_card(cfg, summary: dict | None, encoding: dict) -> str:
    """The export's README.md: what was trained on what, how well, and how to score with it."""
    summary = summary or {}
    ev = summary.get("eval") or summary.get("train_rewards") or {}
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-classification", "tags: [reward-model, metarm-fast]",
        "---", "", "# Reward model trained with metarm-fast", "",
        f"- base model: `{cfg.model}`" + (f" (LoRA r={cfg.lora_r}, merged)" if cfg.lora_r else ""),
        f"- training data: `{describe_data(cfg.train_data)}`" + (f", eval data: `{describe_data(cfg.eval_data)}`"
                                                                 if cfg.eval_data is not None else ""),
        f"- method: {cfg.method}" + (f" (meta set `{describe_data(cfg.meta_data)}`, eta {cfg.eta:g}, direction "
                                     f"{cfg.meta_direction})" if cfg.method == "metarm" else ""),
        f"- steps: {summary.get('steps', '?')}, lr {cfg.lr:g}, batch {cfg.batch_size} x {cfg.grad_accum}, "
        f"precision {cfg.precision}, seed {cfg.seed}",
    ]
    if "eval" in summary:
        lines.append(f"- eval accuracy: {ev['accuracy']:.4f} on {ev['pairs']} pairs")
    if ev:
        lines.append(f"- reward mean / std: {ev['reward_mean']:.4f} / {ev['reward_std']:.4f} "
                     f"({'eval pairs' if 'eval' in summary else 'training pairs'}; also in config.json)")
    lines += [
        "", "## Scoring", "",
        "The reward of (prompt, response) is the model's single logit at the last token of this encoding "
        f"({encoding['format']}; at most {encoding['max_length']} tokens, the prompt cut from its left first):",
        "", f"- {encoding['chat'] if encoding['format'] == 'chat_template' else encoding['plain']}.", "",
        "With metarm-fast: `metarm_fast.load_reward_model(FOLDER).score(prompts, responses)`. With transformers "
        "alone, see the metarm-fast README, \"Using the trained model\".", "",
    ]
    return "\n".join(lines)


def export_model(out_dir: str, hf, tokenizer, *, state_dict: dict | None = None, peft=None,
                 summary: dict | None = None, cfg=None) -> None:
    """Weights, tokenizer, the reward mean/std, the encoding and (with ``cfg``) a model card into ``out_dir``.

    ``state_dict``: the weights to save when they are not ``hf``'s own (the fp32 masters, FSDP2's
    gathered weights); ``peft``: the LoRA model, saved merged with its adapter beside it. Written into
    a temporary folder, then each file moved into place, so a crash while writing never leaves a
    half-written weights file under the final name."""
    tmp = os.path.join(out_dir, ".export.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    stats = (summary or {}).get("eval") or (summary or {}).get("train_rewards")
    if stats:
        # PPO trainers normalise rewards with these.
        hf.config.reward_mean = stats["reward_mean"]
        hf.config.reward_std = stats["reward_std"]
        hf.config.reward_stats_from = "eval pairs" if "eval" in summary else "training pairs (no eval set)"
    encoding = encoding_of(cfg, tokenizer) if cfg is not None else None
    if encoding is not None:
        hf.config.metarm_fast_encoding = encoding
    if peft is not None:
        merged = merged_copy(peft)  # a copy: its config holds the reward statistics set above
        merged.save_pretrained(tmp)
        peft.save_pretrained(os.path.join(tmp, ADAPTER_DIR))
        del merged
    else:
        hf.save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    if cfg is not None:
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(model_card(cfg, summary, encoding))
    for name in sorted(os.listdir(tmp)):
        dest = os.path.join(out_dir, name)
        if os.path.isdir(dest):  # the adapter folder of an earlier export
            shutil.rmtree(dest)
        os.replace(os.path.join(tmp, name), dest)
    os.rmdir(tmp)
