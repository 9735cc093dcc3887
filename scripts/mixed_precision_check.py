"""How far one mixed-precision guided step is from the same step in fp32 (numbers in docs/scaling.md).

    python scripts/mixed_precision_check.py [recipe] [key=value ...] [--scale tiny|small|paper]

Builds the recipe's target, guide and Guidance as ``repguide run`` does, takes its first batch and
runs one guided forward and backward (the loop's step without the optimiser) under Fabric's
``32-true``, ``64-true`` (a float64 target: how sensitive the step is to rounding at all),
``bf16-mixed`` and fp16 autocast; prints each one's alignment loss, similarities, and gradients (of
the whole loss, and of the alignment loss alone) against ``32-true``. The similarity itself is
always computed in fp32; what differs is the activations it is given.

fp16 runs through an explicit ``MixedPrecision("16-mixed", "cpu")`` plugin, i.e. what ``16-mixed``
does on a GPU (Fabric turns the string ``16-mixed`` into ``bf16-mixed`` on a CPU), at the scale
the loss scaler would settle on: halved from 2**16 until the gradients are finite.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning_fabric import Fabric
from lightning_fabric.plugins.precision.amp import MixedPrecision

from repguide import data as datasets
from repguide.build import build_model, load_guide
from repguide.config import load_recipe, parse_overrides
from repguide.guidance import Guidance
from repguide.steps import step_seed, task_loss


def guided_step(config, **fabric_args) -> dict:
    """Losses, similarities and (unscaled) target gradients of the recipe's first guided step."""
    fabric = Fabric(accelerator="cpu", devices=1, **fabric_args)
    tc, gc = config.train, config.guidance
    splits = datasets.create(config.data.name, **config.data.kwargs)
    target = build_model(config.model, splits, tc.seed)
    guide = load_guide(config, splits, Path("runs"))
    order = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(step_seed(tc.seed, 0)))
    *inputs, y = splits.train.batch(order[: tc.batch_size])
    pairs = [tuple(p) for p in gc.pairs] if isinstance(gc.pairs, list) else gc.pairs
    guidance = Guidance(
        target, guide, pairs=pairs, measure=gc.measure, weight=gc.weight, guide_input=gc.guide_input,
        reduction=gc.reduction, layer_types=gc.layer_types, example_input=tuple(inputs),
    )
    guidance.run_target_with(fabric.setup_module(target))
    torch.manual_seed(step_seed(tc.seed, 0, 0))  # the same dropout masks in every precision
    with fabric.autocast():
        out = guidance(*inputs)
    task = task_loss(out.output, y)
    scaler = getattr(fabric.strategy.precision, "scaler", None)
    scale = scaler.get_scale() if scaler is not None else 1.0
    params = list(target.parameters())
    align_grads = torch.autograd.grad(out.loss * scale, params, retain_graph=True, allow_unused=True)
    fabric.backward(task + out.loss)

    def flat(grads) -> torch.Tensor:
        return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().double() / scale
                          for g, p in zip(grads, params)])

    return {
        "align": float(out.loss.detach()), "task": float(task.detach()), "scale": scale,
        "sims": {k: float(v.detach()) for k, v in out.similarities.items()},
        "grads": flat([p.grad for p in params]), "align_grads": flat(align_grads),
    }


def fp16_step(config) -> dict:
    scale = 2.0**16
    while True:
        scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        run = guided_step(config, plugins=MixedPrecision("16-mixed", "cpu", scaler=scaler))
        if torch.isfinite(run["grads"]).all():
            return run
        scale /= 2


def versus(g: torch.Tensor, ref: torch.Tensor) -> str:
    rel = float((g - ref).norm() / ref.norm())
    return f"rel. diff {rel:.2e}, cosine {float(F.cosine_similarity(g, ref, dim=0)):.6f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default="deep_fcn_untrained_resnet18")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--scale", default="tiny")
    args = parser.parse_args()
    config = load_recipe(args.recipe, args.scale, parse_overrides(args.overrides))
    ref = guided_step(config, precision="32-true")
    print(f"{config.name} ({args.scale}), batch {config.train.batch_size}, torch {torch.__version__}")
    print(f"32-true: alignment loss {ref['align']:.6f}, task loss {ref['task']:.6f}, {len(ref['sims'])} pairs, "
          f"|gradient| {float(ref['grads'].norm()):.4g}, "
          f"|alignment gradient| {float(ref['align_grads'].norm()):.4g}")
    for label in ("32-true again", "64-true", "bf16-mixed", "fp16"):
        run = fp16_step(config) if label == "fp16" else guided_step(config, precision=label.split()[0])
        sim_diff = max(abs(run["sims"][k] - s) for k, s in ref["sims"].items())
        align_diff = abs(run["align"] - ref["align"]) / ref["align"]
        task_diff = abs(run["task"] - ref["task"]) / ref["task"]
        print(
            f"{label}" + (f" (loss scale {run['scale']:g})" if label == "fp16" else "") + ": "
            f"alignment loss rel. diff {align_diff:.2e}, max |Δ similarity| {sim_diff:.2e}, "
            f"task loss rel. diff {task_diff:.2e}; gradient {versus(run['grads'], ref['grads'])}; "
            f"alignment gradient {versus(run['align_grads'], ref['align_grads'])}"
        )


if __name__ == "__main__":
    main()
