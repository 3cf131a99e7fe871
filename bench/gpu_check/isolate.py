"""Each section in a process of its own (the default on a GPU): a section that hangs in a CUDA or
NCCL call (where SIGALRM cannot reach it), crashes the interpreter, or leaves the CUDA context
unusable (an illegal memory access) takes only itself down. The child runs the same command with
``--section-process NAME --section-record PATH`` and writes its record there; the parent echoes its
output, kills it GRACE_S seconds past its time limit, and records what happened either way.
"""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import threading

from bench.gpu_check.report import SectionRecord

GRACE_S = 60.0  # past the child's own limit (its SIGALRM), before the parent kills it
# Flags of the parent's command line that the child does not take (they name the whole run).
PARENT_ONLY = {"--only": 1, "--out": 1, "--work": 1, "--isolate": 0, "--no-isolate": 0}


def child_argv(argv: list[str]) -> list[str]:
    out, skip = [], 0
    for i, arg in enumerate(argv):
        if skip:
            skip -= 1
            continue
        name = arg.split("=", 1)[0]
        if name in PARENT_ONLY:
            skip = PARENT_ONLY[name] if "=" not in arg else 0
            continue
        out.append(arg)
    return out


def run_isolated(sec, argv: list[str], work: str, report, time_limit_s: float, log=print) -> SectionRecord:
    part = os.path.join(work, f"section-{sec.name}.json")
    if os.path.exists(part):
        os.remove(part)
    rec = SectionRecord(sec.name, sec.title, sec.correctness, time_limit_s)
    report.add(rec)  # "running" on disk until the child is done
    cmd = [sys.executable, "-m", "bench.gpu_check", *child_argv(argv), "--work", work, "--no-isolate",
           "--section-process", sec.name, "--section-record", part]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    tail = collections.deque(maxlen=60)

    def pump():
        for line in proc.stdout:
            print(line, end="", flush=True)
            tail.append(line)

    pumping = threading.Thread(target=pump, daemon=True)
    pumping.start()
    killed = False
    try:
        proc.wait(timeout=time_limit_s + GRACE_S)
    except subprocess.TimeoutExpired:
        killed = True
        proc.kill()
        proc.wait()
    pumping.join(timeout=10)
    done = None
    if os.path.exists(part):
        with open(part) as f:
            sections = json.load(f).get("sections", [])
        done = sections[-1] if sections else None
    if done is not None and done.get("status") != "running":
        rec = SectionRecord.from_dict(done)
    else:
        if done is not None:  # it started and recorded what it measured before it died
            rec = SectionRecord.from_dict(done)
        rec.status = "fail"
        rec.reason = (f"killed {time_limit_s + GRACE_S:.0f} s after it started (its own limit did not stop it: stuck "
                      f"outside Python?)" if killed else f"its process exited with code {proc.returncode} before "
                      "recording a result")
        rec.measurements["output_tail"] = "".join(tail)[-4000:]
    report.sections[-1] = rec
    report.write()
    if rec.status == "fail":
        log(f"[{sec.name}] fail: {rec.reason}")
    return rec
