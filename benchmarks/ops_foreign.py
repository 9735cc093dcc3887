"""Op count of a guided step on pairs written outside benchmarks/ (issue 14's check on what the
benchmarks were not tuned on): the foreign models of tests/test_foreign_models.py (Hugging Face
GPT-2, BERT, Llama and ViT from small configs with random weights; torch's TransformerEncoder; a
stacked nn.GRU and nn.LSTM; an MLP; a hand-written CNN) in every ordered pair that shares an
input, with ``Guidance`` defaults, batch 64; and the issue's own pair, an FCN 24×512 guided by 8
conv+BN+ReLU layers of width 16 (batch 64, 8 stretched pairs). Counted as bench_ops counts them
(aten ops below autograd, host syncs, the accelerator's paths: ``fused.CPU_TUNED = False``);
extra ops per pair = (guided step − plain step − guide forward under no_grad) / pairs; the host
syncs are those whose innermost ``src/repguide`` frame issued them; beside them, every sync of the
whole guided step and of the plain step (the models' own and Adam's, whose CPU step reads each
parameter's step count).

    PYTHONPATH=src python benchmarks/ops_foreign.py        # ~1-2 min on 1 thread
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT), str(ROOT.parent / "tests")]

from bench_ops import OpCounter  # noqa: E402  (sets fused.CPU_TUNED = False)
import test_foreign_models as foreign  # noqa: E402

import repguide as rg  # noqa: E402

BATCH = 64


def fcn_and_cnn():
    torch.manual_seed(0)
    fcn = [nn.Flatten()] + [m for i in range(24) for m in (nn.Linear(784 if i == 0 else 512, 512), nn.ReLU())]
    cnn = [m for i in range(8)
           for m in (nn.Conv2d(1 if i == 0 else 16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())]
    target = nn.Sequential(*fcn, nn.Linear(512, 10))
    guide = nn.Sequential(*cnn, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    # the 8 guide ReLUs, each with every third of the target's 24 ReLUs (a stretch by hand)
    pairs = [(str(2 * (3 * k + 2) + 2), str(3 * k + 2)) for k in range(8)]
    return target, guide, torch.randn(BATCH, 1, 28, 28), dict(pairs=pairs)


def count(target, guide, x, options=None):
    guidance = rg.Guidance(target, guide, example_input=x, **(options or {}))
    optimizer = torch.optim.Adam(target.parameters(), lr=1e-3)

    def step(guided):
        out = guidance(x) if guided else None
        loss = out.output.float().mean() + out.loss if guided else target(x).float().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def counted(fn):
        fn()  # warm-up: optimiser state, discovery
        with OpCounter() as c:
            fn()
        return c

    plain, guided = counted(lambda: step(False)), counted(lambda: step(True))
    with torch.no_grad():
        forward = counted(lambda: guide(x))
    pairs = len(guidance.pairs)
    ours = sum(n for (_, site), n in guided.syncs.items() if site.startswith("src/repguide"))
    syncs = f"{ours} ({guided.sync_count} / {plain.sync_count})"
    return pairs, (guided.total - plain.total - forward.total) / pairs, syncs


def main() -> None:
    foreign.BATCH = BATCH
    rows = [("FCN 24x512 <- 8 conv+BN+ReLU w16 (the issue's pair)", *count(*fcn_and_cnn()))]
    for t, g in foreign.ORDERED_PAIRS:
        x = foreign.batch(foreign.MODELS[t][1])
        try:
            rows.append((f"{t} <- {g}", *count(foreign.build(t, 0), foreign.build(g, 1), x)))
        except Exception as e:  # a pair the defaults cannot run: say why, go on
            rows.append((f"{t} <- {g}", "—", f"{type(e).__name__}: {str(e).splitlines()[0][:90]}", "—"))
    print("| pair | pairs | extra ops per pair | host syncs in repguide's frames (whole guided / plain step) |")
    print("|---|---|---|---|")
    for name, pairs, extra, syncs in rows:
        print(f"| {name} | {pairs} | {extra if isinstance(extra, str) else f'{extra:.1f}'} | {syncs} |")


if __name__ == "__main__":
    main()
