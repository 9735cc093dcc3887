#!/usr/bin/env bash
# Runs the benchmarks in the environment their numbers assume, then writes benchmarks/RESULTS.md.
#
#   bash benchmarks/run.sh                   # step, kernels, scaling, ops, compare (what `make bench` runs)
#   bash benchmarks/run.sh step --quick      # one benchmark; further arguments go to it
#   bash benchmarks/run.sh compile           # the torch.compile experiment (not in `make bench`)
#   THREADS=1 BENCH_CLOCK=cpu bash benchmarks/run.sh   # on a machine other jobs are loading
#
# glibc's malloc maps and unmaps PyTorch's large temporaries on every use unless both thresholds
# are raised before Python starts (shared/machine.md): up to 2.3x slower and noisier conv timings.
set -euo pipefail
cd "$(dirname "$0")/.."
export MALLOC_MMAP_THRESHOLD_=1073741824
export MALLOC_TRIM_THRESHOLD_=4294967296
export OMP_NUM_THREADS=${THREADS:-2}
export BENCH_CLOCK=${BENCH_CLOCK:-wall}
PY=${PY:-.venv/bin/python}

if [ $# -eq 0 ]; then
    for name in step kernels scaling ops compare; do
        "$PY" "benchmarks/bench_$name.py"
    done
else
    name=$1
    shift
    "$PY" "benchmarks/bench_$name.py" "$@"
fi
"$PY" benchmarks/report.py
