#!/usr/bin/env bash
# C5-budget's rows on a lent GPU (~2 CPU hours each here, minutes there): one lane per seed, each
# the 12,000-step RNN guide, then the Transformer and the RNN-guided Transformer at 12,000 steps.
# Prepared in session 23, not yet run on a GPU; checked on the CPU at SCALE=tiny.
#
#   bash scripts/gpu/c5_budget.sh                      # in a device call, after go.sh's set-up
#   SCALE=tiny RD=/tmp/c5b OUT=/tmp bash scripts/gpu/c5_budget.sh   # the same commands, in seconds
#
# The run names and overrides are C5-budget's (recipes/claims/paper.yaml), so `repguide reproduce
# --only C5-budget` counts the returned folders as its runs: unpack $OUT/c5_budget.tgz into
# runs/reproduce-small, then `repguide reproduce --scale small --seeds 3 --only C5-budget
# --runs-dir runs/reproduce-small --recipes none` reports and records them.
set -u
RD=${RD:-/tmp/rd/c5_budget}
SCALE=${SCALE:-small}
mkdir -p "$RD/logs"
lane() {
    s=$1
    go() {  # go RUN RECIPE OVERRIDES...
        n=$1 r=$2
        shift 2
        t0=$(date +%s)
        OMP_NUM_THREADS=2 python3 -m repguide.cli run "$r" --scale "$SCALE" --runs-dir "$RD" --quiet --overwrite \
            "name=${n}_s$s" "train.seed=$s" "$@" > "$RD/logs/${n}_s$s.txt" 2>&1
        echo "lane $s $n rc=$? $(( $(date +%s) - t0 ))s $(tail -n 1 "$RD/logs/${n}_s$s.txt")"
    }
    go parity_rnn_baseline parity_rnn_baseline
    go parity_transformer_12k parity_transformer_baseline train.epochs=40
    go parity_transformer_rnn_12k parity_transformer_rnn train.epochs=40 "guidance.guide_run=parity_rnn_baseline_s$s"
}
for s in ${LANES:-0 1 2}; do lane "$s" & done
wait
tar czf "${OUT:-/tmp}/c5_budget.tgz" -C "$RD" --exclude='*.ckpt' --exclude=final.pt --exclude=logs .
