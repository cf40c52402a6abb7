#!/usr/bin/env python
"""Key masses on the CPU backend (issue 11): time and peak memory of the forward with key masses and of
forward+backward with a loss on them, against the same op without key masses and against eager attention.

    python bench/bench_key_mass_cpu.py                              # S 2048 4096, fwd and fwd+bwd, 5 repetitions
    python bench/bench_key_mass_cpu.py --sizes 1024 --reps 3        # a short run

B=1, H=16, D=128, causal, float32, C=4 classes in the `vlm` layout of bench/bench_attention_cpu.py (system, image,
user, response spans; query classes = key classes of the same positions). Cases:
  avar_plain     the cpu backend with row masses, no key masses (loss on out): the baseline of `x plain`
  avar_key_mass  the cpu backend with row and key masses (loss on out + key_mass)
  eager          materialized softmax in torch (what output_attentions=True does), row masses P onehot(key class)
                 and key masses P^T onehot(query class) (loss on out + key_mass): the baseline of `x eager`
Per (S, pass) one subprocess times the three cases interleaved (avar_kernels.benchmark.compare: medians of
same-repetition ratios, robust to the load of a shared machine); per (S, pass, case) another fresh subprocess
measures the peak memory of the case's first full-size call beyond the inputs (avar_kernels.benchmark.peak_memory).
Writes <out>.md and .json (and .csv) after every row (default bench/results/cpu_key_mass).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import bench_attention_cpu as B  # noqa: E402

from avar_kernels import benchmark as bm  # noqa: E402

CASES = ("avar_plain", "avar_key_mass", "eager")
PASSES = ("fwd", "fwd+bwd")
C = 4


def run_case(case, q, k, v, kc):
    """The tensors whose sum is backpropagated."""
    import torch
    import torch.nn.functional as F

    import avar_kernels

    if case in ("avar_plain", "avar_key_mass"):
        res = avar_kernels.attention(q, k, v, kc, num_classes=C, causal=True, backend="cpu",
                                     return_key_mass=case == "avar_key_mass")
        return (res.out,) if case == "avar_plain" else (res.out, res.key_mass)
    if case == "eager":
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        s = q.shape[1]
        z = (qt @ kt.transpose(-1, -2)) * B.D ** -0.5
        mask = torch.ones(s, s, dtype=torch.bool).tril()
        p = torch.softmax(z.masked_fill(~mask, -math.inf), -1)
        onehot = F.one_hot(kc.long(), C).to(q.dtype)[:, None]    # [B, 1, S, C]; query classes = key classes
        return p @ vt, p @ onehot, p.transpose(-1, -2) @ onehot  # out, mass, key_mass
    raise ValueError(f"case: expected one of {CASES}, got {case!r}")


def _setup(s, backward):
    import torch

    torch.set_grad_enabled(backward)
    q, k, v, kc = B.make_inputs(s, backward, "vlm", C)
    small = B.make_inputs(64, backward, "vlm", C)

    def call(name, inputs=(q, k, v, kc)):
        outs = run_case(name, *inputs)
        if backward:
            B.backward_step((outs[0], outs[2]) if name == "eager" else outs, *inputs[:3])  # out + key_mass
        return outs

    return call, small


def worker_time(s, backward, reps):
    import torch

    call, small = _setup(s, backward)
    for name in CASES:
        call(name, small)  # extension load, BLAS buffers
    res = bm.compare({name: (lambda n=name: call(n)) for name in CASES}, baseline="avar_plain", reps=reps, warmup=1)
    return {"threads": torch.get_num_threads(),
            **{name: {"ms": None if t.median is None else t.median * 1e3, "min_ms": None if t.min is None else
                      t.min * 1e3, "x_plain": t.ratio, "x_eager": t.ratio_to(res["eager"]), "error": t.error}
               for name, t in res.items()}}


def worker_mem(case, s, backward):
    call, small = _setup(s, backward)
    call(case, small)
    del small
    mem = bm.peak_memory(lambda: call(case))
    return {"mem_mib": mem.bytes / 2**20, "mem_method": mem.method}


def _sub(args):
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": ((proc.stderr.strip().splitlines() or ["?"])[-1])[:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--passes", nargs="+", default=list(PASSES), choices=PASSES)
    ap.add_argument("--bwd-sizes", type=int, nargs="+", help="the sizes of the fwd+bwd rows (default: --sizes)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "cpu_key_mass"), help="path stem of .md/.json")
    ap.add_argument("--worker", nargs=3, metavar=("KIND", "S", "PASS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind, s, p = args.worker
        res = (worker_time(int(s), p == "fwd+bwd", args.reps) if kind == "time"
               else worker_mem(kind, int(s), p == "fwd+bwd"))
        print(json.dumps(res))
        return

    notes = [
        f"B=1, H={B.H}, D={B.D}, causal, float32, C={C} classes in 4 spans (system 10%, image 60%, user 20%, "
        "response 10%), query classes = key classes. fwd+bwd: loss on out (avar_plain) or on out + key_mass "
        "(avar_key_mass, eager). `x plain` / `x eager` = median over the repetitions of time(case) / "
        "time(avar_plain) and / time(eager), the three timed interleaved in one subprocess "
        f"({args.reps} repetitions after one warm-up call each). `peak MiB` = peak memory of the case's first "
        "full-size call beyond the inputs, in a fresh subprocess (outputs and gradients included; resident-set "
        "high-water mark, avar_kernels.benchmark.peak_memory). `threads` = torch.get_num_threads() of the timing "
        "subprocess.",
    ]
    columns = ["S", "pass", "case", "ms", "x plain", "x eager", "peak MiB", "threads"]
    report = bm.Report("CPU backend: key masses (issue 11), time ratios and peak memory", columns, notes=notes,
                       path=args.out, digits={"x plain": 3, "x eager": 3, "peak MiB": 0})
    for s in args.sizes:
        for p in args.passes:
            if p == "fwd+bwd" and args.bwd_sizes is not None and s not in args.bwd_sizes:
                continue
            timing = _sub(["--worker", "time", str(s), p, "--reps", str(args.reps)])
            for case in CASES:
                row = {"S": s, "pass": p, "case": case, "threads": timing.get("threads")}
                t = timing.get(case) or {"error": timing.get("error")}
                row.update({"ms": t.get("ms"), "min_ms": t.get("min_ms"), "x plain": t.get("x_plain"),
                            "x eager": t.get("x_eager"), "error": t.get("error")})
                if not args.no_memory:
                    mem = _sub(["--worker", case, str(s), p])
                    row.update({"peak MiB": mem.get("mem_mib"), "mem_method": mem.get("mem_method"),
                                "mem_error": mem.get("error")})
                if row.get("error"):
                    row["ms"] = "failed: " + str(row["error"])[:60]
                report.add(row)
                print(f"S={s} {p:8s} {case:14s} {bm.fmt(row.get('ms'))} ms  x{bm.fmt(row.get('x plain'), 3)} plain  "
                      f"x{bm.fmt(row.get('x eager'), 3)} eager  peak {bm.fmt(row.get('peak MiB'), 0)} MiB", flush=True)
    print(f"wrote {args.out}.md, .json, .csv")


if __name__ == "__main__":
    main()
