"""What the guide sees: the target's batch, noise of its shape, or inputs made by a callable."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from typing import Any

from repguide.errors import GuideError, RepguideError
import torch
from torch import Tensor

__all__ = ["explain_guide_failure", "noise_like"]


# What torch says when a module gets inputs of the wrong shape, dtype, device, range or arguments.
_ABOUT_INPUTS = re.compile(
    r"shape|size|dimension|\bdim\b|channels|dtype|scalar type|input type|device|argument|"
    r"index out of range|expected .*(input|tensor)",
    re.IGNORECASE,
)


@contextlib.contextmanager
def explain_guide_failure(guide_input: str | Callable):
    """Re-raise an error from inside the guide's forward that is about its inputs as one that says
    what to change; any other error keeps its type and message, with a note that the guide raised it."""
    given = "the inputs made by guide_input" if callable(guide_input) else "the target's inputs"
    try:
        yield
    except (RuntimeError, TypeError, IndexError) as err:
        if isinstance(err, RepguideError) or not _ABOUT_INPUTS.search(str(err)):
            err.add_note(f"(raised inside the guide's forward, which repguide.Guidance ran on {given})")
            raise
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
