#!/usr/bin/env bash
# Exploration for C5 (parity) and C6 (language modelling), seed 0, in runs/explore.
RD=${RD:-/tmp/rd}/explore
mkdir -p $RD/logs && cp -r .gpu/runs/parity_rnn_baseline_s0 $RD/
export PYTHONPATH=$PWD/.gpu/site:$PYTHONPATH
go() {  # name recipe overrides...
  n=$1; r=$2; shift 2; t0=$(date +%s)
  python3 -m repguide.cli run $r --scale small --runs-dir $RD --quiet name=$n train.seed=0 "$@" > $RD/logs/$n.txt 2>&1
  echo "explore $n rc=$? $(( $(date +%s) - t0 ))s $(tail -n 1 $RD/logs/$n.txt)"
}
c5() {
  G=guidance.guide_run=parity_rnn_baseline_s0
  go c5_w10 parity_transformer_rnn $G guidance.weight=10
  go c5_tokens parity_transformer_rnn $G guidance.reduction=tokens
  go c5_tokens_w10 parity_transformer_rnn $G guidance.reduction=tokens guidance.weight=10
  go c5_unbiased parity_transformer_rnn $G guidance.measure=cka_unbiased
  go c5_long_baseline parity_transformer_baseline train.epochs=20
  go c5_long_rnn parity_transformer_rnn $G train.epochs=20
}
c6() {
  W="data.name=shakespeare_word data.perplexity_unit=word train.epochs=10 train.max_steps=null"
  go c6_word_transformer lm_transformer_baseline $W
  go c6_word_rnn lm_rnn_baseline $W
  go c6_word_rnn_transformer lm_rnn_transformer $W guidance.guide_run=c6_word_transformer
  go c6_word_rnn_untrained lm_rnn_untrained_transformer $W
  L="train.epochs=5 train.max_steps=null"
  go c6_long_transformer lm_transformer_baseline $L
  go c6_long_rnn lm_rnn_baseline $L
}
c5 & c6 &
wait
