#!/usr/bin/env bash
# The GPU run (H100/H200, torch 2.11 + triton 3.6, no network), about 8 minutes:
# build the extensions, run the GPU tests, then the Triton, decode and model benchmarks.
# Results (markdown + CSV naming the GPU) go to $OUT (the device tool's folder) or bench/results/gpu/.
#   device run:  bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu}"
mkdir -p "$OUT"
export MAX_JOBS="${MAX_JOBS:-16}" AVAR_CUDA_ARCHS="${AVAR_CUDA_ARCHS:-90a}"
PY="${PYTHON:-python3}"
LOG="$OUT/gpu_check.log"
: > "$LOG"
step() { echo "== $1 ($(date +%T))" | tee -a "$LOG"; }

step "GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$LOG"

step "build (C++ CPU kernels + CUDA decode kernels, sm_${AVAR_CUDA_ARCHS})"
if ! timeout 300 "$PY" setup.py build_ext --inplace >> "$LOG" 2>&1; then
    echo "BUILD FAILED (see $LOG)"; tail -30 "$LOG"
fi
"$PY" -c "import avar_kernels.cpu as c, avar_kernels.kvcache as k; print('cpu ext', c.is_available())" | tee -a "$LOG"

step "GPU tests"
# Triton compiles dominate this step: spread the tests over processes when pytest-xdist is there.
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8" || true)
timeout 240 "$PY" -m pytest -q -m gpu tests -p no:cacheprovider --maxfail=10 $XDIST 2>&1 | tail -25 | tee -a "$LOG"

step "Triton benchmark"
timeout 240 "$PY" bench/bench_triton_gpu.py --out "$OUT/triton_gpu.md" --budget 200 2>&1 | tail -5 | tee -a "$LOG"

step "decode benchmark"
timeout 90 "$PY" bench/bench_decode_gpu.py --out-md "$OUT/decode_gpu.md" --out-csv "$OUT/decode_gpu.csv" 2>&1 | tail -5 | tee -a "$LOG"

step "model benchmark"
timeout 120 "$PY" bench/bench_hf.py --device cuda --out "$OUT/hf_cuda.md" 2>&1 | tail -5 | tee -a "$LOG"

step "done"
for f in "$OUT"/*.md; do echo "### $f"; cat "$f"; done
