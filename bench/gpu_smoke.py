#!/usr/bin/env python
"""GPU correctness smoke test (about 30 s of checks after the Triton compiles): prefill forward and backward
through ak.attention (the Triton backend) and decode through attention_with_kvcache (the CUDA kernel), each
against the float64 reference with the FlashAttention rule of tests/helpers.py (fa_close), at a few shapes:
GQA, MQA, masses, re-weighting tables, fp16 and bf16, split and unsplit decode. Also checks that the decode
split plan of the benchmark shape fills one wave. Every case is reported (ok / FAIL with the message); exit
status 1 if any failed. Writes <out>.md/.json/.csv after every case.

    python bench/gpu_smoke.py --out bench/results/gpu/smoke
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import helpers as H  # noqa: E402

import avar_kernels as ak  # noqa: E402
from avar_kernels import benchmark as bm  # noqa: E402

# (name, B, S, Hq, Hk, D, C, reweight kind of tests/helpers.random_reweight, causal, dtype)
PREFILL = [
    ("gqa_masses", 2, 300, 8, 2, 128, 5, "none", True, torch.bfloat16),
    ("vaf_table", 1, 1024, 16, 16, 128, 5, "vaf", True, torch.bfloat16),
    ("mixed_tables_noncausal", 1, 513, 4, 4, 64, 3, "mixed", False, torch.float16),
    ("mqa_d256_add", 1, 200, 4, 1, 256, 8, "add", True, torch.bfloat16),
    ("plain", 2, 777, 8, 8, 128, 0, "none", True, torch.bfloat16),
]
# (name, lens, Sq, Hq, Hk, D, C, reweight, causal, paged block size, dtype, forced splits (0: planner))
DECODE = [
    ("qwen_gqa_vaf", [1000, 17, 1], 1, 28, 4, 128, 6, "vaf", True, 0, torch.bfloat16, 0),
    ("qwen_gqa_vaf_3splits", [1000, 17, 1], 1, 28, 4, 128, 6, "vaf", True, 0, torch.float16, 3),
    ("paged_pai", [333, 63, 111, 2048], 4, 8, 2, 64, 3, "pai", True, 16, torch.bfloat16, 0),
    ("long_plain_paged", [5000], 1, 32, 32, 128, 0, "none", True, 256, torch.bfloat16, 0),
]


def check_prefill(b, s, hq, hk, d, c, rw, causal, dtype, seed, device, backend="triton"):
    """tests/helpers.check_against_reference on the GPU: out, mass, lse, dq, dk, dv of the backend against the
    float64 reference, with the reference in the kernel's dtype setting the allowed error."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v, kc = H.padded_inputs(b, s, s, hq, hk, d, c, gen)
    args = tuple(t.double().to(device) for t in (q, k, v)) + ((kc.to(device),) if c else (None,))
    kwargs = dict(num_classes=c or None, causal=causal,
                  reweight=H.random_reweight(rw, hq, c, gen) if c else None)
    probe = ak.attention(*args, **kwargs, return_lse=True, backend="reference")
    dout = torch.randn(probe.out.shape, generator=gen, dtype=torch.float64).to(device)
    dmass = torch.randn(probe.mass.shape, generator=gen, dtype=torch.float64).to(device) if c else None
    dlse = torch.randn(probe.lse.shape, generator=gen, dtype=torch.float64).to(device)
    ref64 = H.run_op(ak.attention, args, kwargs, torch.float64, "reference", dout, dmass, dlse)
    ref_lowp = H.run_op(ak.attention, args, kwargs, dtype, "reference", dout, dmass, dlse)
    got = H.run_op(ak.attention, args, kwargs, dtype, backend, dout, dmass, dlse)
    for name, g, r, rl in zip(H.NAMES, got, ref64, ref_lowp):
        H.fa_close(name, g, r, rl, H.ATOL[dtype] * (1 if name in ("out", "mass", "lse") else 4))


def check_decode_plan(device):
    """The decode benchmark's shape (B=8, Hk=4, D=128, Sk=32k) must be planned as one wave of CTAs."""
    from avar_kernels import _cuda

    index = torch.device(device).index or 0
    splits, keys, resident = _cuda.decode_plan(8, 1, 28, 4, 128, 32768, torch.bfloat16, index)
    detail = f"{splits} splits x {keys} keys, {8 * 4 * splits} CTAs on {resident} resident slots"
    assert 8 * 4 * splits <= resident and 8 * 4 * (splits + 1) > resident, "not one full wave: " + detail
    return detail


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results/gpu/smoke", help="path stem of the .md/.json/.csv")
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_smoke: needs a CUDA device", file=sys.stderr)
        return 2
    from test_kvcache import check_case  # the decode oracle of the GPU tests

    from avar_kernels import kvcache

    report = bm.Report("GPU smoke test against the float64 reference (FlashAttention rule)",
                       ["kind", "case", "dtype", "shape", "status", "s", "detail"], device=args.device,
                       notes=["Prefill: ak.attention with backend='triton', forward and backward (out, mass, lse, "
                              "dq, dk, dv); decode: attention_with_kvcache with backend='cuda' (out, lse, mass). "
                              "ok = within the FlashAttention rule of tests/helpers.py; `s` includes compiles."],
                       path=args.out, digits={"s": 1})
    jobs = []
    for name, b, s, hq, hk, d, c, rw, causal, dtype in PREFILL:
        shape = f"B={b} S={s} H={hq}/{hk} D={d} C={c} {rw}{'' if causal else ' non-causal'}"
        jobs.append(("prefill", name, dtype, shape, lambda a=(b, s, hq, hk, d, c, rw, causal, dtype):
                     check_prefill(*a, seed=sum(a[:6]), device=args.device)))
    for name, lens, sq, hq, hk, d, c, rw, causal, pb, dtype, splits in DECODE:
        shape = f"lens={lens} Sq={sq} H={hq}/{hk} D={d} C={c} {rw}" + (f" paged {pb}" if pb else "") + \
                (f" splits={splits}" if splits else "")

        def decode(a=(lens, sq, hq, hk, d, c, rw, causal, pb, dtype), splits=splits):
            kvcache._FORCE_SPLITS = splits
            try:
                check_case(*a, "cuda", device=args.device, seed=sum(a[0]) + a[4])
            finally:
                kvcache._FORCE_SPLITS = 0
        jobs.append(("decode", name, dtype, shape, decode))
    jobs.append(("decode", "split_plan_one_wave", torch.bfloat16, "B=8 Hq=28 Hk=4 D=128 Sk=32768",
                 lambda: check_decode_plan(args.device)))
    failed = 0
    for kind, name, dtype, shape, job in jobs:
        t0 = time.time()
        try:
            detail = job() or ""
            status = "ok"
        except Exception as exc:  # every case is reported
            failed += 1
            status, detail = "FAIL", f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        row = report.add({"kind": kind, "case": name, "dtype": str(dtype).replace("torch.", ""), "shape": shape,
                          "status": status, "s": time.time() - t0, "detail": detail})
        print(f"{kind:8s} {name:24s} {row['dtype']:9s} {status:4s} {row['s']:6.1f} s  {detail}", flush=True)
    print(f"gpu_smoke: {len(jobs) - failed} ok, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
