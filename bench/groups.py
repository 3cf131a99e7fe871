"""k-response records: metarm-fast training them as groups against TRL trained on their pairs.

    python -m bench.groups --data hh-rlhf-harmless-base-test.jsonl.gz --tokenizer $MINILM \\
        [--k-responses 4] [--batch 8] [--steps 10] [--warmup 2] [--packing share-prompt]
        [--methods vanilla,metarm,trl] [--trl-micro-batch PAIRS] [--out groups.json]

What runs
---------
The HH transcripts become k-response records (bench/hh_groups.py: a record's chosen and rejected
plus extra responses of similar length from the neighbouring records; k = 4 gives 5 ordered pairs of
different scores per record), written as a "ranked" file and read by metarm-fast's own loader.
- vanilla / metarm  our RewardTrainer.train_step on --batch records a step, trained as groups (the
           group loss over each record's ordered pairs, each record one unit: its prompt computed
           once in the share-prompt layout); MetaRM's meta batch is the step's own records, each
           one unlabelled group of its k responses.
- trl      trl.RewardTrainer (bench/trl_runner.py) on the same records flattened into their ordered
           pairs (chosen = the higher score), so a step trains on exactly the same ordered pairs as
           ours: the step's records in the same order, each record's pairs in the order (i, j) of
           its responses. Padded (TRL has no padding-free reward training): each pair holds the
           prompt twice. Its micro-batches hold --trl-micro-batch pairs (default: one record's
           pairs, which share a prompt and so pad the least), the loss averaged over them as
           Trainer does under gradient accumulation: with every record holding the same number of
           pairs this is our loss (mean over records of the mean over each record's pairs), and
           the first step of both starts from the same weights, so their first losses agree.

Method and units
----------------
As bench.throughput: same initial weights, round-robin steps (order rotated each step), warm-up
left out; each timed step is one paired repeat (both sides on the same records, back to back).
  pairs/s      the training signal: ordered pairs with different scores per second (per step: the
               pairs the step itself reports it trained on, group_pass's count and TRL's batch rows)
  ratio        per step i, (ours pairs/s)_i / (TRL pairs/s)_i: median, min, max over the N timed
               steps and a 95% bootstrap interval of the median (bench.rows.paired_ratio)
  MFU          bench.flops, against the peak of bench.peak (CPU: torch.mm measured at the model's
               own shapes after the steps, with a share-prompt pass's rows)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from bench.environment import full_environment
from bench.flops import flop_params, peak_flops
from bench.hh_groups import SCORES, write_groups
from bench.rows import make_row, paired_ratio
from bench.runners import MetaRunner, Runner, VanillaRunner, layout_tokens, signal_pairs
from bench.throughput import _csv_list, build_config, time_round_robin
from bench.trl_runner import TrlRunner
from metarm_fast.batch import EncodedGroup, EncodedPair
from metarm_fast.config import TINY_MODEL, TrainConfig

METHODS = ("vanilla", "metarm", "trl")
PACKINGS = ("none", "pack", "share-prompt")


def flatten(record: EncodedGroup) -> list[EncodedPair]:
    """A k-response record's ordered pairs of different scores, (i, j) in the order of its responses."""
    s = record.scores
    return [EncodedPair(record.seqs[i], record.seqs[j]) for i in range(len(s)) for j in range(len(s)) if s[i] > s[j]]


def trl_batches(batches, micro: int | None) -> list[list[list[EncodedPair]]]:
    """Each step's records flattened into their pairs, cut into micro-batches of `micro` pairs (None:
    one record's pairs each)."""
    out = []
    for step in batches:
        records = [g for mb in step for g in mb]
        if micro is None:
            out.append([flatten(g) for g in records])
            continue
        pairs = [p for g in records for p in flatten(g)]
        if len(pairs) % micro:
            raise SystemExit(f"--trl-micro-batch {micro} does not divide a step's {len(pairs)} pairs")
        out.append([pairs[k : k + micro] for k in range(0, len(pairs), micro)])
    sizes = {len(mb) for step in out for mb in step}
    if len(sizes) != 1:
        raise SystemExit(f"TRL's micro-batches would differ in size ({sorted(sizes)} pairs): every record needs the "
                         "same number of ordered pairs, or pass --trl-micro-batch")
    return out


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="HH-RLHF transcripts (jsonl or jsonl.gz, chosen/rejected)")
    ap.add_argument("--k-responses", type=int, default=4, choices=sorted(SCORES), help="responses per record")
    ap.add_argument("--model", default=TINY_MODEL, help=f"'{TINY_MODEL}' or a model directory")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (a tiny Llama is built over its vocabulary)")
    ap.add_argument("--hidden", type=int, default=256, help="tiny-llama hidden size")
    ap.add_argument("--layers", type=int, default=4, help="tiny-llama decoder layers")
    ap.add_argument("--attn", default=TrainConfig.attn_implementation, help="attention backend for every model")
    ap.add_argument("--batch", type=int, default=8, help="k-response records per step")
    ap.add_argument("--trl-micro-batch", type=int, default=None,
                    help="pairs per TRL micro-batch (gradient accumulation over a step's pairs); default: one record's pairs")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (paired repeats)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--repeat", type=int, default=1, help="run each step this many times in a row, keep its fastest")
    ap.add_argument("--max-length", type=int, default=TrainConfig.max_length)
    ap.add_argument("--max-records", type=int, default=None, help="read at most this many k-response records")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--packing", default="share-prompt", help="our layouts, comma-separated: " + ",".join(PACKINGS))
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated: " + ",".join(METHODS))
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--peak-flops", type=float, default=None, help="peak FLOP/s of the device, for MFU")
    ap.add_argument("--out", help="write rows, ratios and environment here (.json)")
    a = ap.parse_args(argv)
    packings = _csv_list(a.packing, PACKINGS, "packing")
    methods = _csv_list(a.methods, METHODS, "methods")
    if a.steps < 1 or a.warmup < 0 or a.batch < 1 or a.repeat < 1 or (a.trl_micro_batch or 1) < 1:
        raise SystemExit("--steps >= 1, --warmup >= 0, --batch >= 1, --repeat >= 1 and --trl-micro-batch >= 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        return run(a, argv, packings, methods)
    finally:
        torch.set_num_threads(threads)


def build(a, packings, methods, records_path, skip):
    """Our runners (one model each, same initial weights), the step batches of records, and TRL's runner."""
    a = argparse.Namespace(**{**vars(a), "data": records_path})  # build_config reads the records file ("ranked")
    runners: list[Runner] = []
    batches = init_state = first = None
    classes = [c for m, c in (("vanilla", VanillaRunner), ("metarm", MetaRunner)) if m in methods]
    for packing in packings:
        for cls in classes:
            r = cls(build_config(a, packing), packing, batches, init_state)
            if batches is None:
                first = r.tr
                batches = [first.step_inputs(s)[0] for s in range(first.total_steps)]
                r.batches = batches
                init_state = {k: v.detach().clone() for k, v in first.rm.hf.state_dict().items()}
            runners.append(r)
    if first is None:  # TRL alone: a trainer only for the batches
        first = VanillaRunner(build_config(a, "none"), "none", None, None).tr
        batches = [first.step_inputs(s)[0] for s in range(first.total_steps)]
        init_state = {k: v.detach().clone() for k, v in first.rm.hf.state_dict().items()}
    if not all(isinstance(it, EncodedGroup) for step in batches for mb in step for it in mb):
        raise SystemExit(f"{records_path}: the trainer did not read k-response records")
    if "trl" in methods:
        try:
            import trl  # noqa: F401
        except ImportError:
            skip("trl", "trl is not importable")
        else:
            trl_cfg = dataclasses.replace(first.cfg, packing="none")
            runners.append(TrlRunner(trl_cfg, trl_batches(batches, a.trl_micro_batch), init_state, first.tokenizer,
                                     tempfile.mkdtemp(prefix="bench-groups-trl-")))
    for r in runners[1:]:  # identical initial weights, checked
        for (k, v), w in zip(r.model.state_dict().items(), init_state.values()):
            if not torch.equal(v, w):
                raise RuntimeError(f"{r.label}: initial weights differ from the first runner's at {k}")
    return runners, first, batches


def run(a, argv, packings, methods) -> dict:
    env = full_environment(argv, "bench.groups")
    skipped: list[dict] = []

    def skip(label: str, why: str) -> None:
        print(f"  SKIPPED {label}: {why}")
        skipped.append({"runner": label, "reason": why})

    hh_path = a.data
    work = tempfile.mkdtemp(prefix="bench-groups-")
    records_path = os.path.join(work, f"hh-k{a.k_responses}.jsonl")
    n_records = write_groups(hh_path, records_path, a.k_responses)
    t0 = time.perf_counter()
    runners, first, batches = build(a, packings, methods, records_path, skip)
    nflop = flop_params(first.rm.hf)
    nparams = sum(p.numel() for p in first.model.parameters())
    print(f"groups: {a.model} (hidden {a.hidden}, {a.layers} layers, {nparams:,} params, {nflop:,} without the "
          f"embedding), {first.cfg.precision}; {n_records} k={a.k_responses} records from {hh_path} "
          f"({len(first.data.train_pairs)} read), {a.batch} records a step, {a.warmup} warm-up + {a.steps} timed "
          f"steps{f' (each the fastest of {a.repeat})' if a.repeat > 1 else ''}; runners "
          f"{', '.join(r.label for r in runners)}; device {env['device']}, {torch.get_num_threads()} threads, "
          f"load {env['loadavg_start']}; built in {time.perf_counter() - t0:.1f} s")
    live = time_round_robin(a, runners, lambda label, packing, why: skip(label, why))

    timed = range(a.warmup, a.warmup + a.steps)
    ref = "share-prompt" if "share-prompt" in packings else packings[0]
    pass_tokens = statistics.median(layout_tokens(batches[i], ref) for i in timed)
    hf_config = first.rm.hf.config
    pf, peak_note = peak_flops(first.cfg.precision, a.peak_flops, hf_config, int(pass_tokens))
    rows = []
    for r in live:
        row = make_row(r, nflop, pf, hf_config)
        row.update({
            "records_per_step": sum(len(mb) for mb in batches[r.steps[0]]),
            "micro_batches_per_step": len(r.batches[r.steps[0]]),
            "trained_pairs_steps": list(r.trained),
            "expected_pairs_steps": [sum(signal_pairs(it) for mb in r.batches[i] for it in mb) for i in r.steps],
            "tokens_computed_steps": list(r.computed),
            "first_loss": r.first_loss,
        })
        rows.append(row)
    ratios = signal_ratios(live)
    env["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print()
    print_groups(rows, ratios, peak_note)
    print(f"load average at start {env['loadavg_start']}, at end {env['loadavg_end']} (1, 5, 15 min)")
    for s in skipped:
        print(f"skipped {s['runner']}: {s['reason']}")
    result = {
        "rows": rows,
        "ratios": ratios,
        "skipped": skipped,
        "records": {i: [{"prompt": len(g.seqs[0].prompt_ids), "responses": [len(s.response_ids) for s in g.seqs],
                         "scores": list(g.scores)} for mb in batches[i] for g in mb] for i in timed},
        "k_responses": a.k_responses,
        "peak_flops": pf,
        "peak_flops_source": peak_note,
        "flop_params": nflop,
        "params": nparams,
        "config": {k: v for k, v in vars(a).items()},
        "train_config": {k: v for k, v in first.cfg.to_dict().items() if k != "output_dir"},
        "environment": env,
    }
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {a.out}")
    return result


def signal_ratios(live: list[Runner]) -> list[dict]:
    """Each of our runners against TRL, paired by step: pairs/s ratio and the tokens each computed."""
    trl = next((r for r in live if isinstance(r, TrlRunner)), None)
    out = []
    if trl is None:
        return out
    theirs = dict(zip(trl.steps, zip(trl.times, trl.trained, trl.computed)))
    for r in live:
        if r is trl:
            continue
        steps = [i for i in r.steps if i in theirs]
        mine = dict(zip(r.steps, zip(r.times, r.trained, r.computed)))
        ours_rate = [mine[i][1] / mine[i][0] for i in steps]
        trl_rate = [theirs[i][1] / theirs[i][0] for i in steps]
        out.append({
            "runner": r.label,
            "against": trl.label,
            "steps": steps,
            "same_pairs_every_step": all(mine[i][1] == theirs[i][1] for i in steps),
            "pairs_per_s_ratio": paired_ratio(ours_rate, trl_rate),
            "trl_tokens_over_ours": paired_ratio([theirs[i][2] for i in steps], [mine[i][2] for i in steps], resamples=0),
        })
    return out


def print_groups(rows: list[dict], ratios: list[dict], peak_note: str) -> None:
    hdr = (f"{'runner':<22} {'step ms: median [min, max]':<28} {'records':>7} {'pairs':>6} {'pairs/s':>8} "
           f"{'tokens/step':>11} {'tok/s':>8} {'MFU':>7}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        s = r["step_s"]
        ms = f"{s['median'] * 1e3:8.1f} [{s['min'] * 1e3:.1f}, {s['max'] * 1e3:.1f}]"
        mfu = f"{r['mfu']['median'] * 100:.1f}%" if r["mfu"] else "unknown"
        print(f"{r['method'] + '[' + r['packing'] + ']':<22} {ms:<28} {r['records_per_step']:>7} {r['pairs_per_step']:>6} "
              f"{r['pairs_per_s']['median']:8.1f} {r['tokens_computed_per_step']:11,.0f} "
              f"{r['tokens_computed_per_s']['median']:8,.0f} {mfu:>7}")
    print(f"pairs: ordered pairs of different scores a step trains on. MFU: peak FLOP/s {peak_note}.")
    for q in ratios:
        p, t = q["pairs_per_s_ratio"], q["trl_tokens_over_ours"]
        print(f"{q['runner']} / {q['against']} pairs/s over {p['n']} paired steps: median {p['median']:.2f} "
              f"[min {p['min']:.2f}, max {p['max']:.2f}], 95% bootstrap interval of the median "
              f"[{p['ci95'][0]:.2f}, {p['ci95'][1]:.2f}]; TRL computed {t['median']:.2f}x its tokens"
              f"{'' if q['same_pairs_every_step'] else '; THE PAIRS TRAINED DIFFER'}")
    print(json.dumps({"first_loss": {r["method"] + "[" + r["packing"] + "]": r["first_loss"] for r in rows}}))


if __name__ == "__main__":
    main()
