#!/usr/bin/env bash
# One prepared device call: install carried wheels, smoke test, C3 runs + C5/C6 exploration, then the GPU benchmark.
export PYTHONUNBUFFERED=1 MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/.gpu/site REPGUIDE_FASHION_MNIST=$PWD/.gpu/fashion-mnist
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch, repguide, lightning_fabric, pydantic; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" || exit 1
t0=$(date +%s)
timeout 40 python3 -m repguide.cli run plain_convnet_untrained_resnet18 --scale tiny --runs-dir /tmp/tiny --quiet 2>&1 | tail -n 3
echo "smoke $(( $(date +%s) - t0 ))s"
timeout ${TRAIN_LIMIT:-360} bash .gpu/c3.sh &
timeout ${TRAIN_LIMIT:-360} bash .gpu/explore.sh &
wait
pkill -f repguide.cli; sleep 2
echo "training done $(( $(date +%s) - t0 ))s"
tar czf $OUT/runs.tgz -C /tmp/rd --exclude='*.ckpt' --exclude=final.pt --exclude='resnet18_fmnist_*' --exclude='parity_rnn_baseline_s0' .
nvidia-smi --query-gpu=memory.used --format=csv
if [ -f benchmarks/gpu.sh ]; then STEP_LIMIT_S=80 KERNELS_LIMIT_S=40 timeout ${BENCH_LIMIT:-150} bash benchmarks/gpu.sh; fi
echo "all done $(( $(date +%s) - t0 ))s"
