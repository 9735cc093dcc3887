"""Capturing layer activations (:mod:`._hooks`), discovering candidate layers (:mod:`._discovery`),
and every layer of a stacked recurrent module (:mod:`._recurrent`)."""

from repguide.capture._discovery import (
    DEFAULT_LAYER_TYPES,
    LAYER_RULES,
    OFFICIAL_LAYER_TYPES,
    LayerInfo,
    block_names,
    discover,
    layers,
    no_side_effects,
)
from repguide.capture._hooks import (
    REDUCTIONS,
    Capture,
    first_tensor,
    input_batch_size,
    plain_name,
    reduce,
    uncompiled,
)
from repguide.capture._recurrent import layer_name

__all__ = [
    "DEFAULT_LAYER_TYPES",
    "LAYER_RULES",
    "OFFICIAL_LAYER_TYPES",
    "REDUCTIONS",
    "Capture",
    "LayerInfo",
    "block_names",
    "discover",
    "first_tensor",
    "input_batch_size",
    "layer_name",
    "layers",
    "no_side_effects",
    "plain_name",
    "reduce",
    "uncompiled",
]
