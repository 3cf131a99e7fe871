"""bench.throughput's output: the table it prints, and its results file (JSON: everything; CSV: one
line per row, target and skipped runner, each carrying the environment)."""
from __future__ import annotations

import csv
import json


def print_table(rows: list[dict], targets: list[dict], peak_note: str) -> None:
    hdr = f"{'method':<13} {'packing':<12} {'step ms: median [min, max]':<28} {'pairs/s':>8} {'tok/s computed':>15} {'tok/s padded-eq':>16} {'peak MB':>9} {'MFU':>8}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        s = r["step_s"]
        ms = f"{s['median'] * 1e3:8.1f} [{s['min'] * 1e3:.1f}, {s['max'] * 1e3:.1f}]"
        mfu = f"{r['mfu']['median'] * 100:.2f}%" if r["mfu"] else "unknown"
        peak_mb = f"{r['peak_MB']:.1f}" if r["peak_MB"] else "-"
        print(f"{r['method']:<13} {r['packing']:<12} {ms:<28} {r['pairs_per_s']['median']:8.1f} "
              f"{r['tokens_computed_per_s']['median']:15,.0f} {r['tokens_padded_per_s']['median']:16,.0f} {peak_mb:>9} {mfu:>8}")
        if r["method"] == "metarm":
            print(f"{'':<26}  inside these steps: perturb {r['perturb_s']['median'] * 1e3:.1f} ms + restore "
                  f"{r['restore_s']['median'] * 1e3:.1f} ms (medians), {r['machinery_share']['median'] * 100:.1f}% "
                  f"of a step [{r['machinery_share']['min'] * 100:.1f}, {r['machinery_share']['max'] * 100:.1f}]")
        if r["method"] == "metarm-parts":
            print(f"{'':<26}  J {r['J_s']['median'] * 1e3:.1f} ms + L {r['L_s']['median'] * 1e3:.1f} ms "
                  f"+ opt {r['opt_s']['median'] * 1e3:.1f} ms (medians, each timed alone)")
    print(f"MFU: peak FLOP/s {peak_note}. tok/s padded-eq: the tokens the same batches hold padded to their longest.")
    print()
    for t in targets:
        v = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        note = f"  ({t['note']})" if t["note"] else ""
        print(f"{t['target']:<30} [{t['packing']}] {v:>7}  target {t['bound']:<7} {t['verdict']}{note}")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}_"))
        elif isinstance(v, list):
            out[prefix + k] = json.dumps(v)
        else:
            out[prefix + k] = v
    return out


def write_results(result: dict, path: str) -> None:
    """JSON (everything) or CSV (one line per row and per target, each carrying the environment)."""
    if path.endswith(".csv"):
        env = {f"env_{k}": v for k, v in _flatten(result["environment"]).items()}
        lines = [{"kind": "step", **_flatten(r), **env} for r in result["rows"]]
        lines += [{"kind": "target", **t, **env} for t in result["targets"]]
        lines += [{"kind": "skipped", **s, **env} for s in result["skipped"]]
        fields = list(dict.fromkeys(k for line in lines for k in line))
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(lines)
    else:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)

