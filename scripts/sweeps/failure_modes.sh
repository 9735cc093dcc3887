#!/bin/sh
# Issue 17's failure-mode sweeps (no guidance, seed 0, small scale), fixed before they run; each run
# is resumable and skipped once finished, so the script picks up where a stopped session left off.
#
#   nohup sh scripts/sweeps/failure_modes.sh c2 > runs/logs/sweep_c2.log 2>&1 &
#   nohup sh scripts/sweeps/failure_modes.sh c6 > runs/logs/sweep_c6.log 2>&1 &
#   nohup sh scripts/sweeps/failure_modes.sh c5 > runs/logs/sweep_c5.log 2>&1 &
#   nohup sh scripts/sweeps/failure_modes.sh c6-long > runs/logs/sweep_c6_long.log 2>&1 &
#   nohup sh scripts/sweeps/failure_modes.sh c6-width > runs/logs/sweep_c6_width.log 2>&1 &
#
# c2: the wide FCN against the ResNet-18 at equal budgets (30 epochs each) on the translated 40×40
#     canvas and on 1,000 images (docs/exploration.md, "C2, wide FCN").
# c6: the paper's depth (a 4-layer tanh RNN with zero initial states) against the Transformer, at
#     1 and 3 epochs of characters and at context 256.
# c6-long: the same two at 10 epochs (added after c6's 3-epoch rows; ~100 CPU minutes each).
# c6-width: the width axis the issue names, at 1 epoch of context 128: the 4-layer RNN at hidden 128
#     and 512, the Transformer at dim 64 and 256 (4 heads each; fixed before c6-long's Transformer
#     row finished).
# c5: the Transformer at the RNN's budget (12,000 steps) on parity, with per-length accuracy in each
#     summary.json: the lr and the positions, for the paper's regime (short strings solved).
# Results: runs/explore17/<name>/summary.json; tables in docs/exploration.md.
set -u
cd "$(dirname "$0")/../.."
RUNS=runs/explore17
run() {  # run NAME RECIPE OVERRIDES...
    name=$1 recipe=$2
    shift 2
    [ -f "$RUNS/$name/summary.json" ] && return 0
    flag=--overwrite
    [ -f "$RUNS/$name/last.ckpt" ] && flag=--resume
    echo "== $name $(date +%T)"
    OMP_NUM_THREADS=1 .venv/bin/repguide run "$recipe" --scale small --runs-dir "$RUNS" --quiet $flag \
        "name=$name" train.seed=0 "$@" > /dev/null 2>&1 || echo "!! $name failed"
}
case ${1:-} in
c2)
    run c2_canvas40_resnet18_fmnist_e30_s0 resnet18_fmnist data.kwargs.canvas=40 train.epochs=30
    run c2_n1000_resnet18_fmnist_e30_s0 resnet18_fmnist data.kwargs.train_size=1000 train.epochs=30
    run c2_canvas40_n1000_resnet18_fmnist_e30_s0 resnet18_fmnist data.kwargs.canvas=40 data.kwargs.train_size=1000 train.epochs=30
    run c2_canvas40_n1000_wide_fcn_baseline_s0 wide_fcn_baseline data.kwargs.canvas=40 data.kwargs.train_size=1000
    ;;
c6)
    for epochs in 1 3; do
        run c6_rnn4_e${epochs}_s0 lm_rnn_baseline model.kwargs.num_layers=4 train.epochs=$epochs train.max_steps=null
        run c6_transformer_e${epochs}_s0 lm_transformer_baseline train.epochs=$epochs train.max_steps=null
    done
    run c6_rnn4_ctx256_s0 lm_rnn_baseline model.kwargs.num_layers=4 data.kwargs.context=256 train.max_steps=null
    run c6_transformer_ctx256_s0 lm_transformer_baseline data.kwargs.context=256 train.max_steps=null
    ;;
c5)
    for lr in 0.001 0.0003; do
        run c5_transformer_12k_lr${lr}_s0 parity_transformer_baseline train.epochs=40 optim.lr=$lr
    done
    run c5_transformer_12k_learned_s0 parity_transformer_baseline train.epochs=40 model.kwargs.positions=learned
    ;;
c6-long)  # added after the c6 rows above showed the gap closing with epochs (docs/exploration.md)
    run c6_rnn4_e10_s0 lm_rnn_baseline model.kwargs.num_layers=4 train.epochs=10 train.max_steps=null
    run c6_transformer_e10_s0 lm_transformer_baseline train.epochs=10 train.max_steps=null
    ;;
c6-width)
    for widths in "128 64" "512 256"; do  # RNN hidden, Transformer dim: the narrow pair first (cheaper)
        set -- $widths
        hidden=$1 dim=$2
        run c6_rnn4_h${hidden}_s0 lm_rnn_baseline model.kwargs.num_layers=4 model.kwargs.hidden_dim=$hidden train.max_steps=null
        run c6_transformer_d${dim}_s0 lm_transformer_baseline model.kwargs.dim=$dim train.max_steps=null
    done
    ;;
*)
    echo "usage: sh scripts/sweeps/failure_modes.sh c2|c6|c5|c6-long|c6-width" >&2
    exit 2
    ;;
esac
echo "== done $(date +%T)"
