#!/usr/bin/env bash
# C6-e10's rows on a lent GPU: one lane per seed, each the 10-epoch Transformer, the 4-layer RNN,
# the RNN guided by that same lane's Transformer (block k -> layer k) and by an untrained one.
# On this 2-core CPU a lane takes ~6 CPU hours at one thread (the Transformer ~110 min, the guided
# RNN ~100), and the record holds no weights, so the trained-guide row needs its Transformer
# trained again in the same session: that chain is what a GPU can do in minutes.
#
#   bash scripts/gpu/c6_e10.sh                              # in a device call (data set-up as in go.sh)
#   SCALE=tiny RD=/tmp/c6e OUT=/tmp bash scripts/gpu/c6_e10.sh   # the same commands, in seconds
#
# The run names and overrides are C6-e10's (recipes/claims/paper.yaml), so `repguide reproduce
# --only C6-e10` counts the returned folders as its runs: unpack $OUT/c6_e10.tgz into
# runs/reproduce-small, then `repguide reproduce --scale small --seeds 3 --only C6-e10
# --runs-dir runs/reproduce-small --recipes none` reports and records them. LANE_LIMIT_S bounds
# each lane; what finished before it is packed all the same.
set -u
RD=${RD:-/tmp/rd/c6_e10}
SCALE=${SCALE:-small}
PY=${PY:-python3}
mkdir -p "$RD/logs"
lane() {
    s=$1
    go() {  # go RECIPE OVERRIDES...
        r=$1
        shift
        t0=$(date +%s)
        OMP_NUM_THREADS=${THREADS:-2} "$PY" -m repguide.cli run "$r" --scale "$SCALE" --runs-dir "$RD" --quiet --overwrite \
            "name=${r}_s$s" "train.seed=$s" "$@" > "$RD/logs/${r}_s$s.txt" 2>&1
        rc=$?
        echo "lane $s $r rc=$rc $(( $(date +%s) - t0 ))s $(grep -m1 '"test_metric"' "$RD/logs/${r}_s$s.txt" | tr -d ' ,')"
        return $rc
    }
    # The guided row first after its guide: it is the one a CPU session cannot finish.
    go lm_transformer_e10 && go lm_rnn4_transformer_e10 "guidance.guide_run=lm_transformer_e10_s$s"
    go lm_rnn4_untrained_transformer_e10
    go lm_rnn4_e10
}
for s in ${LANES:-0 1 2}; do timeout "${LANE_LIMIT_S:-100000}" bash -c "$(declare -f lane); RD='$RD' SCALE='$SCALE' PY='$PY' THREADS='${THREADS:-2}' lane $s" & done
wait
tar czf "${OUT:-/tmp}/c6_e10.tgz" -C "$RD" --exclude='*.ckpt' --exclude=final.pt --exclude=logs .
