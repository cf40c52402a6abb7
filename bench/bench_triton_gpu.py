#!/usr/bin/env python
"""Prefill benchmark on a GPU: ak.attention (the Triton backend, through its autograd) against stock attention.

Forward and forward+backward TFLOP/s, every method of a shape timed interleaved in one run
(avar_kernels.benchmark.compare: CUDA events, medians, ratios to sdpa_flash from the same repetitions), bf16,
H=16, D=128, causal, B x S = 16k tokens, S in {4k, 8k, 16k}; peak memory of one forward+backward. Methods:

  avar           ak.attention, no classes (plain attention)
  avar_mass      ak.attention with C=5 classes: out + masses; the backward goes through both
  avar_mass_vaf  the same with a VAF table (user and response queries: image keys MUL +0.15)
  avar_keymass   ak.attention with C=5 classes and return_key_mass=True: out + masses + key masses (the fused
                 second pass over key blocks); the backward goes through all three (a loss on key masses adds
                 the row-major delta kernel and the dKM term in dQ and dK/dV)
  sdpa_flash     SDPA, FLASH_ATTENTION backend (the baseline of every ratio)
  sdpa_cudnn     SDPA, CUDNN_ATTENTION backend
  flex           FlexAttention, torch.compile'd, causal block mask
  flex_mass_vaf  FlexAttention with the VAF table as a class score_mod and C one-hot class columns in V
  sdpa_onehot    SDPA with C one-hot class columns appended to V (q, k zero-padded to D+8): masses, no table

Classes: `vlm` layout (system 10%, image 60%, user 20%, response 10% of every sequence) or `random` (one class
per token), --layout. FLOPs are the nominal ones of width D for every method (avar_kernels.benchmark.
attention_flops), so ratios equal time ratios; `/ avar_mass` columns: time of an avar method over avar_mass's
(the cost of key masses over the forward with row masses only). The forward runs under torch.no_grad. A method
that fails is reported with its error; past --budget seconds the optional methods are skipped. Writes
<out>.md/.json/.csv after every shape.

  python bench/bench_triton_gpu.py --out bench/results/gpu/prefill
  python bench/bench_triton_gpu.py --device cpu --seqlens 256 --tokens 512 --heads 2 --out /tmp/x  # script check
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import avar_kernels as ak  # noqa: E402
from avar_kernels import benchmark as bm  # noqa: E402

METHODS = ["avar", "avar_mass", "avar_mass_vaf", "avar_keymass", "sdpa_flash", "sdpa_cudnn", "flex", "flex_mass_vaf",
           "sdpa_onehot"]
ESSENTIAL = {"avar", "avar_mass", "avar_mass_vaf", "avar_keymass", "sdpa_flash"}
NUM_CLASSES = 5
ONEHOT_WIDTH = 8  # one-hot columns appended to V: C, padded to a multiple of 8


def key_classes(b: int, s: int, layout: str, device) -> torch.Tensor:
    if layout == "vlm":
        bounds = [0, s // 10, s // 10 + (6 * s) // 10, s - s // 10, s]
        ids = torch.empty(s, dtype=torch.int32)
        for cls, lo, hi in zip((ak.SYSTEM, ak.IMAGE, ak.USER, ak.RESPONSE), bounds[:-1], bounds[1:]):
            ids[lo:hi] = cls
        return ids.expand(b, s).contiguous().to(device)
    g = torch.Generator().manual_seed(s)
    return torch.randint(0, NUM_CLASSES, (b, s), generator=g, dtype=torch.int32).to(device)


def vaf_table(device) -> torch.Tensor:
    mul = torch.zeros(NUM_CLASSES, NUM_CLASSES, device=device)
    mul[[ak.USER, ak.RESPONSE], ak.IMAGE] = 0.15
    return mul


_FLEX = {}


def _compiled_flex():
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention
        # one compile per (shape, score_mod, backward): more than dynamo's default of 8 in a full run
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def build(method, q, k, v, kc):
    """q, k, v [B, S, H, D]. Returns (leaves, run) with run() -> [(output, grad_output), ...]."""
    b, s, h, d = q.shape
    dev = q.device
    if method.startswith("avar"):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        dout = torch.randn_like(q)
        classes = kc if method != "avar" else None
        rw = ak.Reweight(mul=vaf_table(dev)) if method == "avar_mass_vaf" else None
        dmass = torch.randn(b, h, s, NUM_CLASSES, device=dev) if classes is not None else None
        key_mass = method == "avar_keymass"
        dkm = torch.randn(b, h, s, NUM_CLASSES, device=dev) if key_mass else None

        def run():
            res = ak.attention(*leaves, classes, num_classes=NUM_CLASSES if classes is not None else None,
                               causal=True, reweight=rw, return_key_mass=key_mass)
            return ([(res.out, dout)] + ([(res.mass, dmass)] if classes is not None else [])
                    + ([(res.key_mass, dkm)] if key_mass else []))
        return leaves, run

    # SDPA and Flex in their native [B, H, S, D] layout
    leaves = [t.detach().transpose(1, 2).contiguous().requires_grad_(True) for t in (q, k, v)]
    qt, kt, vt = leaves
    scale = d ** -0.5
    onehot = F.one_hot(kc.long(), ONEHOT_WIDTH).to(q.dtype)[:, None].expand(b, h, s, ONEHOT_WIDTH)
    dout = torch.randn_like(qt)
    dout_wide = torch.randn(b, h, s, d + ONEHOT_WIDTH, device=dev, dtype=q.dtype)

    if method in ("sdpa_flash", "sdpa_cudnn"):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = SDPBackend.FLASH_ATTENTION if method == "sdpa_flash" else SDPBackend.CUDNN_ATTENTION

        def run():
            with sdpa_kernel(backend):
                return [(F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale), dout)]
        return leaves, run

    if method == "sdpa_onehot":
        def run():
            pad = (0, ONEHOT_WIDTH)
            o = F.scaled_dot_product_attention(F.pad(qt, pad), F.pad(kt, pad), torch.cat([vt, onehot], -1),
                                               is_causal=True, scale=scale)
            return [(o, dout_wide)]  # o[..., :D] = attention, o[..., D:D+C] = masses
        return leaves, run

    if method in ("flex", "flex_mass_vaf"):
        from torch.nn.attention.flex_attention import create_block_mask
        flex = _compiled_flex()
        block_mask = create_block_mask(lambda bb, hh, qi, ki: qi >= ki, B=None, H=None, Q_LEN=s, KV_LEN=s,
                                       device=dev)
        if method == "flex":
            def run():
                return [(flex(qt, kt, vt, block_mask=block_mask, scale=scale), dout)]
            return leaves, run
        cls = kc.long()
        table = vaf_table(dev)

        def score_mod(score, bb, hh, qi, ki):
            return score * (1.0 + table[cls[bb, qi], cls[bb, ki]])

        def run():
            o = flex(qt, kt, torch.cat([vt, onehot], -1), score_mod=score_mod, block_mask=block_mask, scale=scale)
            return [(o, dout_wide)]
        return leaves, run
    raise ValueError(f"method: expected one of {METHODS}, got {method!r}")


def fwd_fn(run):
    def fwd():
        with torch.no_grad():
            run()
    return fwd


def fwdbwd_fn(run, leaves):
    def fwdbwd():
        pairs = run()
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        for t in leaves:
            t.grad = None
    return fwdbwd


def measure_shape(args, s, report, t_start):
    b, h, d = max(1, args.tokens // s), args.heads, args.head_dim
    dev = torch.device(args.device)
    g = torch.Generator(device=dev).manual_seed(s)
    q, k, v = (torch.randn(b, s, h, d, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
    kc = key_classes(b, s, args.layout, dev)
    runs, skipped, errors = {}, {}, {}
    for method in args.methods:
        if method not in ESSENTIAL and time.time() - t_start > args.budget:
            skipped[method] = "skipped (time budget)"
            continue
        try:
            runs[method] = build(method, q, k, v, kc)
        except Exception as exc:  # a baseline missing on this machine is reported, never fatal
            errors[method] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}"
    fwd = bm.compare({m: fwd_fn(r) for m, (_, r) in runs.items()}, baseline="sdpa_flash"
                     if "sdpa_flash" in runs else None, device=dev, reps=args.reps, warmup=args.warmup)
    fb = bm.compare({m: fwdbwd_fn(r, leaves) for m, (leaves, r) in runs.items()}, baseline="sdpa_flash"
                    if "sdpa_flash" in runs else None, device=dev, reps=args.reps, warmup=args.warmup)
    flops = bm.attention_flops(b, h, s, s, d, causal=True)

    def over_mass(timings, method):  # time over avar_mass's (the forward / training step with row masses only)
        base = timings.get("avar_mass")
        if not method.startswith("avar") or base is None or base.median is None or timings[method].median is None:
            return None
        return timings[method].median / base.median
    for method in args.methods:
        row = {"S": s, "B": b, "method": method, "layout": args.layout if "mass" in method or "onehot" in method
               else "-"}
        if method in runs:
            tf, tb = fwd[method], fb[method]
            leaves, run = runs[method]
            mem = bm.peak_memory(fwdbwd_fn(run, leaves), dev) if tb.error is None else None
            row.update({
                "fwd ms": None if tf.median is None else tf.median * 1e3,
                "fwd TFLOP/s": None if tf.median is None else flops / tf.median / 1e12,
                "fwd x flash": None if tf.ratio is None else 1 / tf.ratio,
                "fwd / avar_mass": over_mass(fwd, method),
                "fwd+bwd ms": None if tb.median is None else tb.median * 1e3,
                "fwd+bwd TFLOP/s": None if tb.median is None else 3.5 * flops / tb.median / 1e12,
                "fwd+bwd x flash": None if tb.ratio is None else 1 / tb.ratio,
                "fwd+bwd / avar_mass": over_mass(fb, method),
                "peak MiB": None if mem is None else mem.bytes / 2**20,
                "error": tf.error or tb.error,
            })
        else:
            row["error"] = errors.get(method) or skipped.get(method)
        report.add(row)
        print(f"S={s} B={b} {method:14s} fwd {bm.fmt(row.get('fwd TFLOP/s'))} TFLOP/s "
              f"(x{bm.fmt(row.get('fwd x flash'), 2)})  fwd+bwd {bm.fmt(row.get('fwd+bwd TFLOP/s'))} TFLOP/s "
              f"(x{bm.fmt(row.get('fwd+bwd x flash'), 2)})  peak {bm.fmt(row.get('peak MiB'), 0)} MiB"
              + (f"  time / avar_mass: fwd {bm.fmt(row['fwd / avar_mass'], 2)}, fwd+bwd "
                 f"{bm.fmt(row.get('fwd+bwd / avar_mass'), 2)}" if row.get("fwd / avar_mass") is not None else "")
              + (f"  [{row['error']}]" if row.get("error") else ""), flush=True)
    runs.clear()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def summary(rows, methods) -> str:
    """The issue's table: TFLOP/s per (pass, S) and method."""
    lines = ["| pass, S | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for key, label in (("fwd TFLOP/s", "fwd"), ("fwd+bwd TFLOP/s", "fwd+bwd")):
        for s in sorted({r["S"] for r in rows}):
            cells = {r["method"]: r.get(key) for r in rows if r["S"] == s}
            lines.append(f"| {label} {s} | " + " | ".join(bm.fmt(cells.get(m), 0) for m in methods) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results/gpu/prefill", help="path stem of the .md/.json/.csv")
    p.add_argument("--seqlens", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--tokens", type=int, default=16384, help="B x S")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--layout", choices=["vlm", "random"], default="vlm")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3, help="calls per method before timing (compile, autotune)")
    p.add_argument("--budget", type=float, default=360.0, help="seconds; past it only the avar methods and "
                   "sdpa_flash are measured")
    p.add_argument("--device", default="cuda")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device (use --device cpu to check the script)", file=sys.stderr)
        return 2
    notes = [f"bf16, H={args.heads}, D={args.head_dim}, causal, B x S = {args.tokens} tokens, C={NUM_CLASSES} "
             f"classes in the `{args.layout}` layout for the mass methods. TFLOP/s from the nominal attention FLOPs "
             "of width D (forward+backward = 3.5x forward); `x flash` = speed relative to sdpa_flash from the same "
             f"interleaved repetitions (> 1: faster); medians of {args.reps} repetitions after {args.warmup} "
             "warm-up calls (CUDA events). Forward under torch.no_grad; forward+backward through autograd with "
             "random output gradients (out and masses; key masses too for avar_keymass). `peak MiB` = "
             "torch.cuda.max_memory_allocated of one "
             "forward+backward beyond the inputs. "
             f"AVAR_TRITON_AUTOTUNE={os.environ.get('AVAR_TRITON_AUTOTUNE', 'default')}."]
    columns = ["S", "B", "method", "layout", "fwd ms", "fwd TFLOP/s", "fwd x flash", "fwd / avar_mass", "fwd+bwd ms",
               "fwd+bwd TFLOP/s", "fwd+bwd x flash", "fwd+bwd / avar_mass", "peak MiB", "error"]
    report = bm.Report("Prefill: ak.attention (Triton) against stock attention", columns, device=args.device,
                       notes=notes, path=args.out, digits={"fwd x flash": 2, "fwd+bwd x flash": 2, "peak MiB": 0,
                                                           "fwd / avar_mass": 2, "fwd+bwd / avar_mass": 2})
    t_start = time.time()
    for s in args.seqlens:
        measure_shape(args, s, report, t_start)
    report.notes.append("TFLOP/s by pass and sequence length:\n\n" + summary(report.rows, args.methods))
    from avar_kernels.triton import tuned_configs
    chosen = tuned_configs()
    if chosen:  # which tile and which formulation of the class terms (MASS_DOT) won, per kernel and tuning key
        report.notes.append("Autotuner's choices (kernel, tuning key: config):\n\n"
                            + "\n".join(f"- `{line}`" for line in chosen))
    report.write()
    print(report.markdown())
    print(f"total {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
