"""Compile the Triton kernels ahead of time for sm_90a and sm_80 (no GPU needed) and tabulate, per kernel and
launch config: registers, spill bytes, shared memory against the architecture's limit, and the PTX counts of
wgmma products, wgmma waits, barriers and async-proxy fences.

The kernels are compiled from the bound arguments of real launches: the backend's forward and backward run on
CPU tensors with the autotuner replaced by a recorder, so each kernel sees exactly the keyword arguments and
feature flags that a GPU launch would, for every candidate config of its list (avar_kernels/triton/configs.py).
The table also gives the backend's shared-memory estimate of each config and whether the backend keeps it on
that architecture (estimate <= limit); an estimate below the compiled kernel's need is flagged. It is the static
proxy between GPU runs: it predicts occupancy limits, spills and launch failures (OutOfResources), not timings.

    python bench/aot_triton.py                                # everything, both architectures
    python bench/aot_triton.py --arch 90 --dims 128 --kernels fwd --out /tmp/fwd.md
    PYTHONPATH=/path/to/triton-3.6 python bench/aot_triton.py --arch 90 --dims 128 --first 1 --check
                                                              # the GPU image's triton compiles every kernel
    AOT_VERBOSE=1 python bench/aot_triton.py ...              # also print each failure's whole compiler message
    python bench/aot_triton.py --dims 128 --variants masses+keymass --kernels km kmd dq dkdv --first 2 \
        --out bench/results/aot_triton.md                 # the key-mass kernels (issue 11), the configs tuned
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the runtime's default, stated to silence its warning

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from avar_kernels.triton import bwd as triton_bwd  # noqa: E402
from avar_kernels.triton import configs as triton_configs  # noqa: E402
from avar_kernels.triton import fwd as triton_fwd  # noqa: E402

SMEM_LIMIT = triton_configs.SMEM_LIMIT
KERNEL_NAMES = {"_fwd_kernel": "fwd", "_bwd_dq_kernel": "dq", "_bwd_dkdv_kernel": "dkdv", "_key_mass_kernel": "km",
                "_bwd_km_delta_kernel": "kmd"}
KERNELS = {"fwd": triton_fwd._fwd_kernel, "dq": triton_bwd._bwd_dq_kernel, "dkdv": triton_bwd._bwd_dkdv_kernel,
           "km": triton_fwd._key_mass_kernel, "kmd": triton_bwd._bwd_km_delta_kernel}
# masses+table: a MUL table (VAF); masses+learned: MUL, ABS and ADD tables with their gradients (training);
# masses+keymass: masses and key masses, a loss on both (km: forward's key-mass pass, kmd: the backward's delta
# kernel, dq / dkdv with the dKM term)
VARIANTS = ("plain", "masses", "masses+table", "masses+learned", "masses+keymass")
# The measured shape of the GPU benchmark: bf16, 16 heads, causal; a short sequence (lengths do not change code).
HEADS, TOKENS, NUM_CLASSES = 16, 256, 5


class _Recorder:
    """Stands in for the autotuned kernel: keeps the keyword arguments of each launch."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda **kwargs: self.launches.append((self.kernel, kwargs))


def record_launches(dim, variant, dtype=torch.bfloat16):
    """[(kernel, kwargs)] of one forward and one backward of the backend (CPU tensors, nothing runs)."""
    launches = []
    real_autotune = triton.autotune
    triton.autotune = lambda configs, **_: (lambda kernel: _Recorder(kernel, launches))
    triton_fwd._fwd_tuned.clear()
    triton_fwd._km_tuned.clear()
    triton_bwd._tuned.clear()
    try:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(TOKENS, HEADS, dim, generator=gen).to(dtype) for _ in range(3))
        cu = torch.tensor([0, TOKENS], dtype=torch.int32)
        c = 0 if variant == "plain" else NUM_CLASSES
        cls = torch.randint(0, NUM_CLASSES, (TOKENS,), generator=gen, dtype=torch.int32) if c else None
        tables = [0.1 * torch.randn(HEADS, c, c, generator=gen) for _ in range(3)]
        learned = variant == "masses+learned"
        mul = tables[0] if variant in ("masses+table", "masses+learned") else None
        abs_, add = (tables[1], tables[2]) if learned else (None, None)
        args = (cu, cu, TOKENS, TOKENS, cls, cls, c, mul, abs_, add, dim ** -0.5, -1, 0)
        key_mass = variant == "masses+keymass"
        triton_fwd.forward(q, k, v, *args, key_mass=key_mass)
        out = torch.zeros_like(q)
        lse = torch.zeros(HEADS, TOKENS)
        dmass = torch.zeros(HEADS, TOKENS, c) if c else None
        triton_bwd.backward(out, dmass, torch.zeros(HEADS, TOKENS), q, k, v, out, lse, *args,
                            table_grads=(True, True, True) if learned else None,
                            dkey_mass=torch.zeros(HEADS, TOKENS, c) if key_mass else None)
    finally:
        triton.autotune = real_autotune
    return launches


_PTXAS = [("regs", r"Used (\d+) registers"), ("spill_st", r"(\d+) bytes spill stores"),
          ("spill_ld", r"(\d+) bytes spill loads")]
_PTX_COUNTS = [("wgmma", r"wgmma\.mma_async"), ("mma", r"\bmma\.sync"), ("wgmma_wait", r"wgmma\.wait_group"),
               ("bar_sync", r"\b(?:bar|barrier)\.sync"), ("fence", r"fence\.proxy\.async")]


def compile_one(job):
    """Compile one (kernel name, config row, kwargs) for one architecture; returns a row of figures."""
    name, (block_m, block_n, num_warps, num_stages), kwargs, arch = job
    kernel = KERNELS[name]
    jit = kernel.fn
    args = {**kwargs, "BLOCK_M": block_m, "BLOCK_N": block_n}
    for name, rule in kernel.values.items():  # the kernel's @triton.heuristics feature flags
        args[name] = rule(args)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    options = dict(num_warps=num_warps, num_stages=num_stages)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound, specialization, _ = binder(**args)
    _, signature, constexprs, attrs = jit._pack_args(backend, {**args, **options}, bound, specialization, options)
    triton.knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its log
    triton.knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target, options=options)
    except Exception as exc:  # a config ptxas rejects is a finding, not a crash of the report
        root = exc
        while root.__cause__ is not None:  # a CompilationError wraps the helper's own error
            root = root.__cause__
        if os.environ.get("AOT_VERBOSE"):
            print(f"{name} {(block_m, block_n, num_warps, num_stages)} sm_{arch}: {exc}\n{root}", file=sys.stderr)
        message = next((line for line in reversed(str(root).splitlines()) if line.strip()), "")
        return dict(error=f"{type(root).__name__}: {message[:80]}")
    row = dict(seconds=time.perf_counter() - start, smem=compiled.metadata.shared)
    text = log.getvalue()
    for key, pattern in _PTXAS:
        found = re.search(pattern, text)
        row[key] = int(found.group(1)) if found else 0
    row["serialized"] = "serialized" in text
    ptx = compiled.asm["ptx"]
    for key, pattern in _PTX_COUNTS:
        row[key] = len(re.findall(pattern, ptx))
    return row


def add_rows(work, keys, name, kwargs, dim, variant, archs, rows, first):
    """Queue the compiles of one recorded launch: each config of its list (or `rows`) on each architecture."""
    shape = (kwargs["BLOCK_D"], kwargs["PREC"], kwargs["KCLS"] is not None,
             sum(kwargs[t] is not None for t in ("MUL", "ABS", "ADD")))
    has_km = name in ("dq", "dkdv") and kwargs.get("DKM") is not None
    for arch in archs:
        for cfg in rows or triton_configs.candidate_rows(name, *shape, has_km, arch)[:first]:
            keys.append(dict(arch=arch, kernel=name, dim=dim, variant=variant, config=cfg, block_d=shape[0],
                             elem=kwargs["Q"].element_size(), has_classes=shape[2], tables=shape[3], has_km=has_km))
            work.append((name, cfg, kwargs, arch))


def collect(archs, dims, kernels, variants, jobs, rows=None, first=None):
    work, keys = [], []
    for dim in dims:
        for variant in variants:
            for kernel, launched in record_launches(dim, variant):
                name = KERNEL_NAMES[kernel.fn.__name__]
                if name not in kernels:
                    continue
                # a forward whose autotuner picks the formulation of the masses: a row for each
                forms = [("", launched)] if "MASS_DOT" in launched else \
                    [(f" ({'product' if m else 'row sums'})", {**launched, "MASS_DOT": m}) for m in (False, True)]
                for form, kwargs in forms:
                    add_rows(work, keys, name, kwargs, dim, variant + form, archs, rows, first)
    print(f"{len(work)} compiles", file=sys.stderr)
    rows = []
    with ProcessPoolExecutor(jobs) if jobs > 1 else contextlib.nullcontext() as pool:
        for i, row in enumerate(pool.map(compile_one, work) if pool else map(compile_one, work)):
            rows.append(row)
            print(f"[{i + 1}/{len(work)}] {keys[i]} {row}", file=sys.stderr, flush=True)
    return [{**key, **row} for key, row in zip(keys, rows)]


def with_estimates(rows):
    """Each row with the backend's current shared-memory estimate of its config ('est')."""
    return [{**r, "config": tuple(r["config"]),
             "est": triton_configs.smem_estimate(r["kernel"], tuple(r["config"]), r["block_d"], r["elem"],
                                                 r["has_classes"],
                                                 r.get("tables", int(r.get("has_rw", 0))), r["arch"],
                                                 r.get("has_km", False))}
            for r in rows]


def markdown(rows, title):
    lines = [f"# {title}", "",
             f"triton {triton.__version__}, bf16, {HEADS} heads, causal, C = {NUM_CLASSES} classes with masses, "
             "a MUL table for 'masses+table', MUL, ABS and ADD tables with their gradients for 'masses+learned', "
             "key masses and a loss on them for 'masses+keymass' (km, kmd; dq and dkdv with the dKM term). "
             "Spill: bytes stored / loaded. Shared memory against the opt-in limit "
             f"per block ({', '.join(f'sm_{a}: {v:,} B' for a, v in SMEM_LIMIT.items())}); 'est.': the backend's "
             "estimate, 'kept': estimate within the limit (UNDER: estimate below the need). PTX counts: "
             "wgmma.mma_async (mma.sync on sm_80), wgmma.wait_group, bar.sync, fence.proxy.async; 'ser.': ptxas "
             "serialized wgmma.", ""]
    for arch in sorted({r["arch"] for r in rows}, reverse=True):
        lines += [f"## sm_{arch}{'a' if arch >= 90 else ''}", "",
                  "| kernel | D | variant | BM x BN, warps, stages | regs | spill st/ld | smem B | smem % | est. B | "
                  f"kept | {'wgmma' if arch >= 90 else 'mma'} | waits | bar.sync | fences | ser. |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["arch"] == arch):
            cfg = "{} x {}, {}w, {}s".format(*r["config"])
            head = f"| {r['kernel']} | {r['dim']} | {r['variant']} | {cfg} |"
            if "error" in r:
                lines.append(f"{head} {r['error']} |||||||||||")
                continue
            pct = 100 * r["smem"] / SMEM_LIMIT[arch]
            mma = r["wgmma"] if arch >= 90 else r["mma"]
            kept = "yes" if r["est"] <= SMEM_LIMIT[arch] else "no"
            under = " UNDER" if r["est"] < r["smem"] else ""
            lines.append(f"{head} {r['regs']} | {r['spill_st']}/{r['spill_ld']} | {r['smem']:,} | "
                         f"{pct:.0f}%{' OVER' if pct > 100 else ''} | {r['est']:,}{under} | {kept} | {mma} | "
                         f"{r['wgmma_wait']} | {r['bar_sync']} | {r['fence']} | {'yes' if r['serialized'] else ''} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SMEM_LIMIT))
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--kernels", nargs="+", default=list(KERNEL_NAMES.values()),
                        choices=list(KERNEL_NAMES.values()))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--jobs", type=int, default=1, help="parallel compiles (processes)")
    parser.add_argument("--first", type=int, help="only the first N configs of each kernel's list (the tuned ones)")
    parser.add_argument("--configs", nargs="+", metavar="BMxBNxWxS",
                        help="compile these configs instead of the backend's lists (to try candidates)")
    parser.add_argument("--title", default="Triton kernels compiled ahead of time")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--json", type=Path, help="also write the compiled figures here (JSON rows)")
    parser.add_argument("--from-json", type=Path, help="render rows written by --json instead of compiling "
                        "(the estimates are recomputed with the backend as it is now)")
    parser.add_argument("--check", action="store_true",
                        help="exit with status 1 when a kernel fails to compile (listing the failures)")
    args = parser.parse_args(argv)
    if args.from_json:
        rows = json.loads(args.from_json.read_text())
    else:
        rows = collect(args.arch, args.dims, args.kernels, args.variants, args.jobs,
                       [tuple(int(x) for x in c.split("x")) for c in args.configs] if args.configs else None,
                       args.first)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=0))
    text = markdown(with_estimates(rows), args.title)
    seconds = sum(r.get("seconds", 0.0) for r in rows)
    text += f"\n`python bench/aot_triton.py {' '.join(argv if argv is not None else sys.argv[1:])}` " \
            f"({len(rows)} compiles, {seconds:.0f} s of compiling)\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    failed = [r for r in rows if "error" in r]
    if args.check and failed:
        for r in failed:
            print(f"FAILED sm_{r['arch']} {r['kernel']} D={r['dim']} {r['variant']} {tuple(r['config'])}: "
                  f"{r['error']}", file=sys.stderr)
        print(f"{len(failed)} of {len(rows)} compiles failed (triton {triton.__version__})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
