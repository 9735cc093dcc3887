"""Weight schedules: the alignment weight as a function of the training step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Union

__all__ = ["Constant", "OffAfter", "Weight", "WeightSchedule"]


class WeightSchedule:
    """The alignment weight as a function of the training step (steps counted from 0)."""

    def __call__(self, step: int) -> float:
        raise NotImplementedError


@dataclass(frozen=True)
class Constant(WeightSchedule):
    weight: float = 1.0

    def __call__(self, step: int) -> float:
        return self.weight


@dataclass(frozen=True)
class OffAfter(WeightSchedule):
    """``weight`` for the first ``steps`` steps, then 0: the paper's guidance stopped after 300 steps."""

    weight: float
    steps: int

    def __call__(self, step: int) -> float:
        return self.weight if step < self.steps else 0.0


Weight = Union[float, WeightSchedule, Callable[[int], float]]
