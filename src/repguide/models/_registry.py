"""Name → (builder, defaults) registry for the models in :mod:`repguide.models`.

A builder is a class or a factory whose keyword arguments are the model's size knobs; one builder can
serve several names, each with its own defaults (``register("name", builder, **defaults)``).

Knobs filled in from the data. A training run builds its models with
``repguide.train.build_model``, which passes these keyword arguments from the data set's
:class:`repguide.data.Splits` when the builder accepts them and the recipe does not set them:

* ``num_classes``: ``Splits.num_classes`` (classes, or the vocabulary for token prediction);
* ``input_shape``: ``Splits.input_shape``, ``(C, H, W)`` of one image (image data only);
* ``in_channels``: ``C`` of that shape; ``image_size``: its ``W`` (image data only);
* ``vocab_size``: ``Splits.vocab_size`` (token data only).

A new model that names its knobs this way is sized to any data set without recipe changes.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from torch import nn

from repguide._registry import Registry
from repguide.errors import ModelError

Factory = TypeVar("Factory", bound=Callable[..., nn.Module])

MODELS: Registry[Callable[..., nn.Module]] = Registry("model", error=ModelError)


def register(name: str, builder: Callable[..., nn.Module] | None = None, **defaults: Any) -> Any:
    """Make a model class or factory available to :func:`create` as ``name``, with ``defaults``;
    without ``builder``, a decorator."""
    return MODELS.register(name, builder, **defaults)


def list_models() -> list[str]:
    """Names accepted by :func:`create`, sorted."""
    return MODELS.list()


def create(name: str, **kwargs) -> nn.Module:
    """Build the model registered as ``name``; ``kwargs`` go to its builder, over the name's defaults."""
    return MODELS.get(name).build(**kwargs)


def accepted_kwargs(name: str) -> frozenset[str]:
    """The keyword arguments (size knobs) that the builder registered as ``name`` accepts."""
    return MODELS.get(name).accepted_kwargs()


def required_kwargs(name: str) -> frozenset[str]:
    """The keyword arguments the builder registered as ``name`` needs beyond the name's defaults."""
    return MODELS.get(name).required_kwargs()
