#!/usr/bin/env python
"""CPU benchmark table: time ratios to torch SDPA and to avar without masses, peak memory, per class layout.

    python bench/run_cpu.py                                        # S 2048 4096, both layouts, C 4 and 8
    python bench/run_cpu.py --sizes 1024 --passes fwd --reps 3     # a short run

Cases and layouts are those of bench/bench_attention_cpu.py. The layout-dependent cases (avar, avar_vaf,
sdpa_onehot, flex_mass_rw) run for every (layout, C); sdpa, avar_plain and eager once per (S, pass). Each row
runs in a fresh subprocess, which
  1. builds the inputs and warms every case it times up on small inputs (extension load, BLAS buffers),
  2. measures the case's peak memory beyond the inputs on its first full-size call
     (avar_kernels.benchmark.peak_memory; outputs and gradients included; n/a for flex_mass_rw, whose first call
     compiles),
  3. times the case, SDPA and avar_plain interleaved (avar_kernels.benchmark.compare), --reps repetitions after
     one warm-up call each: the ratios are medians of same-repetition ratios, robust to the load of a shared
     machine.
Writes <out>.md, .json and .csv after every row (default bench/results/cpu).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import bench_attention_cpu as B  # noqa: E402

from avar_kernels import benchmark as bm  # noqa: E402

PASSES = ("fwd", "fwd+bwd")
BASELINES = ("sdpa", "avar_plain")


def worker(case: str, s: int, backward: bool, layout: str, c: int, reps: int) -> dict:
    import torch

    q, k, v, kc = B.make_inputs(s, backward, layout, c)
    small = B.make_inputs(64, backward, layout, c)
    flex = B.flex_case(s, kc, c) if case == "flex_mass_rw" else None

    def call(name, inputs=(q, k, v, kc)):
        outs = flex(*inputs[:3]) if name == "flex_mass_rw" else B.run_case(name, *inputs, c)
        if backward:
            B.backward_step(outs, *inputs[:3])
        return outs

    names = list(dict.fromkeys(BASELINES + (case,)))
    with torch.enable_grad() if backward else torch.no_grad():
        for name in names:
            if name != "flex_mass_rw":
                call(name, small)
        del small
        if flex is not None:
            call(case)  # compiles: its memory is not the kernel's
            mem = None
        else:
            mem = bm.peak_memory(lambda: call(case))
        res = bm.compare({name: (lambda n=name: call(n)) for name in names}, baseline="sdpa", reps=reps, warmup=1)
    t = res[case]
    return {"ms": None if t.median is None else t.median * 1e3, "min_ms": None if t.min is None else t.min * 1e3,
            "x_sdpa": t.ratio, "x_plain": t.ratio_to(res["avar_plain"]), "sdpa_ms": res["sdpa"].median * 1e3,
            "mem_mib": None if mem is None else mem.bytes / 2**20, "mem_method": None if mem is None else mem.method,
            "error": t.error}


def plan(args):
    """(S, pass, layout, C, case) rows in table order."""
    rows = []
    for s in args.sizes:
        for p in args.passes:
            for case in args.cases:
                if p == "fwd+bwd" and case in B.FORWARD_ONLY:
                    continue
                if case in B.CLASSED:
                    rows += [(s, p, layout, c, case) for layout in args.layouts for c in args.classes]
                else:
                    rows.append((s, p, "-", min(args.classes), case))
    order = ("-",) + B.LAYOUTS
    return sorted(rows, key=lambda r: (r[0], PASSES.index(r[1]), order.index(r[2]), r[3], B.CASES.index(r[4])))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--passes", nargs="+", default=list(PASSES), choices=PASSES)
    ap.add_argument("--layouts", nargs="+", default=list(B.LAYOUTS), choices=B.LAYOUTS)
    ap.add_argument("--classes", type=int, nargs="+", default=[4, 8], help="class counts C (4..8)")
    ap.add_argument("--cases", nargs="+", default=list(B.CASES), choices=B.CASES)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "cpu"), help="path stem of .md/.json/.csv")
    ap.add_argument("--worker", nargs=5, metavar=("CASE", "S", "PASS", "LAYOUT", "C"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        case, s, p, layout, c = args.worker
        print(json.dumps(worker(case, int(s), p == "fwd+bwd", layout, int(c), args.reps)))
        return
    if any(not 4 <= c <= 8 for c in args.classes):
        ap.error(f"argument --classes: the vlm layout needs C in [4, 8], got {args.classes}")

    notes = [
        f"B=1, H={B.H}, D={B.D}, causal, float32. Layouts: `vlm` = 4 contiguous spans (system 10%, image 60%, "
        "user 20%, response 10%), `random` = one class drawn per token; `-` = a case without classes (eager "
        "computes C masses). `x sdpa` / `x avar_plain` = median over the repetitions of time(case) / time(SDPA) "
        "and / time(avar without masses), all three timed interleaved in the same subprocess "
        f"({args.reps} repetitions after one warm-up call). `peak MiB` = peak memory of the case's first call "
        "beyond the inputs (outputs and gradients included; resident-set high-water mark, "
        "avar_kernels.benchmark.peak_memory).",
    ]
    columns = ["S", "pass", "layout", "C", "case", "ms", "x sdpa", "x avar_plain", "peak MiB"]
    report = bm.Report("CPU backend: time ratios to SDPA and to avar without masses, peak memory", columns,
                       notes=notes, path=args.out, digits={"x sdpa": 3, "x avar_plain": 3, "peak MiB": 0})
    for s, p, layout, c, case in plan(args):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", case, str(s), p,
               "vlm" if layout == "-" else layout, str(c), "--reps", str(args.reps)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        row = {"S": s, "pass": p, "layout": layout, "C": c if (layout != "-" or case == "eager") else "-",
               "case": case}
        if proc.returncode != 0:
            row["error"] = ((proc.stderr.strip().splitlines() or ["?"])[-1])[:200]
        else:
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            row.update(res)
            row.update({"x sdpa": res["x_sdpa"], "x avar_plain": res["x_plain"], "peak MiB": res["mem_mib"]})
        if row.get("error"):
            row["ms"] = "failed: " + row["error"][:60]
        report.add(row)
        print(f"S={s} {p:8s} {layout:6s} C={row['C']} {case:13s} {bm.fmt(row.get('ms'))} ms  "
              f"x{bm.fmt(row.get('x sdpa'), 3)} sdpa  x{bm.fmt(row.get('x avar_plain'), 3)} avar_plain  "
              f"peak {bm.fmt(row.get('peak MiB'), 0)} MiB", flush=True)
    print(f"wrote {args.out}.md, .json, .csv")


if __name__ == "__main__":
    main()
