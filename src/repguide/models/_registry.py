"""Name → factory registry for the models in :mod:`repguide.models`."""

from __future__ import annotations

import difflib
from typing import Callable, TypeVar

from torch import nn

Factory = TypeVar("Factory", bound=Callable[..., nn.Module])

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable[[Factory], Factory]:
    """Decorator: make a model factory available to :func:`create` under ``name``."""

    def decorator(factory: Factory) -> Factory:
        if name in _MODELS:
            raise ValueError(f"a model named {name!r} is already registered")
        _MODELS[name] = factory
        return factory

    return decorator


def list_models() -> list[str]:
    """Names accepted by :func:`create`, sorted."""
    return sorted(_MODELS)


def create(name: str, **kwargs) -> nn.Module:
    """Build the model registered as ``name``; ``kwargs`` go to its factory."""
    if name not in _MODELS:
        close = difflib.get_close_matches(name, list(_MODELS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}.{hint}")
    return _MODELS[name](**kwargs)
