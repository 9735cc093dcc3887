"""Which target layer is aligned with which guide layer: explicit pairs, the paper's stretch, the
official code's mapping, patterns."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Union

from repguide._registry import did_you_mean
from repguide.errors import LayerError

__all__ = ["PAIRINGS", "Pair", "PairSpec", "official_mapping", "resolve_pairs", "select_layers", "stretch"]

#: The pairings named by a string.
PAIRINGS = ("stretch", "official")


@dataclass(frozen=True)
class Pair:
    """Align the activation of ``target`` with that of ``guide``; ``weight`` scales its loss term."""

    target: str
    guide: str
    weight: float = 1.0

    @property
    def key(self) -> tuple[str, str]:
        return (self.target, self.guide)


#: ``"stretch"`` or ``"official"``; a list of ``(target, guide)`` / ``(target, guide, weight)`` / :class:`Pair`;
#: or ``{"target": names-or-globs, "guide": names-or-globs}`` (the matched layers are stretched).
PairSpec = Union[str, Sequence, Mapping]


def stretch(target_layers: Sequence[str], guide_layers: Sequence[str]) -> list[Pair]:
    """Spread the shorter layer list evenly over the longer one, first to first and last to last.

    With S guide and T target layers and S <= T, guide layer i is paired with target layer
    round(i·(T−1)/(S−1)), the paper's rule (Python's half-to-even round, as the official code).
    With S > T the official code wrote several guide layers to one target layer and kept only the
    last; here the target is spread over the guide instead, target layer j with guide layer
    round(j·(S−1)/(T−1)), so every computed pair counts.
    """
    t, s = _nonempty(target_layers, guide_layers)
    if s <= t:
        step = (t - 1) / (s - 1) if s > 1 else 0.0
        return [Pair(target_layers[round(i * step)], g) for i, g in enumerate(guide_layers)]
    step = (s - 1) / (t - 1) if t > 1 else 0.0
    return [Pair(tl, guide_layers[round(j * step)]) for j, tl in enumerate(target_layers)]


def official_mapping(target_layers: Sequence[str], guide_layers: Sequence[str]) -> list[Pair]:
    """The official code's mapping: guide layer i is written to target layer
    min(round(i·(T−1)/(S−1)), T−1), and where several guide layers land on one target layer the
    last of them wins (the others were computed and dropped there; here they are not computed).

    With S <= T this is :func:`stretch`; with S > T every target layer keeps one guide layer, the
    deepest of those mapped to it. Pairs come in target-layer order.
    """
    t, s = _nonempty(target_layers, guide_layers)
    step = (t - 1) / (s - 1) if s > 1 else 1.0
    winner: dict[int, str] = {}
    for i, guide in enumerate(guide_layers):
        winner[min(round(i * step), t - 1)] = guide
    return [Pair(target_layers[j], winner[j]) for j in sorted(winner)]


def _nonempty(target_layers: Sequence[str], guide_layers: Sequence[str]) -> tuple[int, int]:
    t, s = len(target_layers), len(guide_layers)
    if t == 0 or s == 0:
        raise LayerError(
            f"cannot pair {t} target layer(s) with {s} guide layer(s): both lists must be non-empty"
        )
    return t, s


def select_layers(patterns: str | Sequence[str], available: Sequence[str], role: str) -> list[str]:
    """Layers matching any of the names or glob patterns, in ``available``'s (execution) order."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    chosen = []
    for pattern in patterns:
        matched = [name for name in available if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            raise LayerError(_no_match_message(pattern, available, role))
        chosen.extend(matched)
    ordered = set(chosen)
    return [name for name in available if name in ordered]


def _no_match_message(name: str, available: Sequence[str], role: str) -> str:
    hint = did_you_mean(name, available, " Closest: {}.", n=3, cutoff=0.5)
    listing = ", ".join(available[:40]) + (" ..." if len(available) > 40 else "")
    return f"no {role} layer matches {name!r}.{hint} Available {role} layers: {listing}"


def resolve_pairs(
    spec: PairSpec,
    target_layers: Sequence[str] | None = None,
    guide_layers: Sequence[str] | None = None,
) -> list[Pair]:
    """Turn a pair specification into an explicit, validated list of :class:`Pair`.

    ``target_layers``/``guide_layers`` are the available layer names in execution order (needed for
    ``"stretch"`` and patterns; explicit pairs are checked against them when given).
    """
    if isinstance(spec, str):
        if spec not in PAIRINGS:
            raise LayerError(
                f"unknown pairing {spec!r}: use 'stretch', 'official', a list of (target, guide) "
                "pairs, or {'target': patterns, 'guide': patterns}"
            )
        _require_layers(target_layers, guide_layers)
        pairs = (stretch if spec == "stretch" else official_mapping)(target_layers, guide_layers)
    elif isinstance(spec, Mapping):
        unknown = set(spec) - {"target", "guide"}
        if unknown or not spec:
            raise LayerError(
                f"a pattern pairing is {{'target': patterns, 'guide': patterns}}; got keys {sorted(spec)}"
            )
        _require_layers(target_layers, guide_layers)
        pairs = stretch(
            select_layers(spec.get("target", "*"), target_layers, "target"),
            select_layers(spec.get("guide", "*"), guide_layers, "guide"),
        )
    else:
        if not isinstance(spec, Iterable):
            raise LayerError(
                f"pairs must be 'stretch', 'official', a list of (target, guide[, weight]) pairs, or "
                f"{{'target': patterns, 'guide': patterns}}; got {spec!r}"
            )
        pairs = [_as_pair(item) for item in spec]
        for pair in pairs:
            for name, available, role in (
                (pair.target, target_layers, "target"),
                (pair.guide, guide_layers, "guide"),
            ):
                if available is not None and name not in available:
                    raise LayerError(_no_match_message(name, available, role))
    if not pairs:
        raise LayerError("the pairing is empty: give at least one (target layer, guide layer) pair")
    seen = set()
    for pair in pairs:
        if pair.key in seen:
            raise LayerError(f"pair {pair.key} is listed twice")
        seen.add(pair.key)
    return pairs


def _require_layers(target_layers, guide_layers) -> None:
    if target_layers is None or guide_layers is None:
        raise LayerError("this pairing needs the target's and the guide's layer lists")


def _as_pair(item) -> Pair:
    if isinstance(item, Pair):
        return item
    if isinstance(item, (tuple, list)) and len(item) in (2, 3) and all(isinstance(n, str) for n in item[:2]):
        pair = Pair(*item)
        number = isinstance(pair.weight, (int, float)) and not isinstance(pair.weight, bool)
        if not number or not math.isfinite(pair.weight) or pair.weight < 0:
            raise LayerError(f"pair weight must be a finite number >= 0, got {pair.weight!r} in {item}")
        return pair
    raise LayerError(
        f"each explicit pair must be (target_layer, guide_layer) or (target_layer, guide_layer, "
        f"weight) with layer names as strings; got {item!r}"
    )
