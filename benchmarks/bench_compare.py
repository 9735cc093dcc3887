"""Layer×layer comparison against its peer: ``repguide.compare`` vs the PyPI package pytorch-cka.

A 6-conv CNN against a 12-layer FCN (both untrained, plain torch, default initialisation), 2,048
examples in batches of 256, the same layers on both sides (the 6 Conv2d and the 12 hidden Linear
modules), minibatch unbiased linear CKA (HSIC₁ of Song et al. 2012 summed over minibatches, Nguyen,
Raghu & Kornblith 2021), by

* ``repguide.compare`` with its default (Gram products in the activations' float32, centring
  before them, HSIC terms and sums in float64), with ``gram_dtype=torch.float64`` (every step
  float64, the default before) and with ``dtype=torch.float32`` (the sums in float32 too),
* ``pytorch-cka==1.1.3`` (``cka.compute_cka``), installed by this script with ``pip install
  --no-deps --target benchmarks/.vendor/pytorch_cka`` beside the pinned torch (it imports tqdm and
  matplotlib, which the environment has); where it cannot be had, it is skipped and the script
  says so,

each timed over the whole data set (forwards included; interleaved rounds, median), and checked
against an independent float64 reference written here from the formula: the activations (float32,
as the models produce them) are centred in float64, per batch K = X Xᵀ, K̃ = K with a zero
diagonal, HSIC₁(K, L) = [tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1 / ((n−1)(n−2)) − 2/(n−2)·1ᵀK̃L̃1] / (n(n−3)), summed
over batches; CKA = ΣHSIC₁(K, L) / sqrt(ΣHSIC₁(K, K)·ΣHSIC₁(L, L)). (HSIC₁ is exactly invariant to
centring the features; centring first keeps the float64 Grams free of cancellation on the deep FCN
layers, whose activations are nearly constant across examples.)

Goal (issue 14): repguide at least as fast as pytorch-cka by default, and within 1e-6 of the
float64 reference.

    bash benchmarks/run.sh compare      # or: python benchmarks/bench_compare.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import check_environment, interleaved, machine, require_cpu, save, table  # noqa: E402

import repguide as rg  # noqa: E402
from repguide import data  # noqa: E402

PEER = "pytorch-cka==1.1.3"
VENDOR = Path(__file__).resolve().parent / ".vendor" / "pytorch_cka"
EXAMPLES, BATCH = 2048, 256
GOAL_ERROR = 1e-6
DEFAULT = "repguide.compare (default: float32 Grams, float64 sums)"


def cnn6() -> nn.Sequential:
    """6 convs (3×3) + ReLU, widths 16-16-32-32-64-64, stride 2 at the 3rd and 5th."""
    layers, c = [], 1
    for width, stride in [(16, 1), (16, 1), (32, 2), (32, 1), (64, 2), (64, 1)]:
        layers += [nn.Conv2d(c, width, 3, stride=stride, padding=1), nn.ReLU()]
        c = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)]
    return nn.Sequential(*layers)


def fcn12(width: int = 512) -> nn.Sequential:
    """12 hidden Linear + ReLU layers of ``width`` on flattened 1×28×28 images, then the head."""
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(12):
        layers += [nn.Linear(784 if i == 0 else width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def names(model: nn.Module, kind: type) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, kind)]


def images() -> tuple[torch.Tensor, str]:
    try:
        dataset = data.create("fashion_mnist", train_size=EXAMPLES).train
        return dataset.batch(torch.arange(EXAMPLES))[0].float(), "Fashion-MNIST"
    except (FileNotFoundError, ValueError):
        g = torch.Generator().manual_seed(0)
        return torch.randn(EXAMPLES, 1, 28, 28, generator=g), "random images (Fashion-MNIST not installed)"


# --------------------------------------------------------------------------------------------
# The independent float64 reference


def _hsic1(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Song et al. (2012), eq. 5: the unbiased HSIC of two n×n Grams (float64)."""
    n = k.shape[0]
    k, l = k.clone(), l.clone()
    k.fill_diagonal_(0)
    l.fill_diagonal_(0)
    one = torch.ones(n, dtype=k.dtype)
    trace = (k * l).sum()  # tr(K̃ L̃) for symmetric Grams
    middle = (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
    last = 2.0 / (n - 2) * (one @ k @ l @ one)
    return (trace + middle - last) / (n * (n - 3))


def reference(model_a, model_b, layers_a, layers_b, loader) -> torch.Tensor:
    """Minibatch CKA in float64 from the formula, with this script's own forward hooks."""
    acts: dict[str, torch.Tensor] = {}
    hooks = []
    for prefix, model, layers in (("a", model_a, layers_a), ("b", model_b, layers_b)):
        modules = dict(model.named_modules())
        for name in layers:
            hooks.append(modules[name].register_forward_hook(
                lambda m, i, o, key=f"{prefix}.{name}": acts.__setitem__(key, o.detach())))
    xy = torch.zeros(len(layers_a), len(layers_b), dtype=torch.float64)
    xx = torch.zeros(len(layers_a), dtype=torch.float64)
    yy = torch.zeros(len(layers_b), dtype=torch.float64)
    try:
        with torch.no_grad():
            for x, _ in loader:
                acts.clear()
                model_a(x), model_b(x)

                def grams(prefix, layers):
                    out = []
                    for name in layers:
                        f = acts[f"{prefix}.{name}"].flatten(1).double()
                        f = f - f.mean(dim=0)
                        out.append(f @ f.T)
                    return out

                ka, kb = grams("a", layers_a), grams("b", layers_b)
                for i, k in enumerate(ka):
                    xx[i] += _hsic1(k, k)
                    for j, l in enumerate(kb):
                        xy[i, j] += _hsic1(k, l)
                for j, l in enumerate(kb):
                    yy[j] += _hsic1(l, l)
    finally:
        for h in hooks:
            h.remove()
    return xy / torch.sqrt(xx[:, None] * yy[None, :])


# --------------------------------------------------------------------------------------------
# The peer


def load_peer():
    """pytorch-cka's ``compute_cka``, installed into benchmarks/.vendor/ if needed; or (None, why)."""
    if str(VENDOR) not in sys.path:
        sys.path.insert(0, str(VENDOR))
    try:
        return importlib.import_module("cka").compute_cka, None
    except ImportError:
        pass
    print(f"installing {PEER} into {VENDOR} (--no-deps) ...", flush=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(VENDOR), PEER],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return None, f"pip install {PEER} failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}"
    importlib.invalidate_caches()
    try:
        return importlib.import_module("cka").compute_cka, None
    except ImportError as e:
        return None, f"{PEER} installed but does not import: {e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    require_cpu("bench_compare")
    check_environment()
    x, source = images()
    loader = DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=BATCH, shuffle=False)
    torch.manual_seed(0)
    model_a, model_b = cnn6().eval(), fcn12().eval()
    layers_a, layers_b = names(model_a, nn.Conv2d), names(model_b, nn.Linear)[:-1]
    payload = {"machine": machine(), "data": source, "examples": EXAMPLES, "batch": BATCH,
               "layers_a": layers_a, "layers_b": layers_b}
    print("# bench_compare\n", payload["machine"], flush=True)

    ref = reference(model_a, model_b, layers_a, layers_b, loader)
    out: dict[str, torch.Tensor] = {}

    def run(name, fn):
        def call():
            out[name] = fn()
        return call

    fns = {
        DEFAULT: run(DEFAULT, lambda: rg.compare(model_a, model_b, loader, layers_a, layers_b).matrix),
        "repguide.compare (gram_dtype=float64: every step float64)": run(
            "repguide.compare (gram_dtype=float64: every step float64)", lambda: rg.compare(
                model_a, model_b, loader, layers_a, layers_b, gram_dtype=torch.float64).matrix),
        "repguide.compare (dtype=float32: sums float32 too)": run("repguide.compare (dtype=float32: sums float32 too)", lambda: rg.compare(
            model_a, model_b, loader, layers_a, layers_b, dtype=torch.float32).matrix),
    }
    compute_cka, why = load_peer()
    if compute_cka is not None:
        fns[PEER] = run(PEER, lambda: compute_cka(model_a, model_b, loader, layers=layers_a, model2_layers=layers_b,
                                                  device="cpu", progress=False)[0])
    else:
        print(f"skipping {PEER}: {why}", flush=True)
        payload["peer_skipped"] = why
    timed = interleaved(fns, args.repeats, warmup=1)
    rows, payload["tools"] = [], {}
    for name, t in timed.items():
        err = (out[name].double().cpu() - ref).abs()
        worst = divmod(int(err.argmax()), err.shape[1])
        payload["tools"][name] = {"timing": t, "max_abs_error": float(err.max()), "mean_abs_error": float(err.mean()),
                                  "worst_cell": [layers_a[worst[0]], layers_b[worst[1]]],
                                  "worst_value": float(out[name][worst]), "reference_value": float(ref[worst])}
        rows.append([name, t["median"], float(err.max()), f"cnn.{layers_a[worst[0]]} × fcn.{layers_b[worst[1]]}: "
                     f"{float(out[name][worst]):.4g} vs {float(ref[worst]):.4g}", float(err.mean())])
    md = [f"6-conv CNN × 12-layer FCN (untrained), {EXAMPLES} examples ({source}), batch {BATCH}, "
          f"{len(layers_a)}×{len(layers_b)} layers, minibatch unbiased CKA. Goal: repguide's default at least as "
          f"fast as pytorch-cka and within {GOAL_ERROR:g} of the float64 reference.\n",
          table(["tool", "median s (whole data set)", "max abs error vs float64 reference", "worst cell",
                 "mean abs error"], rows)]
    if PEER in timed:
        default = timed[DEFAULT]["median"]
        peer = timed[PEER]["median"]
        err = payload["tools"][DEFAULT]["max_abs_error"]
        md.append(f"\nrepguide default / pytorch-cka time = **{default / peer:.2f}** (goal ≤ 1: "
                  f"{'met' if default <= peer else 'not met'}); repguide default max error **{err:.2g}** "
                  f"(goal ≤ {GOAL_ERROR:g}: {'met' if err <= GOAL_ERROR else 'not met'})")
    else:
        md.append(f"\n{PEER} skipped: {why}")
    md.append(f"\nreference CKA range: {float(ref.min()):.4g} to {float(ref.max()):.4g}")
    payload["markdown"] = "\n".join(md)
    payload["machine"]["loadavg_1min_end"] = os.getloadavg()[0]
    print(payload["markdown"], flush=True)
    print("saved", save("bench_compare", payload))


if __name__ == "__main__":
    main()
