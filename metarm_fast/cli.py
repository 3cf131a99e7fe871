"""Command line: `metarm-fast train | eval | sample`. Flags of `train` are generated from TrainConfig."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing

from metarm_fast.config import TrainConfig, config_fields, describe_data
from metarm_fast.tracking import TENSORBOARD_DIR, parse_report_to


def _flag_type(f: dataclasses.Field):
    hints = typing.get_type_hints(TrainConfig)
    t = hints[f.name]
    args = [a for a in typing.get_args(t) if a is not type(None)]
    base = args[0] if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union else t
    return base, type(None) in typing.get_args(t)


def _parse_optional(base):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "") else base(text)

    return parse


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    for f in config_fields():
        base, optional = _flag_type(f)
        flag = "--" + f.name.replace("_", "-")
        doc = f.metadata.get("doc", "")
        kw = {"dest": f.name, "default": argparse.SUPPRESS, "help": f"{doc} (default: {f.default})"}
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            kw["type"] = _parse_optional(base) if optional else base
            if f.metadata.get("choices"):
                kw["choices"] = f.metadata["choices"]
            parser.add_argument(flag, **kw)


def config_from_args(ns: argparse.Namespace) -> TrainConfig:
    values: dict = {}
    if getattr(ns, "config", None):
        import yaml

        try:
            with open(ns.config) as fh:
                loaded = yaml.safe_load(fh) or {}
        except OSError as e:
            raise ValueError(f"--config {ns.config}: cannot read it ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise ValueError(f"--config {ns.config}: not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {ns.config}: expected a mapping of settings, got {type(loaded).__name__}")
        known = {f.name for f in config_fields()}
        unknown = sorted(set(loaded) - known)
        if unknown:
            raise ValueError(f"{ns.config}: unknown setting(s) {', '.join(unknown)}; see `metarm-fast train --help`")
        values.update({k: coerce_setting(k, v, ns.config) for k, v in loaded.items()})
    values.update({f.name: getattr(ns, f.name) for f in config_fields() if hasattr(ns, f.name)})
    return TrainConfig(**values)


def coerce_setting(name: str, value, source: str):
    """A YAML value as its setting's type. PyYAML reads `1e-4` (no dot before the e) as a string."""
    base, optional = _flag_type(next(f for f in config_fields() if f.name == name))
    if value is None and optional:
        return None
    if base is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _print_config(cfg: TrainConfig) -> None:
    print("metarm-fast train: resolved config")
    for k, v in cfg.to_dict().items():
        print(f"  {k:<26} {v}")


def _print_summary(trainer, summary: dict) -> None:
    cfg = trainer.cfg
    n_params = sum(p.numel() for p in trainer.weights.params)
    rows = [
        ("method", cfg.method),
        ("model", f"{cfg.model} ({n_params / 1e6:.2f}M params, {cfg.precision})"),
        ("train pairs", f"{len(trainer.data.train_pairs)} ({describe_data(cfg.train_data)})"),
        ("steps", f"{summary['steps']} in {summary['train_time_s']} s ({summary['pairs_per_s']} pairs/s)"),
        ("truncated records", f"{summary['truncated_records']} (of which {summary['prompt_lost_records']} lost their "
                              "whole prompt)" if summary.get("prompt_lost_records") else str(summary["truncated_records"])),
    ]
    if "eval" in summary:
        e = summary["eval"]
        rows.append(("eval accuracy", f"{e['accuracy']:.3f} on {e['pairs']} pairs ({describe_data(cfg.eval_data) if cfg.eval_data is not None else f'{cfg.eval_fraction:.0%} of the train data, held out'})"))
        if "best_of_k" in e:
            rows.append(("eval best-of-k", f"{e['best_of_k']:.3f} over {e['groups']} records (top-rewarded response is a top-scored one)"))
        rows.append(("eval reward mean/std", f"{e['reward_mean']:.3f} / {e['reward_std']:.3f}"))
    if "train_rewards" in summary:
        e = summary["train_rewards"]
        rows.append(("reward mean/std", f"{e['reward_mean']:.3f} / {e['reward_std']:.3f} on {e['pairs']} training pairs "
                                         "(no eval set; written into config.json)"))
    if "eval_shifted" in summary:
        e = summary["eval_shifted"]
        rows.append(("shifted accuracy", f"{e['accuracy']:.3f} on {e['pairs']} pairs (better-policy responses)"))
    if "meta_gaps" in summary:
        g = summary["meta_gaps"]
        rows.append(("meta reward gap", f"mean {g['mean']:.3f}, median {g['median']:.3f} over {g['n']} pairs"))
        if "meta_gaps_initial" in summary:
            g0 = summary["meta_gaps_initial"]
            rows.append(("  before training", f"mean {g0['mean']:.3f}, median {g0['median']:.3f} (same samples)"))
        rows.append(("gap histogram", summary["meta_gap_histogram"]))
    for name, rep in trainer.data.reports:
        rows.append((f"{name} data", rep.summary()))
    rows.append(("model (Hugging Face)", cfg.output_dir))
    rows.append(("metrics", os.path.join(cfg.output_dir, "metrics.jsonl")))
    rows.append(("resume checkpoints", os.path.join(cfg.output_dir, "checkpoints")))
    if "training_curves" in summary:
        rows.append(("training curves", summary["training_curves"]))
    if "best" in summary:
        rows.append(("best model", f"{summary['best']['path']} (eval accuracy {summary['best']['eval_accuracy']:.3f})"))
    if "tensorboard" in parse_report_to(cfg.report_to):
        rows.append(("tensorboard", f"tensorboard --logdir {os.path.join(cfg.output_dir, TENSORBOARD_DIR)}"))
    width = max(len(r[0]) for r in rows)
    print()
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def _resume_command(cfg: TrainConfig) -> str:
    args = [a for a in _ARGV if a != "--overwrite"]
    if "--resume" in args:
        i = args.index("--resume")
        del args[i : i + 2]
    args = [a for a in args if not a.startswith("--resume=")]
    return "metarm-fast " + " ".join(args + ["--resume", "auto"])


def cmd_train(ns) -> int:
    from metarm_fast.trainer import RewardTrainer

    cfg = config_from_args(ns).resolved()
    main_rank = os.environ.get("RANK", "0") == "0"
    if main_rank:
        _print_config(cfg)
    trainer = RewardTrainer(cfg)
    try:
        summary = trainer.train()
    except KeyboardInterrupt:
        from metarm_fast.checkpoint import latest_checkpoint

        last = latest_checkpoint(os.path.join(cfg.output_dir, "checkpoints"))
        print(f"metarm-fast train: stopped at once during step {trainer.step + 1}; the weights were restored. "
              + (f"The last checkpoint is {last}: continue with `{_resume_command(cfg)}`." if last
                 else "No checkpoint had been written."), file=sys.stderr)
        return 130
    if not main_rank:
        return 0
    if summary.get("interrupted"):
        print(f"metarm-fast train: {summary['interrupted']} received; saved step {summary['steps']} to "
              f"{summary['checkpoint']}. Continue with `{_resume_command(cfg)}`.")
        return 0
    _print_summary(trainer, summary)
    return 0


def cmd_eval(ns) -> int:
    from metarm_fast.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(ns.model, ns.data, data_format=ns.data_format, max_length=ns.max_length,
                                 batch_size=ns.batch_size, on_bad_record=ns.on_bad_record,
                                 max_records=ns.max_records, split=ns.split, chat_template=ns.chat_template,
                                 pku_preference=ns.pku_preference)
    print(json.dumps(result))
    return 0


def cmd_sample(ns) -> int:
    from metarm_fast.sample import sample_meta_set

    sample_meta_set(ns)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from metarm_fast import __version__

    p = argparse.ArgumentParser(prog="metarm-fast", description="MetaRM reward-model training")
    p.add_argument("--version", action="version", version=f"metarm-fast {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a reward model (no arguments: the embedded tiny default)")
    t.add_argument("--config", help="YAML file of settings (flags override it)")
    add_config_flags(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="accuracy of a saved reward model on preference pairs (one JSON line)",
                       description="Accuracy and reward statistics of a saved reward model. The encoding settings "
                                   "(max length, format, chat template, PKU preference) default to those of the run "
                                   "that trained the model (its metarm_fast_config.yaml), else to train's defaults; "
                                   "the JSON line says which were used and where each came from.")
    run = "default: the training run's, else %s"
    e.add_argument("--model", required=True, help="checkpoint directory (a metarm-fast --output-dir or any HF reward model)")
    e.add_argument("--data", required=True, help="preference pairs (file, hub dataset or synthetic:eval)")
    e.add_argument("--data-format", default=None, choices=TrainConfig.__dataclass_fields__["data_format"].metadata["choices"],
                   help=run % "auto")
    e.add_argument("--max-length", type=int, default=None, help=run % TrainConfig.max_length)
    e.add_argument("--chat-template", default=None, choices=("auto", "never", "always"), help=run % "auto")
    e.add_argument("--pku-preference", default=None, choices=("better", "safer"), help=run % "better")
    e.add_argument("--split", default="test", help="split of a hub dataset (default: %(default)s)")
    e.add_argument("--batch-size", type=int, default=32, help="pairs per batch (default: %(default)s)")
    e.add_argument("--max-records", type=int, default=None, help="read at most this many records (default: all)")
    e.add_argument("--on-bad-record", choices=("error", "skip"), default="error",
                   help="stop at the first bad record, or skip and count them (default: %(default)s)")
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("sample", help="sample a meta set: k responses per prompt from a causal LM policy")
    s.add_argument("--policy", required=True, help="causal LM directory or hub name")
    s.add_argument("--prompts", required=True, help="prompts: any pair/meta file (its prompts) or a .txt, one a line")
    s.add_argument("--out", required=True, help="output .jsonl: {prompt, responses}")
    s.add_argument("--k", type=int, default=5)
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-p", type=float, default=0.9)
    s.add_argument("--repetition-penalty", type=float, default=1.1)
    s.add_argument("--max-new-tokens", type=int, default=512)
    s.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    s.add_argument("--max-prompts", type=int, default=None)
    s.add_argument("--max-prompt-length", type=int, default=1024)
    s.add_argument("--data-format", default="auto")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--on-bad-record", choices=("error", "skip"), default="error")
    s.set_defaults(func=cmd_sample)
    return p


_ARGV: list[str] = []


def main(argv: list[str] | None = None) -> int:
    _ARGV[:] = sys.argv[1:] if argv is None else argv
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except (ValueError, FileNotFoundError) as e:
        # Errors a user can act on (bad records, bad settings) are printed without a traceback.
        rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
        where = f" (rank {rank})" if rank is not None else ""
        print(f"metarm-fast {ns.command}{where}: error: {e}", file=sys.stderr)
        return 2
    finally:
        from metarm_fast.parallel import shutdown_distributed

        shutdown_distributed()


if __name__ == "__main__":
    sys.exit(main())
