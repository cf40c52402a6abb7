"""Static profile of the CUDA decode kernels, no GPU needed: compile csrc/cuda/decode.cu for one arch with torch's
extension flags and report, per kernel, registers, spills and the instruction mix of its key loop from the SASS.

The key loop is the innermost backward branch around the most tensor-core instructions (HMMA), or, for a kernel
without them (the CUDA-core kernel before session 6), the largest loop: its instruction count per trip is a proxy
for the issue cost per key chunk, which is what a memory-bound decode kernel must keep below the bytes it reads.

    python bench/sass_decode.py                       # sm_90a, D = 128, the working tree
    python bench/sass_decode.py --source OLD.cu --arch 80 --head-dim 64
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["-std=c++17", "-O3", "--use_fast_math", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
         "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]


def find_tool(name: str) -> str | None:
    """nvcc / cuobjdump on PATH, in CUDA_HOME, or (cuobjdump) the copy inside the triton wheel."""
    found = shutil.which(name)
    if found:
        return found
    for base in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if base and os.path.exists(os.path.join(base, "bin", name)):
            return os.path.join(base, "bin", name)
    try:
        import triton

        hits = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name))
        return hits[0] if hits else None
    except ImportError:
        return None


def parse_sass(text: str) -> dict[str, list[tuple[int, str]]]:
    funcs, cur = {}, None
    for line in text.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = m.group(1)
            funcs[cur] = []
            continue
        m = re.match(r"\s+/\*([0-9a-f]+)\*/\s+(.*?);", line)
        if m and cur:
            funcs[cur].append((int(m.group(1), 16), m.group(2)))
    return funcs


def key_loop(ins: list[tuple[int, str]]) -> list[str]:
    loops = []
    for addr, txt in ins:
        m = re.search(r"BRA.*?0x([0-9a-f]+)", txt)
        if m and int(m.group(1), 16) < addr:
            lo = int(m.group(1), 16)
            loops.append([t for a, t in ins if lo <= a <= addr])
    if not loops:
        return []
    most = max(sum("HMMA" in t for t in body) for body in loops)
    if most:
        return min((b for b in loops if sum("HMMA" in t for t in b) == most), key=len)
    return max(loops, key=len)


def short_name(mangled: str) -> str:
    m = re.search(r"\d+(decode_(?:split|combine|key_mass)_kernel)I(13__nv_bfloat16|6__half)((?:Li\d+E)*)", mangled)
    if not m:
        return mangled[:60]
    dtype = "bf16" if "bfloat16" in m.group(2) else "fp16"
    args = re.findall(r"Li(\d+)E", m.group(3))
    return f"{m.group(1)}<{', '.join([dtype, *args])}>"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=os.path.join(ROOT, "csrc", "cuda", "decode.cu"))
    p.add_argument("--arch", default="90a", help="sm_ARCH (default 90a)")
    p.add_argument("--head-dim", type=int, default=128)
    args = p.parse_args()
    nvcc, cuobjdump = find_tool("nvcc"), find_tool("cuobjdump")
    if nvcc is None or cuobjdump is None:
        raise SystemExit(f"sass_decode: needs nvcc and cuobjdump (found nvcc={nvcc}, cuobjdump={cuobjdump})")
    with tempfile.TemporaryDirectory() as tmp:
        obj = os.path.join(tmp, "decode.o")
        cmd = [nvcc, *FLAGS, f"-gencode=arch=compute_{args.arch},code=sm_{args.arch}", "-Xptxas", "-v",
               f"-DAVAR_DECODE_ONLY_HDIM={args.head_dim}", "-I", os.path.join(ROOT, "csrc", "cuda"), "-c",
               args.source, "-o", obj]
        ptxas = subprocess.run(cmd, capture_output=True, text=True)
        if ptxas.returncode != 0:
            raise SystemExit(f"sass_decode: nvcc failed:\n{ptxas.stderr[-3000:]}")
        sass = subprocess.run([cuobjdump, "-sass", obj], capture_output=True, text=True, check=True).stdout
    regs, spills, current = {}, {}, None
    for line in ptxas.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            current = m.group(1)
        m = re.search(r"(\d+) bytes spill stores", line)
        if m and current:
            spills[current] = int(m.group(1))
        m = re.search(r"Used (\d+) registers", line)
        if m and current:
            regs[current] = int(m.group(1))
    print(f"# {os.path.relpath(args.source, ROOT)}, sm_{args.arch}, D = {args.head_dim}\n")
    print("| kernel | regs | spill B | SASS | key-loop SASS | HMMA | LDSM | LDGSTS | FFMA | bar / warpsync | top ops |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, ins in sorted(parse_sass(sass).items(), key=lambda kv: short_name(kv[0])):
        body = key_loop(ins)
        ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in body)

        top = ", ".join(f"{k} {v}" for k, v in ops.most_common(5))
        print(f"| {short_name(name)} | {regs.get(name, '?')} | {spills.get(name, '?')} | {len(ins)} | {len(body)} | "
              f"{ops['HMMA']} | {ops['LDSM']} | {ops['LDGSTS']} | {ops['FFMA']} | "
              f"{ops['BAR'] + ops['WARPSYNC']} | {top} |")


if __name__ == "__main__":
    main()
