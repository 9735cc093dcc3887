"""R1 on pairs written outside benchmarks/ (issue 14's "the CPU R1 on another pair"): the exact
guided step against its floor (plain step + guide forward + every pair's products, each timed
alone; benchmarks/README.md's definition, bench_step's code), for the issue's own pair (an FCN
24×512 guided by 8 conv+BN+ReLU layers of width 16, 8 stretched pairs) at batch 64 and 256, and
for pairs of tests/test_foreign_models.py's models (Hugging Face GPT-2, BERT, ViT from small configs
with random weights; a stacked nn.LSTM; an MLP; a hand-written CNN), batch 64, Guidance defaults.
The task loss is the outputs' mean (the models' own heads). Times are medians of interleaved rounds
on this machine's CPU path (what a CPU user runs: ``fused.CPU_TUNED`` as shipped).

    PYTHONPATH=src python benchmarks/r1_foreign.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT), str(ROOT.parent / "tests")]

from _common import interleaved, machine  # noqa: E402
from _floor import floor_products, time_products  # noqa: E402
import test_foreign_models as foreign  # noqa: E402

import repguide as rg  # noqa: E402

PAIRS = [("gpt2", "bert"), ("bert", "gpt2"), ("lstm", "gpt2"), ("gpt2", "lstm"), ("vit", "cnn"), ("cnn", "mlp")]


def issue_pair(batch: int):
    torch.manual_seed(0)
    fcn = [nn.Flatten()] + [m for i in range(24) for m in (nn.Linear(784 if i == 0 else 512, 512), nn.ReLU())]
    cnn = [m for i in range(8)
           for m in (nn.Conv2d(1 if i == 0 else 16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())]
    target = nn.Sequential(*fcn, nn.Linear(512, 10))
    torch.manual_seed(1)
    guide = nn.Sequential(*cnn, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    pairs = [(str(2 * (3 * k + 2) + 2), str(3 * k + 2)) for k in range(8)]  # as benchmarks/ops_foreign.py
    return target, guide, torch.randn(batch, 1, 28, 28), dict(pairs=pairs)


def _loss(output) -> torch.Tensor:
    output = getattr(output, "logits", output)
    output = output[0] if isinstance(output, tuple) else output
    return output.float().mean()


def r1(target, guide, x, options=None, repeats: int = 15) -> dict:
    guide.eval()
    guidance = rg.Guidance(target, guide, example_input=x, **(options or {}))
    optimizer = torch.optim.Adam(target.parameters(), lr=1e-3)

    def step(guided: bool) -> None:
        if guided:
            out = guidance(x)
            loss = _loss(out.output) + out.loss
        else:
            loss = _loss(target(x))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def guide_forward() -> None:
        with torch.no_grad():
            guide(x)

    timed = interleaved({"plain": lambda: step(False), "guide forward": guide_forward,
                         "exact": lambda: step(True)}, repeats)
    med = {k: v["median"] for k, v in timed.items()}
    products = floor_products(guidance, x)
    times = time_products(products, repeats=max(5, repeats))
    product_total = sum(times[str((op, dims))] * c for _, op, dims, c in products)
    floor = med["plain"] + med["guide forward"] + product_total
    return {"pairs": len(guidance.pairs), "plain": med["plain"], "guide": med["guide forward"],
            "products": product_total, "exact": med["exact"], "R1": med["exact"] / floor}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    print(machine())
    foreign.BATCH = 64
    cases = [(f"FCN 24x512 <- 8 conv+BN+ReLU w16 (the issue's pair), batch {b}", lambda b=b: issue_pair(b))
             for b in (64, 256)]
    cases += [(f"{t} <- {g}, batch 64", lambda t=t, g=g: (foreign.build(t, 0), foreign.build(g, 1),
                                                          foreign.batch(foreign.MODELS[t][1]), {}))
              for t, g in PAIRS]
    print("| pair | pairs | plain ms | guide forward ms | products ms | exact ms | R1 |")
    print("|---|---|---|---|---|---|---|")
    for name, make in cases:
        try:
            r = r1(*make(), repeats=args.repeats)
        except Exception as e:  # a pair the defaults cannot run: say why, go on
            print(f"| {name} | — | {type(e).__name__}: {str(e).splitlines()[0][:100]} | | | | |", flush=True)
            continue
        ms = [f"{r[k] * 1e3:.1f}" for k in ("plain", "guide", "products", "exact")]
        print(f"| {name} | {r['pairs']} | {' | '.join(ms)} | **{r['R1']:.3f}** |", flush=True)


if __name__ == "__main__":
    main()
