#!/usr/bin/env bash
# C3 at small scale on the lent GPU: 5 rows x 3 seeds, one lane per seed, guides carried from this machine.
RD=${RD:-/tmp/rd}
mkdir -p $RD/logs && cp -r .gpu/runs/* $RD/
export REPGUIDE_FASHION_MNIST=$PWD/.gpu/fashion-mnist
lane() {
  s=$1
  for r in ${RECIPES:-plain_convnet_baseline plain_convnet_resnet18 plain_convnet_untrained_resnet18 plain_convnet_init plain_convnet_distill}; do
    extra=""
    case $r in plain_convnet_resnet18|plain_convnet_distill) extra="guidance.guide_run=resnet18_fmnist_s$s";; esac
    t0=$(date +%s)
    python3 -m repguide.cli run $r --scale small --runs-dir $RD --quiet name=${r}_s$s train.seed=$s $extra $EXTRA > $RD/logs/s$s.$r.txt 2>&1
    echo "lane $s $r rc=$? $(( $(date +%s) - t0 ))s $(tail -n 1 $RD/logs/s$s.$r.txt)"
  done
}
for s in ${LANES:-0 1 2}; do lane $s & done
wait
