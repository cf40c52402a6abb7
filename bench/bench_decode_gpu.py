#!/usr/bin/env python
"""Decode benchmark on a GPU: the CUDA split-KV kernel against SDPA's decode on the same cache, in one run.

Shape (default): B=8, Hq=28, Hk=4 (Qwen2.5-7B-like GQA), D=128, bf16, Sq=1, Sk in {4k, 32k, 128k}, every cache
full, C=6 key classes (the masses are computed). Per Sk, timed interleaved (avar_kernels.benchmark.compare, CUDA
events, --number back-to-back calls per sample, medians):

  kernel         the binding avar_kernels._cuda.decode_fwd (what a generation loop pays once its classes are
                 prepared): masses, C=6
  kernel_nomass  the same without classes
  kernel_keymass the same with key masses (key_mass=True: the forward, then the key-mass kernel over the cache);
                 `keymass x` = time(kernel_keymass) / time(kernel), the price of the key masses
  api            ak.attention_with_kvcache (the public function with its argument checks)
  sdpa           torch SDPA with enable_gqa on the same keys and values in its [B, Hk, Sk, D] layout, no masses
  triton         ak.attention_varlen(..., backend="triton") on the packed cache, with masses (--triton)

Bandwidth = bytes of K and V read / the kernel's median time, against the machine's copy bandwidth measured in
the same run (a device-to-device copy, bytes read + written per second; avar_kernels.benchmark.copy_bandwidth).
`splits` is the kernel's plan (key splits x resident CTA slots) from avar_kernels._cuda.decode_plan.
Writes <out>.md/.json/.csv after every Sk.

    python bench/bench_decode_gpu.py --out bench/results/gpu/decode
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import avar_kernels as ak  # noqa: E402
from avar_kernels import benchmark as bm  # noqa: E402


def cases(args, sk, dev):
    from avar_kernels import _cuda

    b, sq, hq, hk, d, c = args.batch, args.sq, args.hq, args.hk, args.d, args.classes
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    gen = torch.Generator(device=dev).manual_seed(sk)
    q = torch.randn(b, sq, hq, d, device=dev, dtype=dtype, generator=gen)
    k = torch.randn(b, sk, hk, d, device=dev, dtype=dtype, generator=gen)
    v = torch.randn(b, sk, hk, d, device=dev, dtype=dtype, generator=gen)
    seqlens = torch.full((b,), sk, dtype=torch.int32, device=dev)
    kc = torch.randint(0, c, (b, sk), device=dev, dtype=torch.int32, generator=gen)
    qc = kc[:, sk - sq:].contiguous()
    scale = d ** -0.5
    run = {
        "kernel": lambda: _cuda.decode_fwd(q, k, v, seqlens, kc, None, qc, c, None, None, None, scale, True, 0),
        "kernel_nomass": lambda: _cuda.decode_fwd(q, k, v, seqlens, None, None, None, 0, None, None, None, scale,
                                                  True, 0),
        "kernel_keymass": lambda: _cuda.decode_fwd(q, k, v, seqlens, kc, None, qc, c, None, None, None, scale, True, 0,
                                                   True),
        "api": lambda: ak.attention_with_kvcache(q, k, v, seqlens, kc, num_classes=c, backend="cuda"),
    }
    qs, ks, vs = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    run["sdpa"] = lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, enable_gqa=True)
    if args.triton:
        cu_q = torch.arange(0, (b + 1) * sq, sq, dtype=torch.int32, device=dev)
        cu_k = torch.arange(0, (b + 1) * sk, sk, dtype=torch.int32, device=dev)
        qp, kp, vp = q.reshape(b * sq, hq, d), k.reshape(b * sk, hk, d), v.reshape(b * sk, hk, d)
        run["triton"] = lambda: ak.attention_varlen(qp, kp, vp, cu_q, cu_k, sq, sk, kc.reshape(-1),
                                                    query_class=qc.reshape(-1), num_classes=c, causal=True,
                                                    backend="triton")
    plan = _cuda.decode_plan(b, sq, hq, hk, d, sk, dtype, dev.index or 0)
    return run, 2 * b * sk * hk * d * k.element_size(), plan


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--hq", type=int, default=28)
    p.add_argument("--hk", type=int, default=4)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--sq", type=int, default=1)
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--sk", type=int, nargs="+", default=[4096, 32768, 131072])
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--number", type=int, default=10, help="back-to-back calls per timed sample")
    p.add_argument("--triton", action="store_true", help="also time the Triton varlen path (compiles kernels)")
    p.add_argument("--out", default="bench/results/gpu/decode", help="path stem of the .md/.json/.csv")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    dev = torch.device("cuda", torch.cuda.current_device())
    copy_bw = bm.copy_bandwidth(dev)
    print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write)", flush=True)
    notes = [f"B={args.batch}, Hq={args.hq}, Hk={args.hk}, D={args.d}, Sq={args.sq}, {args.dtype}, C={args.classes}, "
             f"full caches. Measured copy bandwidth of this GPU: {copy_bw / 1e9:.0f} GB/s (bytes read + written). "
             f"Medians of {args.reps} samples of {args.number} back-to-back calls (CUDA events), all methods of an Sk "
             "interleaved. `GB/s` = K and V bytes / kernel time; `% copy` = that over the copy bandwidth; `x sdpa` = "
             "time(sdpa) / time(kernel) (> 1: the kernel is faster; SDPA computes no masses); `keymass x` = "
             "time(kernel_keymass) / time(kernel): decode with key masses [B, Hq, Sk, C] (a second kernel that reads K "
             "again and writes B*Hq*Sk*C floats) over decode without them."]
    columns = ["Sk", "KV MB", "splits", "kernel us", "GB/s", "% copy", "kernel_nomass us", "kernel_keymass us",
               "keymass x", "api us", "sdpa us", "x sdpa", "triton us", "errors"]
    report = bm.Report("Decode: CUDA split-KV kernel against SDPA on the same cache", columns, device=dev,
                       notes=notes, path=args.out,
                       digits={"GB/s": 0, "% copy": 1, "x sdpa": 2, "keymass x": 2, "KV MB": 0})
    for sk in args.sk:
        run, kv_bytes, (splits, keys, resident) = cases(args, sk, dev)
        res = bm.compare(run, baseline="kernel", device=dev, reps=args.reps, warmup=3, number=args.number)
        kernel = res["kernel"].median
        row = {"Sk": sk, "KV MB": kv_bytes / 1e6, "splits": f"{splits} x {keys} keys, {resident} slots"}
        for name, t in res.items():
            row[f"{name} us"] = None if t.median is None else t.median * 1e6
        if kernel:
            row["GB/s"] = kv_bytes / kernel / 1e9
            row["% copy"] = 100 * kv_bytes / kernel / copy_bw
            row["x sdpa"] = res["sdpa"].ratio
            row["keymass x"] = res["kernel_keymass"].ratio
        row["errors"] = "; ".join(f"{n}: {t.error}" for n, t in res.items() if t.error) or None
        row["copy GB/s"] = copy_bw / 1e9
        report.add(row)
        print({k: bm.fmt(v) for k, v in row.items()}, flush=True)
        del run
        torch.cuda.empty_cache()
    print(report.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
