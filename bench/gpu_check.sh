#!/usr/bin/env bash
# The GPU run (H100/H200, torch 2.11 + triton 3.6, no network), in stages that each fit one device command
# (<= 600 s), most valuable first. Every stage has its own timeout and writes its results as it goes, so a run cut
# off midway still returns the figures of the stages (and rows) it finished.
#
#   bash bench/gpu_check.sh build smoke decode      # one device command, about 6-8 min on a fresh machine (the
#                                                   # tensor-core decode kernel of session 6 never ran on a GPU)
#   bash bench/gpu_check.sh prefill                 # then, on the same warm machine
#   bash bench/gpu_check.sh tests
#   bash bench/gpu_check.sh model random            # random: the formulations of the class terms, a class per token
#   bash bench/gpu_check.sh all                     # every stage in order (longer than one device command)
#
# Stages (timeout):
#   build    python setup.py build_ext --inplace: C++ CPU kernels + CUDA decode kernels for AVAR_CUDA_ARCHS (400 s)
#   smoke    bench/gpu_smoke.py: prefill fwd/bwd and decode against the float64 reference, the split plan (240 s)
#   prefill  bench/bench_triton_gpu.py: ak.attention TFLOP/s vs SDPA-flash, cuDNN, Flex at S = 4k, 8k, 16k, with
#            key masses (avar_keymass: forward, and forward+backward of a key-mass loss, as time over avar_mass) (480 s)
#   tests    pytest -m gpu over 8 xdist workers when pytest-xdist is there (540 s)
#   decode   bench/bench_decode_gpu.py: bandwidth against the measured copy bandwidth, against SDPA decode (240 s)
#   model    bench/bench_hf.py --device cuda: memory and time of a mass loss through 2 Qwen2.5-VL-7B layers, bf16,
#            S 2048-8192 (the SFT-step rows of the trainer issue; 420 s)
#   random   bench/bench_triton_gpu.py --layout random: one class per token (every key block mixes classes), with
#            masses against plain, SDPA flash and SDPA + one-hot V; which formulation of the class terms wins (300 s)
# A stage after `build` builds first when avar_kernels._cuda is missing (a fresh machine).
#
# Results: bench/results/gpu/<stage>.{md,json,csv} (+ build.log, tests.log, gpu_check.log). With $OUT set (the device
# tool's folder) the log is copied there and the results are packed into $OUT/gpu_results.tar.gz after every stage
# (the tool returns at most 8 files). Each stage prints its table at its end (the tool returns the output's tail).
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=bench/results/gpu
mkdir -p "$RESULTS"
export MAX_JOBS="${MAX_JOBS:-16}" AVAR_CUDA_ARCHS="${AVAR_CUDA_ARCHS:-90a}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
LOG="$RESULTS/gpu_check.log"
STATUS=0

say() { echo "== $* ($(date +%T))" | tee -a "$LOG"; }
pack() {
    if [[ -n "${OUT:-}" ]]; then
        cp "$LOG" "$OUT/gpu_check.log"
        tar -czf "$OUT/gpu_results.tar.gz" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")"
    fi
}
# run_stage NAME SECONDS CMD...: runs CMD under a timeout, appends its output to the log and the terminal.
run_stage() {
    local name=$1 limit=$2
    shift 2
    say "$name (timeout ${limit} s): $*"
    local t0=$SECONDS
    timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    [[ $rc -eq 124 ]] && echo "$name: TIMED OUT after ${limit} s (rows written so far are kept)" | tee -a "$LOG"
    [[ $rc -ne 0 ]] && STATUS=1
    say "$name: exit $rc after $((SECONDS - t0)) s"
    pack
    return 0
}

stage_build() {
    say "GPU"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader 2>&1 | tee -a "$LOG"
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
        2>&1 | tee -a "$LOG"
    run_stage build 400 bash -c "'$PY' setup.py build_ext --inplace > '$RESULTS/build.log' 2>&1; rc=\$?; \
        grep -E 'error|warning: .*(spill|stack)' '$RESULTS/build.log' | head -40; tail -3 '$RESULTS/build.log'; exit \$rc"
    "$PY" -c "import avar_kernels._C, avar_kernels._cuda; print('built: avar_kernels._C and avar_kernels._cuda')" \
        2>&1 | tee -a "$LOG"
}
ensure_built() {
    "$PY" -c "import avar_kernels._C, avar_kernels._cuda" >/dev/null 2>&1 || stage_build
}
# correctness, not speed: one launch config per kernel (the autotuner's default compiles four per kernel with classes)
stage_smoke() { ensure_built; run_stage smoke 240 env AVAR_TRITON_AUTOTUNE=0 "$PY" bench/gpu_smoke.py --out "$RESULTS/smoke"; }
stage_prefill() {
    ensure_built
    run_stage prefill 480 "$PY" bench/bench_triton_gpu.py --out "$RESULTS/prefill" --budget 300
}
stage_tests() {
    ensure_built
    local xdist=""
    "$PY" -c "import xdist" >/dev/null 2>&1 && xdist="-n 8"
    run_stage tests 540 bash -c "'$PY' -m pytest -q -m gpu tests -p no:cacheprovider --maxfail=30 $xdist \
        > '$RESULTS/tests.log' 2>&1; rc=\$?; grep -E '^(FAILED|ERROR)' '$RESULTS/tests.log' | head -40; \
        tail -3 '$RESULTS/tests.log'; exit \$rc"
}
stage_decode() { ensure_built; run_stage decode 240 "$PY" bench/bench_decode_gpu.py --out "$RESULTS/decode"; }
# one class per token: every key block mixes classes, the case where the one-hot product should win the autotuning
stage_random() {
    ensure_built
    run_stage random 300 "$PY" bench/bench_triton_gpu.py --layout random --methods avar avar_mass sdpa_flash \
        sdpa_onehot --out "$RESULTS/prefill_random" --budget 200
}
stage_model() {
    ensure_built
    run_stage model 420 "$PY" bench/bench_hf.py --device cuda --seq 2048 4096 8192 --timeout 130 \
        --out "$RESULTS/hf_cuda"
}

STAGES=("$@")
[[ ${#STAGES[@]} -eq 0 ]] && STAGES=(all)
[[ "${STAGES[*]}" == "all" ]] && STAGES=(build smoke prefill tests decode model random)
for s in "${STAGES[@]}"; do
    case "$s" in
        build|smoke|prefill|tests|decode|model|random) ;;
        *) echo "gpu_check: unknown stage '$s' (build smoke prefill tests decode model random all)"; exit 2 ;;
    esac
done
for s in "${STAGES[@]}"; do
    "stage_$s"
done
say "done: ${STAGES[*]} (status $STATUS)"
pack
exit $STATUS
