"""Decode benchmark on a GPU: the CUDA split-KV kernel (attention_with_kvcache) against SDPA and the Triton backend.

Shape (default): B=8, Hq=28, Hk=4 (Qwen2.5-7B-like GQA), D=128, bf16, Sq=1, Sk in {4k, 32k, 128k}, every cache
full (cache_seqlens = Sk), 6 key classes (the masses are computed). Reported per Sk:

* time of each op (triton.testing.do_bench when available, else CUDA events), all in one run on one machine;
* achieved bandwidth of our kernel = bytes of K and V read / time, and its share of the GPU's peak HBM bandwidth
  (H100 SXM 3.35 TB/s, H200 4.8 TB/s, ...; looked up by device name, else computed from the memory clock and bus
  width that torch reports);
* speed ratios: SDPA time / ours (SDPA with the same GQA shape, enable_gqa=True, no masses) and Triton time /
  ours (avar_kernels.attention_varlen(..., backend="triton") on the packed form of the same shape, with masses).
  A ratio > 1 means our kernel is faster. An op that fails is reported as n/a with its error.

``--dry-run`` runs without CUDA (fake timings) to check the script and the table format.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PEAK_BW = [  # (substring of the device name, bytes/s), first match wins
    ("H200", 4.8e12),
    ("H100 PCIE", 2.0e12),
    ("H100 NVL", 3.9e12),
    ("H100", 3.35e12),
    ("H800", 3.35e12),
    ("GH200", 4.0e12),
    ("B200", 8.0e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIE", 1.935e12),
    ("A100", 1.555e12),
    ("L40S", 0.864e12),
    ("A10G", 0.6e12),
    ("L4", 0.3e12),
]


def peak_bandwidth(device_name: str, props=None):
    """(bytes/s, source) of the GPU's peak HBM bandwidth."""
    up = device_name.upper()
    for key, bw in PEAK_BW:
        if key.upper() in up:
            return bw, f"table ({key})"
    if props is not None:
        clock_khz = getattr(props, "memory_clock_rate", None)
        bus_bits = getattr(props, "memory_bus_width", None)
        if clock_khz and bus_bits:
            return 2.0 * clock_khz * 1e3 * bus_bits / 8, "memory clock x bus width (DDR)"
    return None, "unknown"


def bench_fn(fn, warmup=10, rep=50):
    """Milliseconds per call (median)."""
    try:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    except Exception:  # no triton (or an old do_bench): CUDA events
        pass
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rep):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2]


def run_case(args, sk, dtype, device):
    import avar_kernels as ak
    from avar_kernels.kvcache import attention_with_kvcache

    b, sq, hq, hk, d, c = args.batch, args.sq, args.hq, args.hk, args.d, args.classes
    gen = torch.Generator(device=device).manual_seed(sk)
    q = torch.randn(b, sq, hq, d, device=device, dtype=dtype, generator=gen)
    k = torch.randn(b, sk, hk, d, device=device, dtype=dtype, generator=gen)
    v = torch.randn(b, sk, hk, d, device=device, dtype=dtype, generator=gen)
    seqlens = torch.full((b,), sk, dtype=torch.int32, device=device)
    kc = torch.randint(0, c, (b, sk), device=device, dtype=torch.int32, generator=gen) if c else None
    row = {"Sk": sk, "B": b, "Sq": sq, "Hq": hq, "Hk": hk, "D": d, "C": c, "dtype": str(dtype).replace("torch.", "")}
    kv_bytes = 2 * b * sk * hk * d * k.element_size()
    row["kv_MB"] = kv_bytes / 1e6

    def timed(name, fn):
        try:
            fn()
            torch.cuda.synchronize()
            row[f"{name}_ms"] = bench_fn(fn)
        except Exception as exc:  # reported, never hidden
            row[f"{name}_ms"] = None
            row[f"{name}_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"

    from avar_kernels import kvcache

    # ours: the binding + kernels (what a generation loop pays once the classes are prepared); ours_api: the
    # public function, whose argument checks read cache_seqlens and the classes on the host (syncs) every call.
    qc = kc[:, sk - sq:].contiguous() if kc is not None else None
    timed("ours", lambda: kvcache._run_cuda(q, k, v, seqlens, kc, None, qc, c, (None, None, None), d ** -0.5, True))
    timed("ours_api", lambda: attention_with_kvcache(q, k, v, seqlens, kc, num_classes=c or None, backend="cuda"))
    if c:
        timed("ours_nomass", lambda: kvcache._run_cuda(q, k, v, seqlens, None, None, None, 0, (None, None, None),
                                                       d ** -0.5, True))

    qs, ks, vs = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    timed("sdpa", lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=False,
                                                                           enable_gqa=True))
    del qs, ks, vs

    cu_q = torch.arange(0, (b + 1) * sq, sq, dtype=torch.int32, device=device)
    cu_k = torch.arange(0, (b + 1) * sk, sk, dtype=torch.int32, device=device)
    qp, kp, vp = q.reshape(b * sq, hq, d), k.reshape(b * sk, hk, d), v.reshape(b * sk, hk, d)
    kcp = kc.reshape(-1) if kc is not None else None
    qcp = kc[:, sk - sq:].reshape(-1) if kc is not None else None
    timed("triton", lambda: ak.attention_varlen(qp, kp, vp, cu_q, cu_k, sq, sk, kcp, query_class=qcp,
                                                num_classes=c or None, causal=True, backend="triton"))
    return row


def finish_row(row, peak):
    ours = row.get("ours_ms")
    if ours:
        bw = row["kv_MB"] * 1e6 / (ours * 1e-3)
        row["ours_GBps"] = bw / 1e9
        row["pct_peak"] = 100.0 * bw / peak if peak else None
    # SDPA is a bare kernel call: compared with ours (binding + kernels). The Triton backend goes through the public
    # attention_varlen, whose checks sync with the host like ours_api: compared with ours_api.
    for base, mine in (("sdpa", ours), ("triton", row.get("ours_api_ms"))):
        t = row.get(f"{base}_ms")
        row[f"speedup_vs_{base}"] = (t / mine) if (t and mine) else None
    return row


def fmt(x, nd=3):
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


COLUMNS = ["Sk", "kv_MB", "ours_ms", "ours_api_ms", "ours_nomass_ms", "ours_GBps", "pct_peak", "sdpa_ms", "speedup_vs_sdpa",
           "triton_ms", "speedup_vs_triton"]


def to_markdown(rows, header):
    lines = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c), 1 if c in ("kv_MB", "ours_GBps", "pct_peak") else 3)
                                       for c in COLUMNS) + " |")
    errors = [(r["Sk"], k, v) for r in rows for k, v in r.items() if k.endswith("_error")]
    if errors:
        lines += ["", "Errors (n/a above):"] + [f"- Sk={sk} {k[:-6]}: {v}" for sk, k, v in errors]
    lines += ["", "speedup_vs_sdpa = time(SDPA) / time(ours), speedup_vs_triton = time(triton via attention_varlen) / "
              "time(ours_api): > 1 means the CUDA decode kernel is faster. "
              "ours (binding + kernels) and ours_api (the public function, host-side checks included) compute the "
              "class masses (C classes), ours_nomass none; SDPA computes no masses. Bandwidth and % peak are of ours."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--hq", type=int, default=28)
    p.add_argument("--hk", type=int, default=4)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--sq", type=int, default=1)
    p.add_argument("--classes", type=int, default=6, help="key classes (0: no masses)")
    p.add_argument("--sk", type=int, nargs="+", default=[4096, 32768, 131072])
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--out-md", default=None)
    p.add_argument("--out-csv", default=None)
    p.add_argument("--dry-run", action="store_true", help="no GPU: fake timings, checks the script and the table")
    args = p.parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16

    rows = []
    if args.dry_run:
        name, peak, src = "dry-run (no GPU)", 3.35e12, "table (H100)"
        for sk in args.sk:
            kv = 2 * args.batch * sk * args.hk * args.d * 2
            row = {"Sk": sk, "kv_MB": kv / 1e6, "ours_ms": kv / 2.5e12 * 1e3, "ours_nomass_ms": kv / 2.6e12 * 1e3,
                   "ours_api_ms": kv / 2.5e12 * 1e3 + 0.1,
                   "sdpa_ms": kv / 1.5e12 * 1e3, "triton_ms": None, "triton_error": "RuntimeError: dry run"}
            rows.append(finish_row(row, peak))
    else:
        if not torch.cuda.is_available():
            p.error("needs a CUDA GPU (use --dry-run to check the script without one)")
        props = torch.cuda.get_device_properties(0)
        name = props.name
        peak, src = peak_bandwidth(name, props)
        for sk in args.sk:
            row = finish_row(run_case(args, sk, dtype, "cuda"), peak)
            rows.append(row)
            print({k: fmt(v) for k, v in row.items()}, flush=True)
            torch.cuda.empty_cache()

    header = (f"## Decode: B={args.batch}, Hq={args.hq}, Hk={args.hk}, D={args.d}, Sq={args.sq}, {args.dtype}, "
              f"C={args.classes}\n\nDevice: {name}; peak HBM bandwidth {fmt(peak / 1e12 if peak else None, 2)} TB/s "
              f"({src}); torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M')}")
    md = to_markdown(rows, header)
    print(md)
    if args.out_md:
        with open(args.out_md, "w") as f:
            f.write(md)
    if args.out_csv:
        keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in COLUMNS, COLUMNS.index(k) if k in COLUMNS else 0, k))
        with open(args.out_csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            for r in rows:
                w.writerow({k: r.get(k) for k in keys})


if __name__ == "__main__":
    main()
