#!/usr/bin/env bash
# Compiles the CUDA extension (avar_kernels._cuda) with the machine's nvcc, with the exact command lines torch's
# BuildExtension runs for setup.py's CUDAExtension: torch's COMMON_NVCC_FLAGS (-D__CUDA_NO_HALF_CONVERSIONS__ and
# the other half/bfloat16 macros), setup.py's nvcc arguments with its -gencode for each arch, the extension's
# defines and include paths. The flags are read from torch.utils.cpp_extension and setup.py, not written here, so
# that this check and `pip install` cannot drift apart again. Every csrc/cuda/*.cu is compiled for each arch with
# -Xptxas -v (registers, spills and shared memory per kernel are summarized at the end); the torch binding
# (csrc/cuda_bindings.cpp) is compiled host-side with the extension's cxx flags, and the decode split planner's unit
# test (csrc/cuda/decode_plan_test.cpp) is built and run. Fails on any compile error or failed test; skips (exit 0)
# when nvcc is absent.
#
#   AVAR_NVCC_CHECK_FULL=1   compile every head-dim instantiation (default: only D=128 via
#                            -DAVAR_DECODE_ONLY_HDIM=128, the same kernel template; about 4x faster)
#   AVAR_NVCC_ARCHS="80 90a" the archs to compile for (setup.py's AVAR_CUDA_ARCHS entries)
#   AVAR_NVCC_CHECK_KEEP=DIR keep the objects and ptxas logs in DIR
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC="${NVCC:-}"
if [[ -z "$NVCC" ]]; then
    if command -v nvcc >/dev/null 2>&1; then NVCC="$(command -v nvcc)"
    elif [[ -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc
    fi
fi
if [[ -z "$NVCC" ]]; then
    echo "nvcc_check: SKIPPED: no nvcc on this machine (install a CUDA toolkit or set NVCC=...)"
    exit 0
fi
PY="${PYTHON:-python}"

shopt -s nullglob
SOURCES=(csrc/cuda/*.cu)
if [[ ${#SOURCES[@]} -eq 0 ]]; then
    echo "nvcc_check: FAILED: no csrc/cuda/*.cu sources found"
    exit 1
fi

ARCHS=(${AVAR_NVCC_ARCHS:-80 90a})
DEFS=()
if [[ "${AVAR_NVCC_CHECK_FULL:-0}" != "1" ]]; then
    DEFS=(-DAVAR_DECODE_ONLY_HDIM=128)
fi
if [[ -n "${AVAR_NVCC_CHECK_KEEP:-}" ]]; then
    WORK="$AVAR_NVCC_CHECK_KEEP"
    mkdir -p "$WORK"
else
    WORK="$(mktemp -d /tmp/avar_nvcc_check.XXXXXX)"
    trap 'rm -rf "$WORK"' EXIT
fi

# build_flags KIND ARCH: the flags BuildExtension passes for setup.py's CUDA extension, one per line.
# KIND nvcc: the .cu compile (include/define flags, then torch's nvcc flags and setup.py's), KIND cxx: the host
# compile of the binding. On a CPU-only torch setup.py leaves the CUDA extension out, so CUDA_HOME and
# torch.version.cuda are set for the duration of reading it; setup() itself is replaced by a recorder.
build_flags() {
    CUDA_HOME_GUESS="$(dirname "$(dirname "$(readlink -f "$NVCC")")")" "$PY" - "$1" "$2" <<'PY'
import contextlib, os, runpy, sys, sysconfig

import setuptools
import torch
import torch.utils.cpp_extension as ce

kind, arch = sys.argv[1], sys.argv[2]
if ce.CUDA_HOME is None:  # a CPU-only torch: the toolkit of the nvcc this check runs
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda", os.environ["CUDA_HOME_GUESS"]]
    ce.CUDA_HOME = next((h for h in homes if h and os.path.exists(os.path.join(h, "include", "cuda_runtime.h"))),
                        os.environ["CUDA_HOME_GUESS"])
torch.version.cuda = torch.version.cuda or "nvcc_check"
os.environ["AVAR_CUDA_ARCHS"] = arch
os.environ.pop("AVAR_NO_CUDA", None)
recorded = {}
setuptools.setup = lambda **kw: recorded.update(kw)
with contextlib.redirect_stdout(sys.stderr):  # stdout carries the flags
    runpy.run_path("setup.py", run_name="__main__")
exts = [e for e in recorded["ext_modules"] if any(s.endswith(".cu") for s in e.sources)]
if len(exts) != 1:
    sys.exit(f"nvcc_check: expected one CUDA extension in setup.py, found {[e.name for e in exts]}")
ext = exts[0]
# BuildExtension.build_extensions: these two defines are appended to every compiler's argument list.
defines = ["-DTORCH_API_INCLUDE_EXTENSION_H", f"-DTORCH_EXTENSION_NAME={ext.name.split('.')[-1]}"]
pre = [f"-I{os.path.abspath(p)}" for p in ext.include_dirs] + [f"-I{sysconfig.get_paths()['include']}"]
if kind == "nvcc":
    user = list(ext.extra_compile_args["nvcc"]) + defines
    # BuildExtension's unix_cuda_flags
    post = ce.COMMON_NVCC_FLAGS + ["--compiler-options", "'-fPIC'"] + user + ce._get_cuda_arch_flags(user)
else:
    post = ["-fPIC"] + list(ext.extra_compile_args["cxx"]) + defines
if not any(f.startswith("-std=") for f in post):  # BuildExtension's append_std17_if_no_std_present
    post.append("-std=c++20")
print("\n".join(pre + post))
PY
}

echo "nvcc_check: $("$NVCC" --version | tail -n 1)"
start=$(date +%s)
pids=()
logs=()
for arch in "${ARCHS[@]}"; do
    mapfile -t FLAGS < <(build_flags nvcc "$arch")
    if [[ ${#FLAGS[@]} -eq 0 ]]; then
        echo "nvcc_check: FAILED: could not read the build's nvcc flags from torch and setup.py"
        exit 1
    fi
    for src in "${SOURCES[@]}"; do
        obj="$WORK/$(basename "${src%.cu}")_sm${arch}.o"
        log="$obj.log"
        cmd=("$NVCC" "${FLAGS[@]}" "${DEFS[@]}" -Xptxas -v -c "$src" -o "$obj")
        echo "nvcc_check: ${cmd[*]}"
        ( "${cmd[@]}" >"$log" 2>&1 ) &
        pids+=($!)
        logs+=("$log")
    done
done
# The binding, host-side (the first arch's flag set; it holds no device code). A CPU-only torch wheel lacks the
# generated c10/cuda/impl/cuda_cmake_macros.h (all other CUDA headers are there): a stand-in holding the one define
# of CUDA builds goes on the include path then.
mapfile -t CXXFLAGS_EXT < <(build_flags cxx "${ARCHS[0]}")
if ! "$PY" -c "import os, sys, torch.utils.cpp_extension as ce
sys.exit(not any(os.path.exists(os.path.join(p, 'c10/cuda/impl/cuda_cmake_macros.h')) for p in ce.include_paths()))"
then
    mkdir -p "$WORK/stub/c10/cuda/impl"
    printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$WORK/stub/c10/cuda/impl/cuda_cmake_macros.h"
    CXXFLAGS_EXT=("-I$WORK/stub" "${CXXFLAGS_EXT[@]}")
fi
CXX="${CXX:-c++}"
bind_log="$WORK/cuda_bindings.o.log"
cmd=("$CXX" "${CXXFLAGS_EXT[@]}" -c csrc/cuda_bindings.cpp -o "$WORK/cuda_bindings.o")
echo "nvcc_check: ${cmd[*]}"
( "${cmd[@]}" >"$bind_log" 2>&1 ) &
pids+=($!)
logs+=("$bind_log")

# The split planner's unit test (host code of decode.h; runs without a GPU).
plan_log="$WORK/decode_plan_test.log"
( "$NVCC" -std=c++17 -Icsrc/cuda csrc/cuda/decode_plan_test.cpp -o "$WORK/decode_plan_test" &&
  "$WORK/decode_plan_test" ) >"$plan_log" 2>&1 &
pids+=($!)
logs+=("$plan_log")

status=0
for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then
        status=1
        echo "nvcc_check: FAILED: ${logs[$i]}"
        sed 's/^/    /' "${logs[$i]}"
    fi
done
end=$(date +%s)
if [[ $status -ne 0 ]]; then
    echo "nvcc_check: FAILED after $((end - start)) s"
    exit 1
fi

# ptxas -v summary: one line per (kernel, arch).
"$PY" - "$WORK"/*_sm*.o.log <<'PY'
import re, shutil, subprocess, sys

rows, cur = [], None
for path in sys.argv[1:]:
    for line in open(path):
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", line)
        if m:
            cur = {"name": m.group(1), "arch": m.group(2), "stack": 0, "st": 0, "ld": 0, "regs": "?", "smem": 0}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["stack"], cur["st"], cur["ld"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["smem"] = int(s.group(1)) if s else 0
if shutil.which("c++filt") and rows:
    names = subprocess.run(["c++filt"], input="\n".join(r["name"] for r in rows), capture_output=True,
                           text=True).stdout.splitlines()
    for r, n in zip(rows, names):
        # void avar::(anonymous namespace)::decode_split_kernel<__half, 128>(avar::DecodeParams, int)
        #   -> decode_split_kernel<__half, 128>
        n = n.replace("(anonymous namespace)::", "").split("(")[0]
        r["name"] = n.removeprefix("void ").removeprefix("avar::")
print("nvcc_check: ptxas per kernel (static smem only; the split kernel's tiles are dynamic):")
print(f"    {'kernel':<48} {'arch':<7} {'regs':>4} {'stack B':>7} {'spill st/ld B':>13} {'smem B':>6}")
for r in rows:
    print(f"    {r['name']:<48} {r['arch']:<7} {r['regs']:>4} {r['stack']:>7} {str(r['st']) + '/' + str(r['ld']):>13}"
          f" {r['smem']:>6}")
PY
echo "nvcc_check: OK: ${#SOURCES[@]} source(s) x ${#ARCHS[@]} arch(s) (${ARCHS[*]}) ${DEFS[*]:-all head dims}" \
     "+ binding, with torch's extension flags; $(tail -n 1 "$plan_log"); in $((end - start)) s"
