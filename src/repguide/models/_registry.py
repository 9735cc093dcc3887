"""Name → factory registry for the models in :mod:`repguide.models`."""

from __future__ import annotations

import difflib
import inspect
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


def _factory(name: str) -> Callable[..., nn.Module]:
    if name not in _MODELS:
        close = difflib.get_close_matches(name, list(_MODELS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}.{hint}")
    return _MODELS[name]


def create(name: str, **kwargs) -> nn.Module:
    """Build the model registered as ``name``; ``kwargs`` go to its factory."""
    return _factory(name)(**kwargs)


def accepted_kwargs(name: str) -> frozenset[str]:
    """The keyword arguments (size knobs) that the factory registered as ``name`` accepts."""
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = inspect.signature(_factory(name)).parameters.values()
    return frozenset(p.name for p in params if p.kind in keyword)
