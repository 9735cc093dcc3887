"""How the exact guided step grows with the number of pairs, the batch size and the width.

Target: Deep FCN (16 × w, BatchNorm, ReLU); guide: Deep FCN (16 × 2w), so every pair costs the
same. Each point times, interleaved in one process, the plain target step, the guide forward
(no_grad) and the guided step; the *alignment cost* is guided − plain − guide forward. The
measured exponent is the least-squares slope of log time against log size:

* pairs P ∈ {1, 2, 4, 8, 16} (n = 256, w = 256): alignment cost ∝ P, expected 1;
* batch n ∈ {64, 128, 256, 512} (P = 8, w = 256): plain step ∝ n (1); alignment cost ∝ n²·d for
  the Grams (2), with O(n·d) centring passes pulling the measured slope below 2 at small n;
* width w ∈ {64, 128, 256, 512} (P = 8, n = 256): plain step ∝ w² (2, once the matmuls dominate);
  alignment cost ∝ n²·w (1).

Expected exponents are asymptotic; the table gives the slope over all points and over the last
two, where fixed per-call costs matter least.

    bash benchmarks/run.sh scaling [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import check_environment, interleaved, machine, require_cpu, save, slope, table  # noqa: E402

import repguide as rg  # noqa: E402
from repguide import models  # noqa: E402

DEPTH = 16


def point(pairs: int, n: int, width: int, repeats: int) -> dict:
    torch.manual_seed(0)
    x, y = torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,))

    def target():
        torch.manual_seed(0)
        return models.create("deep_fcn", depth=DEPTH, width=width, dropout=0.0)

    guide = models.create("deep_fcn", depth=DEPTH, width=2 * width, dropout=0.0).eval()
    plain_net, guided_net = target(), target()
    chosen = [round(i * (DEPTH - 1) / max(pairs - 1, 1)) for i in range(pairs)]
    guidance = rg.Guidance(guided_net, guide, pairs=[(f"blocks.{i}.linear", f"blocks.{i}.linear") for i in chosen])
    opt_plain = torch.optim.Adam(plain_net.parameters())
    opt_guided = torch.optim.Adam(guided_net.parameters())

    def plain():
        opt_plain.zero_grad(set_to_none=True)
        F.cross_entropy(plain_net(x), y).backward()
        opt_plain.step()

    def guide_forward():
        with torch.no_grad():
            guide(x)

    def guided():
        out = guidance(x)
        opt_guided.zero_grad(set_to_none=True)
        (F.cross_entropy(out.output, y) + out.loss).backward()
        opt_guided.step()

    timed = interleaved({"plain": plain, "guide forward": guide_forward, "guided": guided}, repeats)
    med = {k: v["median"] for k, v in timed.items()}
    med["alignment"] = max(med["guided"] - med["plain"] - med["guide forward"], 1e-6)
    return med


SWEEPS = {
    "pairs": ("P", [1, 2, 4, 8, 16], lambda v: dict(pairs=v, n=256, width=256),
              {"guided": None, "alignment": 1.0}),
    "batch": ("n", [64, 128, 256, 512], lambda v: dict(pairs=8, n=v, width=256),
              {"plain": 1.0, "guided": None, "alignment": 2.0}),
    "width": ("w", [64, 128, 256, 512], lambda v: dict(pairs=8, n=256, width=v),
              {"plain": 2.0, "guided": None, "alignment": 1.0}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    require_cpu("bench_scaling")
    check_environment()
    repeats = 3 if args.quick else 7
    result = {"machine": machine(), "sweeps": {}}
    print("# bench_scaling\n", result["machine"], flush=True)
    md = []
    for name, (symbol, values, config, expected) in SWEEPS.items():
        points = [point(repeats=repeats, **config(v)) for v in values]
        result["sweeps"][name] = {"values": values, "points": points}
        rows = [[f"{symbol}={v}", p["plain"] * 1e3, p["guide forward"] * 1e3, p["guided"] * 1e3, p["alignment"] * 1e3]
                for v, p in zip(values, points)]
        fits = {k: slope(values, [p[k] for p in points]) for k in expected}
        tails = {k: slope(values[-2:], [p[k] for p in points[-2:]]) for k in expected}
        result["sweeps"][name]["exponents"] = {"all points": fits, "last two": tails}
        exponents = "; ".join(
            f"{k}: measured {fits[k]:.2f} (last two points {tails[k]:.2f})"
            + (f", expected {e:.0f}" if e is not None else "")
            for k, e in expected.items()
        )
        md.append(f"**{name}** ({exponents})\n\n" + table(
            [symbol, "plain ms", "guide fwd ms", "guided ms", "alignment cost ms"], rows))
        print(md[-1], flush=True)
    result["markdown"] = "\n\n".join(md)
    result["machine"]["loadavg_1min_end"] = os.getloadavg()[0]
    print("saved", save("bench_scaling", result))


if __name__ == "__main__":
    main()
