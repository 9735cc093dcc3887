"""What :class:`~repguide.guidance.Guidance` checks before it trains: its options, that the guide
shares nothing with the target, and the guide's mode at every guide forward."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import nn

from repguide.capture import LAYER_RULES, REDUCTIONS, uncompiled
from repguide.errors import GuidanceError

__all__ = ["GUIDE_MODES", "PRECISIONS", "check_not_shared", "check_options", "check_weight", "set_guide_mode"]

GUIDE_MODES = ("eval", "train")
PRECISIONS = ("fp32", "bf16")


def check_options(
    target: nn.Module, guide: nn.Module, *, layers: str, reduction: str, guide_input: str | Callable,
    guide_precision: str, sketch_dim: Any, guide_cache: Any, guide_mode: str, compile: Any = False,
    weight: Any = 1.0,
) -> None:
    """Raise a :class:`GuidanceError` for the first option :class:`Guidance` cannot use."""
    if target is guide:
        raise GuidanceError("target and guide must be different modules (the guide is frozen)")
    if not callable(weight):
        check_weight(weight, "weight")
    if layers not in LAYER_RULES:
        raise GuidanceError(f"unknown layer rule {layers!r}; choose one of {', '.join(LAYER_RULES)}")
    if reduction not in REDUCTIONS:
        raise GuidanceError(f"unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")
    if not (guide_input in ("same", "noise") or callable(guide_input)):
        raise GuidanceError(
            f"guide_input must be 'same', 'noise' or a callable (args, kwargs) -> (args, kwargs); "
            f"got {guide_input!r}"
        )
    if guide_precision not in PRECISIONS:
        raise GuidanceError(f"guide_precision must be one of {', '.join(PRECISIONS)}, got {guide_precision!r}")
    positive_int = isinstance(sketch_dim, int) and not isinstance(sketch_dim, bool) and sketch_dim >= 1
    if sketch_dim is not None and not positive_int:
        raise GuidanceError(f"sketch_dim must be a positive int or None; got {sketch_dim!r}")
    if guide_mode not in GUIDE_MODES:
        raise GuidanceError(f"guide_mode must be one of {', '.join(GUIDE_MODES)}, got {guide_mode!r}")
    if not isinstance(compile, bool):
        raise GuidanceError(f"compile must be True or False; got {compile!r}")
    if guide_cache is not None and guide_input != "same":
        raise GuidanceError(
            "guide_cache stores the guide's features of each example, so the guide must see the "
            f"target's own batch (guide_input='same'); got guide_input={guide_input!r}"
        )
    if guide_cache is not None and guide_mode == "train":
        raise GuidanceError(
            "guide_cache stores the guide's features of each example once, but guide_mode='train' "
            "gives new ones at every forward (dropout); use guide_mode='eval' or no cache"
        )
    check_not_shared(target, guide)


def check_weight(value: Any, where: str) -> float:
    """``value`` as the alignment weight: a finite number >= 0 (a negative one would push the
    target's representations away from the guide's)."""
    try:
        number = float(value) if not isinstance(value, (bool, str, bytes)) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number < 0:
        raise GuidanceError(
            f"{where} must be a finite number >= 0, a WeightSchedule or a step -> weight callable; got {value!r}"
        )
    return number


def check_not_shared(target: nn.Module, guide: nn.Module) -> None:
    """Refuse a guide that holds one of the target's modules, parameters or buffers: freezing it
    would stop the target's training, and training it would change the guide."""
    target, guide = uncompiled(target), uncompiled(guide)  # named as the user's own modules
    guide_modules = {id(m): name for name, m in guide.named_modules(remove_duplicate=False)}
    guide_tensors = {
        id(t): name
        for name, t in [*guide.named_parameters(remove_duplicate=False), *guide.named_buffers(remove_duplicate=False)]
    }
    shared, covered = [], []
    for name, module in target.named_modules():
        if any(name == c or name.startswith(c + ".") or c == "" for c in covered):
            continue
        if id(module) in guide_modules:
            shared.append(f"the target's module {_shown(name, 'itself')} (the guide's "
                          f"{_shown(guide_modules[id(module)], 'whole guide')})")
            covered.append(name)
    for name, tensor in [*target.named_parameters(), *target.named_buffers()]:
        owner = name.rpartition(".")[0]
        if id(tensor) in guide_tensors and not any(owner == c or owner.startswith(c + ".") or c == "" for c in covered):
            shared.append(f"the target's tensor {name!r} (the guide's {guide_tensors[id(tensor)]!r})")
    if shared:
        raise GuidanceError(
            f"the guide shares {', '.join(shared)}: the guide is frozen, so the target would stop "
            "training them, and training them would change the guide; give the guide its own copy "
            "(e.g. copy.deepcopy of the shared module)"
        )


def _shown(name: str, root: str) -> str:
    return repr(name) if name else root


def set_guide_mode(guide: nn.Module, mode: str) -> None:
    """Put the guide (and every module in it) in ``mode``, whatever ``.train()`` calls reached it
    since its last forward: in eval mode its BatchNorm statistics and dropout never change."""
    training = mode == "train"
    if any(module.training != training for module in guide.modules()):
        guide.train(training)
