"""Capturing layer activations (:mod:`._hooks`), discovering candidate layers (:mod:`._discovery`),
and every layer of a stacked recurrent module (:mod:`._recurrent`)."""

from repguide.capture._discovery import (
    DEFAULT_LAYER_TYPES,
    LAYER_RULES,
    LayerInfo,
    _no_side_effects,
    block_names,
    discover,
    layers,
)
from repguide.capture._hooks import REDUCTIONS, Capture, _batch_size, _first_tensor, reduce
from repguide.capture._recurrent import layer_name

__all__ = [
    "DEFAULT_LAYER_TYPES",
    "LAYER_RULES",
    "REDUCTIONS",
    "Capture",
    "LayerInfo",
    "block_names",
    "discover",
    "layer_name",
    "layers",
    "reduce",
]
