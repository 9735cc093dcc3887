"""Pair diagnostics before training: can each (target layer, guide layer) pair carry the guide's bias?

For every pair of a :class:`~repguide.guidance.Guidance`, on one batch:

* ``similarity``: the measure between the two layers now (what the alignment loss starts from);
* ``floor``: the same measure against the guide layer of a *shuffled* batch (example i of the target
  against example π(i) of the guide): what unrelated examples already score at this batch size.
  A pair that starts within ``margin`` of 1 or of its floor has almost no gradient to follow;
* ``shares``: for a guide layer with positions ``(n, T, d)``, the share of its across-example
  variance that sits in each group of positions the caller names (e.g. ``{"copy": mask}``), and
  ``"all"`` = 1. A layer whose variance at the positions that need context is ~0 carries nothing
  there beyond each position's own token: aligning to it cannot reward memory.

The groups are the caller's (``Guidance`` imports nothing from :mod:`repguide.data`); the CLI's
``repguide pairs RECIPE`` takes them from the task's data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from repguide.capture import Capture, input_batch_size, reduce
from repguide.errors import GuidanceError

__all__ = ["Diagnosable", "PairDiagnostic", "diagnose", "variance_shares"]


@dataclass(frozen=True)
class PairDiagnostic:
    target: str
    guide: str
    similarity: float
    floor: float
    shares: dict[str, float] = field(default_factory=dict)
    warning: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def variance_shares(activation: Tensor, positions: Mapping[str, Tensor]) -> dict[str, float]:
    """Share of ``activation``'s across-example variance in each group of positions.

    ``activation: (n, T, d)``; each group a bool mask ``(T,)`` or ``(n, T)`` (per example, for
    variable lengths). The variance at (i, t) is ``‖a[i, t] − mean_i a[:, t]‖²``; a group's share is
    its sum over the group's (i, t) divided by the sum over every (i, t).
    """
    if activation.dim() != 3:
        raise GuidanceError(f"variance shares need an activation (n, T, d), got shape {tuple(activation.shape)}")
    a = activation.detach().double()
    dev = (a - a.mean(dim=0, keepdim=True)).pow(2).sum(dim=-1)  # (n, T)
    total = dev.sum()
    shares = {}
    for name, mask in positions.items():
        mask = torch.as_tensor(mask, dtype=torch.bool, device=dev.device)
        if mask.shape not in (dev.shape[1:], dev.shape):
            raise GuidanceError(
                f"position group {name!r} has shape {tuple(mask.shape)}; it must be (T,) = "
                f"{tuple(dev.shape[1:])} or (n, T) = {tuple(dev.shape)}"
            )
        part = (dev * mask.expand_as(dev)).sum()
        shares[name] = float(part / total) if total > 0 else float("nan")
    return shares


@torch.no_grad()
def diagnose(
    guidance, *args: Any, positions: Mapping[str, Tensor] | None = None, margin: float = 0.02,
    seed: int = 0, **kwargs: Any,
) -> list[PairDiagnostic]:
    """One :class:`PairDiagnostic` per pair of ``guidance`` on the batch ``args``/``kwargs``.

    Both networks run once, in eval mode, without gradients; their training mode is restored.
    """
    if not guidance._probed:
        guidance._resolve(args, kwargs)
    pairs = guidance.pairs
    target_acts = _activations(guidance.target, [p.target for p in pairs], guidance, args, kwargs, "target")
    g_args, g_kwargs = guidance._guide_inputs(args, kwargs, 0)
    guide_acts = _activations(guidance.guide, [p.guide for p in pairs], guidance, g_args, g_kwargs, "guide")
    n = next(iter(target_acts.values()))[0].shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    while n > 1 and bool((perm == torch.arange(n)).any()):  # a derangement: no example meets itself
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed := seed + 1))
    out = []
    for pair in pairs:
        (t, t_cf), (g, g_cf) = target_acts[pair.target], guide_acts[pair.guide]
        sim = _similarity(guidance, t, g, t_cf, g_cf)
        floor = _similarity(guidance, t, g[perm.to(g.device)], t_cf, g_cf)
        shares = {}
        if positions is not None and g.dim() == 3 and not g_cf:
            shares = {"all": 1.0, **variance_shares(g, positions)}
        out.append(PairDiagnostic(pair.target, pair.guide, sim, floor, shares, _warning(sim, floor, margin)))
    return out


def _activations(model, names, guidance, args, kwargs, role) -> dict[str, tuple[Tensor, bool]]:
    """``name → (batch-first activation, channels_first)`` from one eval-mode forward."""
    capture = Capture(model, names, guidance._batch_axes[role], role)
    was_training = model.training
    model.eval()
    try:
        n = input_batch_size(args, kwargs, guidance.input_batch_axis)
        with capture.record(n) as acts:
            model(*args, **kwargs)
        capture.check_complete(acts, role)
        return {name: (acts[name], capture.normalise.channels_first.get(name, False)) for name in names}
    finally:
        capture.remove()
        model.train(was_training)


def _similarity(guidance, t: Tensor, g: Tensor, t_cf: bool, g_cf: bool) -> float:
    how = guidance.reduction
    rt, rg = reduce(t, how, t_cf).float(), reduce(g, how, g_cf).float()
    if how == "tokens":
        return float(torch.stack([guidance.measure(a, b) for a, b in zip(rt.unbind(1), rg.unbind(1))]).mean())
    return float(guidance.measure(rt, rg))


def _warning(sim: float, floor: float, margin: float) -> str | None:
    if sim >= 1 - margin:
        return f"starts at {sim:.3f}, within {margin} of 1: almost nothing left to align"
    if sim <= floor + margin:
        return f"starts at {sim:.3f}, within {margin} of a shuffled batch's {floor:.3f}: no signal above chance"
    return None


class Diagnosable:
    """Gives :class:`~repguide.guidance.Guidance` its ``diagnose`` method."""

    def diagnose(self, *args: Any, positions: Mapping[str, Tensor] | None = None, **kwargs: Any) -> list[PairDiagnostic]:
        """:func:`diagnose` of this guidance on the batch ``args``/``kwargs``."""
        return diagnose(self, *args, positions=positions, **kwargs)
