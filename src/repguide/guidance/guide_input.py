"""What the guide sees: the target's batch, noise of its shape, or inputs made by a callable."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from repguide.errors import GuideError
import torch
from torch import Tensor

__all__ = ["explain_guide_failure", "noise_like"]


@contextlib.contextmanager
def explain_guide_failure(guide_input: str | Callable):
    """Re-raise an error from inside the guide's forward as one that says what to change."""
    try:
        yield
    except (RuntimeError, TypeError) as err:
        given = "the inputs made by guide_input" if callable(guide_input) else "the target's inputs"
        first_line = str(err).partition("\n")[0]
        raise GuideError(
            f"the guide failed on {given} ({type(err).__name__}: {first_line}). "
            "A guide that expects other inputs (shape, dtype, arguments) needs guide_input= a callable "
            "(args, kwargs) -> (args, kwargs) that makes them from the target's batch"
        ) from err


def noise_like(value: Any, generator: torch.Generator) -> Any:
    """Random values of the same shape and dtype: N(0, 1) for floats, uniform over the observed
    range for integer tokens (the paper's integer noise)."""
    if not isinstance(value, Tensor):
        return value
    if value.is_floating_point():
        return torch.randn(value.shape, generator=generator, device=value.device).to(value.dtype)
    if value.dtype == torch.bool:
        return torch.rand(value.shape, generator=generator, device=value.device) < 0.5
    low, high = int(value.min()), int(value.max()) + 1
    return torch.randint(low, high, value.shape, generator=generator, device=value.device, dtype=value.dtype)
