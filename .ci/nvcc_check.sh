#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu (the pure C++/CUDA kernels, not the torch binding) with the machine's nvcc for
# sm_80 and sm_90a into /tmp objects. Fails on any compile error; skips (exit 0) when nvcc is absent.
#
#   AVAR_NVCC_CHECK_FULL=1   compile every head-dim instantiation (default: only D=128 via
#                            -DAVAR_DECODE_ONLY_HDIM=128, the same kernel template; about 4x faster)
#   AVAR_NVCC_ARCHS="80 90a" the archs to compile for
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
OUT="$(mktemp -d /tmp/avar_nvcc_check.XXXXXX)"
trap 'rm -rf "$OUT"' EXIT

echo "nvcc_check: $("$NVCC" --version | tail -n 1)"
start=$(date +%s)
pids=()
logs=()
for src in "${SOURCES[@]}"; do
    for arch in "${ARCHS[@]}"; do
        obj="$OUT/$(basename "${src%.cu}")_sm${arch}.o"
        log="$obj.log"
        cmd=("$NVCC" -std=c++17 -O3 --use_fast_math -Xptxas -warn-spills "-arch=sm_${arch}" -Icsrc/cuda "${DEFS[@]}"
             -c "$src" -o "$obj")
        echo "nvcc_check: ${cmd[*]}"
        ( "${cmd[@]}" >"$log" 2>&1 ) &
        pids+=($!)
        logs+=("$log")
    done
done
status=0
for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then
        status=1
        echo "nvcc_check: FAILED: ${logs[$i]}"
    fi
    if [[ -s "${logs[$i]}" ]]; then sed 's/^/    /' "${logs[$i]}"; fi
done
end=$(date +%s)
if [[ $status -ne 0 ]]; then
    echo "nvcc_check: FAILED after $((end - start)) s"
    exit 1
fi
echo "nvcc_check: OK: ${#SOURCES[@]} source(s) x ${#ARCHS[@]} arch(s) (${ARCHS[*]}) ${DEFS[*]:-all head dims} in $((end - start)) s"
