"""Static probe for C6-e10 (docs/exploration.md): how close an untrained 4-layer RNN already is to
the untrained Transformer guide of `lm_rnn4_untrained_transformer_e10`, pair by pair (RNN layer k
with block k), under each reduction; no training. One batch of 64 training windows per target seed.

    OMP_NUM_THREADS=1 python scripts/c6_reduction_probe.py [SEEDS]   # ~30 s for 2 seeds
"""

import sys
from pathlib import Path

import torch

from repguide import Guidance
from repguide.build import build_data, build_model, load_guide
from repguide.config import load_recipe

seeds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
config = load_recipe("lm_rnn4_untrained_transformer_e10", "small", {"name": "probe"})
splits = build_data(config.data)
guide = load_guide(config, splits, Path("runs"))  # untrained: built from guidance.guide_seed
print("| target seed | reduction | " + " | ".join(f"layer {k} ~ block {k}" for k in range(4)) + " |")
print("|---|---|" + "---|" * 4)
for seed in range(seeds):
    target = build_model(config.model, splits, seed)
    loader = torch.utils.data.DataLoader(splits.train, batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    inputs = next(iter(loader))[0]
    for reduction in ("flatten", "tokens", "mean"):
        guidance = Guidance(target, guide, reduction=reduction, layers=config.guidance.layers)
        with torch.no_grad():
            sims = guidance(inputs).similarities.values()
        print(f"| {seed} | {reduction} | " + " | ".join(f"{float(s):.3f}" for s in sims) + " |", flush=True)
