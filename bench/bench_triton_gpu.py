#!/usr/bin/env python
"""GPU benchmark of the Triton backend against stock attention, in one run on one machine (SPEC 6).

Measures forward, backward and forward+backward TFLOP/s (triton.testing.do_bench, bf16, batch * seqlen =
16k tokens) for (D=128, H=16) and (D=64, H=32), S in {1k, 2k, 4k, 8k, 16k}, causal and not, for:

  avar            the Triton kernel, no classes (plain attention)
  avar_mass       the Triton kernel with C=4 classes (out + masses), backward through out and masses
  avar_mass_rw    the same plus a class-wise MUL table (the re-weighting)
  sdpa_flash      SDPA, FLASH_ATTENTION backend (the reference of every ratio)
  sdpa_cudnn      SDPA, CUDNN_ATTENTION backend
  flex            FlexAttention, torch.compile'd
  flex_mass_rw    FlexAttention with a class-wise score_mod and one-hot class columns appended to V
  vaug_sdpa       SDPA with C one-hot class columns appended to V (q, k zero-padded to width D+8):
                  output columns D..D+C are the masses
  eager           eager attention that keeps the weights (only up to --eager-max-s)

FLOPs are the nominal attention FLOPs of width D (4 B H S^2 D, halved when causal; backward 2.5x, both 3.5x)
for every method, so ratios equal time ratios. Peak memory is the extra allocation of one fwd+bwd.
A baseline that fails is printed and marked n/a. A time budget (--budget) keeps the run short: past it,
the optional baselines are skipped (marked "skipped") and only avar and sdpa_flash are measured.

  python bench/bench_triton_gpu.py --out bench/results/triton_h100.md      # writes .md and .csv
  python bench/bench_triton_gpu.py --dry-run --out /tmp/x.md              # no GPU: exercises the tables
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

METHODS = ["avar", "avar_mass", "avar_mass_rw", "sdpa_flash", "sdpa_cudnn", "flex", "flex_mass_rw", "vaug_sdpa",
           "eager"]
ESSENTIAL = {"avar", "avar_mass", "sdpa_flash"}
NUM_CLASSES = 4
TOKENS = 16 * 1024


# ----------------------------------------------------------------------------------------------------------
# Methods: each builder returns fn() -> (outputs tuple, grad_outputs tuple) closures
# ----------------------------------------------------------------------------------------------------------

class _AvarFn(torch.autograd.Function):
    """Autograd around the backend's packed forward/backward (what the dispatcher does, without checks)."""

    @staticmethod
    def forward(ctx, q, k, v, cu, max_s, kcls, c, mul, scale, wr):
        from avar_kernels import triton as T
        out, lse, mass = T.forward(q, k, v, cu, cu, max_s, max_s, kcls, kcls, c, mul, None, None, scale, -1, wr)
        ctx.save_for_backward(q, k, v, out, lse, mass, cu, kcls if kcls is not None else cu,
                              mul if mul is not None else lse)
        ctx.meta = (max_s, c, mul is not None, kcls is not None, scale, wr)
        return out, mass

    @staticmethod
    def backward(ctx, dout, dmass):
        from avar_kernels import triton as T
        q, k, v, out, lse, mass, cu, kcls, mul = ctx.saved_tensors
        max_s, c, has_mul, has_cls, scale, wr = ctx.meta
        dout = dout.contiguous()
        delta = (dout.float() * out.float()).sum(-1).transpose(0, 1)
        if c and dmass is not None:
            dmass = dmass.float().contiguous()
            delta = delta + (dmass * mass).sum(-1)
        else:
            dmass = None
        dq, dk, dv = T.backward(dout, dmass, delta.contiguous(), q, k, v, out, lse, cu, cu, max_s, max_s,
                                kcls if has_cls else None, kcls if has_cls else None, c,
                                mul if has_mul else None, None, None, scale, -1, wr)
        return dq, dk, dv, None, None, None, None, None, None, None


def make_inputs(b, s, h, d, device, dtype, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(b, s, h, d, device=device, dtype=dtype, generator=g)
    k = torch.randn(b, s, h, d, device=device, dtype=dtype, generator=g)
    v = torch.randn(b, s, h, d, device=device, dtype=dtype, generator=g)
    kcls = torch.randint(0, NUM_CLASSES, (b, s), device=device, generator=g, dtype=torch.int32)
    # classes in contiguous runs, as in a VLM prompt (template, image, system, user)
    kcls = torch.sort(kcls, dim=1).values.contiguous()
    mul = torch.zeros(h, NUM_CLASSES, NUM_CLASSES, device=device, dtype=torch.float32)
    mul[:, :, 1] = 0.15
    mul[:, :, 2] = -0.4
    return q, k, v, kcls, mul


def build(method, q, k, v, kcls, mul, causal):
    """q, k, v [B, S, H, D] (bf16). Returns run() -> (outputs, grad_outputs) with leaves requiring grad."""
    import torch.nn.functional as F
    b, s, h, d = q.shape
    scale = d ** -0.5
    C = NUM_CLASSES

    if method.startswith("avar"):
        cu = torch.arange(0, (b + 1) * s, s, device=q.device, dtype=torch.int32)
        qp, kp, vp = (t.reshape(b * s, h, d).detach().clone().requires_grad_(True) for t in (q, k, v))
        with_cls = method != "avar"
        kc = kcls.reshape(-1).contiguous() if with_cls else None
        c = C if with_cls else 0
        m = mul if method == "avar_mass_rw" else None
        wr = 0 if causal else -1
        dout = torch.randn_like(qp)
        dm = torch.randn(h, b * s, C, device=q.device) if with_cls else None

        def run():
            out, mass = _AvarFn.apply(qp, kp, vp, cu, s, kc, c, m, scale, wr)
            return (out, mass) if with_cls else (out,), (dout, dm) if with_cls else (dout,)
        return run, (qp, kp, vp)

    qt, kt, vt = (t.transpose(1, 2).detach().clone().requires_grad_(True) for t in (q, k, v))  # [B, H, S, D]
    dout = torch.randn_like(qt)

    if method in ("sdpa_flash", "sdpa_cudnn"):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        be = SDPBackend.FLASH_ATTENTION if method == "sdpa_flash" else SDPBackend.CUDNN_ATTENTION

        def run():
            with sdpa_kernel(be):
                out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=scale)
            return (out,), (dout,)
        return run, (qt, kt, vt)

    if method == "vaug_sdpa":
        w = d + 8  # C one-hot columns, padded to a multiple of 8
        onehot = torch.nn.functional.one_hot(kcls.long(), w - d).to(q.dtype)  # [B, S, 8]; classes < C
        onehot = onehot[:, None].expand(b, h, s, w - d)
        zpad = torch.zeros(b, h, s, w - d, device=q.device, dtype=q.dtype)
        dout_aug = torch.randn(b, h, s, w, device=q.device, dtype=q.dtype)

        def run():
            qa = torch.cat([qt, zpad], -1)
            ka = torch.cat([kt, zpad], -1)
            va = torch.cat([vt, onehot], -1)
            out = F.scaled_dot_product_attention(qa, ka, va, is_causal=causal, scale=scale)
            return (out,), (dout_aug,)  # out[..., :d] = attention, out[..., d:d+C] = masses
        return run, (qt, kt, vt)

    if method in ("flex", "flex_mass_rw"):
        from torch.nn.attention.flex_attention import create_block_mask
        flex_c = _compiled_flex()
        bm = None
        if causal:
            bm = create_block_mask(lambda bb, hh, qi, ki: qi >= ki, B=None, H=None, Q_LEN=s, KV_LEN=s,
                                   device=q.device)
        if method == "flex":
            def run():
                out = flex_c(qt, kt, vt, block_mask=bm, scale=scale)
                return (out,), (dout,)
            return run, (qt, kt, vt)
        w = d + 8
        onehot = torch.nn.functional.one_hot(kcls.long(), w - d).to(q.dtype)[:, None].expand(b, h, s, w - d)
        kc = kcls.long()
        tab = mul.to(torch.float32)
        dout_aug = torch.randn(b, h, s, w, device=q.device, dtype=q.dtype)

        def score_mod(score, bb, hh, qi, ki):
            return score * (1.0 + tab[hh, kc[bb, qi], kc[bb, ki]])

        def run():
            va = torch.cat([vt, onehot], -1)
            out = flex_c(qt, kt, va, score_mod=score_mod, block_mask=bm, scale=scale)
            return (out,), (dout_aug,)
        return run, (qt, kt, vt)

    if method == "eager":
        mask = torch.ones(s, s, device=q.device, dtype=torch.bool).tril() if causal else None

        def run():
            sc = torch.matmul(qt, kt.transpose(-1, -2)) * scale
            if mask is not None:
                sc = sc.masked_fill(~mask, float("-inf"))
            wts = torch.softmax(sc.float(), -1).to(q.dtype)  # kept: what output_attentions=True returns
            out = torch.matmul(wts, vt)
            return (out, wts), (dout, None)
        return run, (qt, kt, vt)

    raise ValueError(method)


_FLEX = None


def _compiled_flex():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


# ----------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------

def _bench(fn, warmup, rep):
    import triton.testing
    try:
        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    except TypeError:
        return triton.testing.do_bench(fn, warmup=warmup, rep=rep)


def measure(run, leaves, warmup, rep):
    """Returns dict(fwd_ms, bwd_ms, fwdbwd_ms, peak_mib)."""
    outs, gouts = run()  # compile / autotune
    pairs = [(o, g) for o, g in zip(outs, gouts) if g is not None]
    torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs])
    torch.cuda.synchronize()
    del outs

    def fwd():
        with torch.no_grad():
            run()

    def fwdbwd():
        o, g = run()
        pr = [(a, b) for a, b in zip(o, g) if b is not None]
        torch.autograd.grad([a for a, _ in pr], leaves, [b for _, b in pr])

    res = {"fwd_ms": _bench(fwd, warmup, rep)}
    outs, gouts = run()
    pairs = [(o, g) for o, g in zip(outs, gouts) if g is not None]

    def bwd():
        torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], retain_graph=True)

    res["bwd_ms"] = _bench(bwd, warmup, rep)
    del outs, gouts, pairs
    res["fwdbwd_ms"] = _bench(fwdbwd, warmup, rep)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fwdbwd()
    torch.cuda.synchronize()
    res["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    return res


def flops_fwd(b, h, s, d, causal):
    f = 4.0 * b * h * s * s * d
    return f / 2 if causal else f


# ----------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------

FIELDS = ["gpu", "D", "H", "B", "S", "causal", "method", "status", "fwd_ms", "bwd_ms", "fwdbwd_ms",
          "fwd_tflops", "bwd_tflops", "fwdbwd_tflops", "fwd_x_flash", "bwd_x_flash", "fwdbwd_x_flash", "peak_mib"]


def add_derived(rows):
    """TFLOP/s and speed ratios to sdpa_flash of the same shape (>1 = faster than SDPA-flash)."""
    flash = {}
    for r in rows:
        if r["method"] == "sdpa_flash" and r["status"] == "ok":
            flash[(r["D"], r["H"], r["S"], r["causal"])] = r
    for r in rows:
        ff = flops_fwd(r["B"], r["H"], r["S"], r["D"], r["causal"])
        for kind, mult in (("fwd", 1.0), ("bwd", 2.5), ("fwdbwd", 3.5)):
            ms = r.get(f"{kind}_ms")
            ok = r["status"] == "ok" and ms is not None and ms > 0 and math.isfinite(ms)
            r[f"{kind}_tflops"] = ff * mult / (ms * 1e-3) / 1e12 if ok else None
            fr = flash.get((r["D"], r["H"], r["S"], r["causal"]))
            r[f"{kind}_x_flash"] = (fr[f"{kind}_ms"] / ms) if ok and fr is not None else None
    return rows


def _fmt(x, nd=1):
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def write_tables(rows, path, gpu, args):
    rows = sorted(rows, key=lambda r: (-r["D"], r["S"], not r["causal"], METHODS.index(r["method"])))
    base, _ = os.path.splitext(path)
    csv_path = base + ".csv"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in FIELDS})
    lines = [f"# Triton backend vs stock attention on {gpu}", "",
             f"torch {torch.__version__}, triton {_triton_version()}, bf16, batch x seqlen = {TOKENS} tokens, "
             f"C = {NUM_CLASSES} classes for the *_mass methods. TFLOP/s use the nominal FLOPs of width D for every "
             f"method (causal halves them; backward = 2.5x, fwd+bwd = 3.5x forward); (x) is the speed ratio to "
             f"sdpa_flash of the same row (>1 faster). Peak = extra MiB allocated by one fwd+bwd. "
             f"do_bench warmup={args.warmup} ms, rep={args.rep} ms.", ""]
    for (d, h) in sorted({(r["D"], r["H"]) for r in rows}, reverse=True):
        lines += [f"## D = {d}, H = {h}", "",
                  "| S | causal | method | fwd TFLOP/s (x) | bwd TFLOP/s (x) | fwd+bwd TFLOP/s (x) | peak MiB |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            if (r["D"], r["H"]) != (d, h):
                continue
            if r["status"] != "ok":
                cells = [r["status"]] * 3 + ["n/a"]
            else:
                cells = [f"{_fmt(r[f'{k}_tflops'])} ({_fmt(r[f'{k}_x_flash'], 2)})" for k in ("fwd", "bwd", "fwdbwd")]
                cells.append(_fmt(r.get("peak_mib"), 0))
            lines.append(f"| {r['S']} | {'yes' if r['causal'] else 'no'} | {r['method']} | " + " | ".join(cells) + " |")
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {path} and {csv_path}")


def _triton_version():
    try:
        import triton
        return triton.__version__
    except Exception:
        return "n/a"


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------

def plan(args):
    """Shapes in priority order: the judged shape (S=8k, D=128, causal) first."""
    shapes = []
    for d, h in args.configs:
        for s in args.seqlens:
            for causal in (True, False):
                shapes.append((d, h, s, causal))

    def prio(x):
        d, h, s, causal = x
        return (0 if (d, s) == (128, 8192) else 1, 0 if s == 8192 else 1, -d, not causal, s)
    return sorted(shapes, key=prio)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results/triton_gpu.md", help="markdown path; the CSV goes beside it")
    p.add_argument("--seqlens", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--configs", type=lambda s: [tuple(int(y) for y in x.split("x")) for x in s.split(",")],
                   default=[(128, 16), (64, 32)], help="DxH list, e.g. 128x16,64x32")
    p.add_argument("--methods", type=lambda s: s.split(","), default=METHODS)
    p.add_argument("--flex-seqlens", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 8192],
                   help="S values where FlexAttention runs (each shape is a fresh torch.compile)")
    p.add_argument("--eager-max-s", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rep", type=int, default=40)
    p.add_argument("--budget", type=float, default=240.0,
                   help="seconds; past it only avar and sdpa_flash run, past 1.4x it the run stops")
    p.add_argument("--dry-run", action="store_true", help="no GPU: fake timings, exercises planning and tables")
    args = p.parse_args(argv)
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"unknown methods {bad}; choose from {METHODS}")
    return args


def main(argv=None):
    args = parse_args(argv)
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("no CUDA device: use --dry-run to check the script without a GPU", file=sys.stderr)
        return 2
    gpu = "dry-run (no GPU)" if dry else torch.cuda.get_device_name()
    print(f"GPU: {gpu}")
    t0 = time.time()
    rows = []
    for d, h, s, causal in plan(args):
        b = max(1, TOKENS // s)
        inputs = None
        elapsed = time.time() - t0
        if elapsed > 1.4 * args.budget:
            print(f"time budget exhausted ({elapsed:.0f}s): stopping")
            break
        for method in args.methods:
            row = {"gpu": gpu, "D": d, "H": h, "B": b, "S": s, "causal": causal, "method": method, "status": "ok"}
            rows.append(row)
            over = time.time() - t0 > args.budget
            if over and method not in ESSENTIAL:
                row["status"] = "skipped"
                continue
            if method.startswith("flex") and s not in args.flex_seqlens:
                row["status"] = "skipped"
                continue
            if method == "eager" and s > args.eager_max_s:
                row["status"] = "too big"
                continue
            if dry:
                if method == "sdpa_cudnn" and s == 1024:
                    row["status"] = "n/a"  # exercises the failure path
                    continue
                ff = flops_fwd(b, h, s, d, causal)
                row.update(fwd_ms=ff / 400e12 * 1e3, bwd_ms=2.5 * ff / 300e12 * 1e3, fwdbwd_ms=3.5 * ff / 320e12 * 1e3,
                           peak_mib=100.0)
                continue
            ts = time.time()
            try:
                if inputs is None:
                    inputs = make_inputs(b, s, h, d, "cuda", torch.bfloat16)
                run, leaves = build(method, *inputs, causal)
                row.update(measure(run, leaves, args.warmup, args.rep))
                print(f"D={d} H={h} S={s} causal={causal} {method}: fwd {row['fwd_ms']:.3f} ms, "
                      f"bwd {row['bwd_ms']:.3f} ms, fwd+bwd {row['fwdbwd_ms']:.3f} ms, "
                      f"peak {row['peak_mib']:.0f} MiB ({time.time() - ts:.1f}s)", flush=True)
            except Exception as e:  # a baseline that fails is reported, never fatal
                row["status"] = "n/a"
                msg = str(e).strip().splitlines()
                print(f"D={d} H={h} S={s} causal={causal} {method}: FAILED {type(e).__name__}: "
                      f"{msg[0][:300] if msg else ''}", flush=True)
                if os.environ.get("BENCH_TRACEBACK"):
                    traceback.print_exc()
            finally:
                run = leaves = None
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    add_derived(rows)
    write_tables(rows, args.out, gpu, args)
    print(f"total {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
