#!/usr/bin/env python
"""CPU benchmark table (no pytest): time ratios to torch SDPA and peak memory, one subprocess per case.

    python bench/run_cpu.py --sizes 2048 4096 --out bench/results/cpu.md

Cases are those of bench/bench_attention_cpu.py (B=1, H=16, D=128, causal, fp32, C=4) plus
flex_mass_rw (FlexAttention compiled, class-wise score_mod + one-hot columns in V; forward only).
Each (case, S, pass) runs in a fresh subprocess which
  1. builds the inputs and reads its peak RSS (resource.getrusage maxrss),
  2. runs the case once and reads the peak RSS again: the difference is the case's peak memory beyond
     the inputs (outputs and gradients included),
  3. times the case and SDPA (same pass) interleaved, --reps times each, and reports the median of the
     per-pair ratios (robust to the load of a shared machine) and the minimum times.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

CASES = ["sdpa", "sdpa_onehot", "eager", "flex_mass_rw", "avar", "avar_vaf"]
FORWARD_ONLY = {"flex_mass_rw"}


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _flex_fn(s):
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import bench_attention_cpu as B

    kc = B.key_classes(s)[0].long()
    mul = torch.zeros(B.C, B.C)
    mul[B.TEXT, B.IMAGE] = 0.15
    mul[B.TEXT, B.SYSTEM] = -0.40

    def score_mod(score, b, h, qi, kj):
        return score * (1 + mul[kc[qi], kc[kj]])

    def causal(b, h, qi, kj):
        return qi >= kj

    bm = create_block_mask(causal, None, None, s, s, device="cpu")
    flex = torch.compile(flex_attention)
    onehot = torch.nn.functional.one_hot(kc, B.C).float()[None, None].expand(1, B.H, -1, -1)

    def run(q, k, v, _kc):
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        pad = (0, B.C)
        o = flex(torch.nn.functional.pad(qt, pad), torch.nn.functional.pad(kt, pad), torch.cat([vt, onehot], -1),
                 score_mod=score_mod, block_mask=bm, scale=B.D ** -0.5)
        return o[..., :B.D], o[..., B.D:]

    return run


def worker(case: str, s: int, backward: bool, reps: int) -> dict:
    import torch

    import bench_attention_cpu as B

    q, k, v, kc = B.make_inputs(s, backward)
    if case == "flex_mass_rw":
        fn = _flex_fn(s)
        with torch.no_grad():
            fn(q, k, v, kc)  # compile first: its memory is not the kernel's
        run = lambda: fn(q, k, v, kc)  # noqa: E731
    else:
        def run():
            return B.step(case, q, k, v, kc, backward)
    base = lambda: B.step("sdpa", q, k, v, kc, backward)  # noqa: E731
    ctx = torch.no_grad if not backward else torch.enable_grad
    if case != "flex_mass_rw":  # one-time library initialisation (extension load, BLAS buffers) is no peak
        small = B.make_inputs(64, backward)
        with ctx():
            B.step(case, *small, backward)
            B.step("sdpa", *small, backward)
        del small
    with ctx():
        rss0 = _maxrss_bytes()
        outs = run()
        del outs
        rss1 = _maxrss_bytes()
        base()
        ts, tb, ratios = [], [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            base()
            t1 = time.perf_counter()
            run()
            t2 = time.perf_counter()
            tb.append(t1 - t0)
            ts.append(t2 - t1)
            ratios.append((t2 - t1) / (t1 - t0))
    mem = None if case == "flex_mass_rw" else rss1 - rss0
    return {"case": case, "s": s, "pass": "fwd+bwd" if backward else "fwd", "time": min(ts), "sdpa": min(tb),
            "ratio": statistics.median(ratios), "mem": mem}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--cases", nargs="+", default=CASES)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "cpu.md"))
    ap.add_argument("--worker", nargs=3, metavar=("CASE", "S", "PASS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        case, s, p = args.worker
        print(json.dumps(worker(case, int(s), p == "fwd+bwd", args.reps)))
        return

    import torch

    rows = []
    for s in args.sizes:
        for p in ("fwd", "fwd+bwd"):
            for case in args.cases:
                if p == "fwd+bwd" and case in FORWARD_ONLY:
                    continue
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", case, str(s), p, "--reps", str(args.reps)]
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode != 0:
                    err = (r.stderr.strip().splitlines() or ["?"])[-1]
                    print(f"S={s} {p} {case}: failed: {err}", flush=True)
                    rows.append({"case": case, "s": s, "pass": p, "error": err[:80]})
                    continue
                row = json.loads(r.stdout.strip().splitlines()[-1])
                rows.append(row)
                mem = "n/a" if row["mem"] is None else f"{row['mem'] / 2**20:.0f} MiB"
                print(f"S={s} {p:8s} {case:13s} {row['time'] * 1e3:8.1f} ms  x{row['ratio']:.3f} of sdpa  "
                      f"peak +{mem}", flush=True)

    lines = [
        "# CPU backend: time ratios to torch SDPA and peak memory",
        "",
        f"B=1, H=16, D=128, causal, float32, C=4 (10% system, 60% image, 30% text keys); torch {torch.__version__}, "
        f"{os.cpu_count()} CPU threads. Ratio = median over {args.reps} interleaved (case, SDPA) pairs of "
        "time(case) / time(SDPA) in the same subprocess; peak = maxrss increase of the first call beyond the "
        "inputs (outputs and gradients included).",
        "",
        f"Command: `python bench/run_cpu.py --sizes {' '.join(map(str, args.sizes))} --reps {args.reps}`",
        "",
        "| S | pass | case | time (ms) | ratio to SDPA | peak extra memory (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['s']} | {r['pass']} | {r['case']} | failed | n/a | {r['error']} |")
            continue
        mem = "n/a" if r["mem"] is None else f"{r['mem'] / 2**20:.0f}"
        lines.append(f"| {r['s']} | {r['pass']} | {r['case']} | {r['time'] * 1e3:.1f} | {r['ratio']:.3f} | {mem} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
