"""Every layer of a stacked ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` as a layer of its own.

A module with ``num_layers=k`` is one call of one fused kernel, so its inner layers have no module
to hook. While a capture records, the module's call is replaced by its k layers run one after
another, in the same forward pass: each is a single-layer module of the same kind holding the
module's own weights (so gradients reach them), with the module's own inter-layer dropout in train
mode. In eval mode the result equals the fused call's. Layer ``l``'s output sequence (both
directions concatenated when bidirectional; packed when the input is) is named
``"<module>.layer<l>"``, e.g. ``rnn.layer0``, ``rnn.layer1``; the module's k-th call gives
``"<module>.layer<l>@k"``.
"""

from __future__ import annotations

import contextlib
import functools
import re
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

#: ``callback(layer, output)``: called after each layer of a stacked module has run.
OnLayer = Callable[[int, Any], None]

_LAYER_NAME = re.compile(r"^(?P<base>.+)\.layer(?P<layer>\d+)$")


def is_stacked(module: nn.Module) -> bool:
    return isinstance(module, nn.RNNBase) and module.num_layers > 1


def layer_name(name: str, layer: int) -> str:
    """The name of layer ``layer`` (from 0) of the stacked module ``name``."""
    return f"{name}.layer{layer}"


def stacked_layer(model: nn.Module, name: str) -> tuple[nn.Module, int] | None:
    """``(stacked module, layer)`` that ``name`` (without ``@k``) denotes, or None."""
    match = _LAYER_NAME.match(name)
    if match is None:
        return None
    try:
        module = model.get_submodule(match["base"])
    except AttributeError:
        return None
    layer = int(match["layer"])
    return (module, layer) if is_stacked(module) and layer < module.num_layers else None


def stacked_layer_names(model: nn.Module) -> list[str]:
    return [
        layer_name(name, layer)
        for name, module in model.named_modules()
        if is_stacked(module)
        for layer in range(module.num_layers)
    ]


@contextlib.contextmanager
def layer_by_layer(callbacks: Mapping[nn.Module, OnLayer]) -> Iterator[None]:
    """While active, each stacked module in ``callbacks`` runs layer by layer and reports each
    layer's output to its callback; afterwards its own fused forward is back."""
    for module, on_layer in callbacks.items():
        module.forward = functools.partial(_forward_by_layer, module, on_layer)
    try:
        yield
    finally:
        for module in callbacks:
            module.__dict__.pop("forward", None)


def _forward_by_layer(module: nn.RNNBase, on_layer: OnLayer, input: Any, hx: Any = None) -> tuple[Any, Any]:
    """What ``module(input, hx)`` returns, computed one layer at a time. A batch-first input runs
    time-major through the layers, as the fused call does (one transpose each way, no copy per
    layer); each layer reports its output in the module's own layout."""
    per_layer = 2 if module.bidirectional else 1
    lstm = isinstance(module, nn.LSTM)
    flip = module.batch_first and isinstance(input, Tensor) and input.dim() == 3
    if flip:
        input = input.transpose(0, 1)
    finals, zeros = [], None
    if hx is None and isinstance(input, Tensor):  # every layer starts from the same zeros: made once
        batch = (input.shape[1],) if input.dim() == 3 else ()
        h = input.new_zeros(per_layer, *batch, module.proj_size or module.hidden_size)
        zeros = (h, input.new_zeros(per_layer, *batch, module.hidden_size)) if lstm else h
    for layer in range(module.num_layers):
        rows = slice(layer * per_layer, (layer + 1) * per_layer)  # the layer's rows of h0 (and c0)
        state = zeros if hx is None else tuple(h[rows] for h in hx) if lstm else hx[rows]
        with warnings.catch_warnings():
            # On CUDA a layer's weights are a slice of the module's flat buffer, not a buffer of their own.
            warnings.filterwarnings("ignore", message="RNN module weights are not part of single contiguous")
            output, final = _single_layer(module, layer)(input, state)
        reported = output.transpose(0, 1) if flip else output
        on_layer(layer, reported)
        finals.append(final)
        if layer < module.num_layers - 1 and module.training and module.dropout > 0:
            output = _dropout(output, module.dropout)
        input = output
    if lstm:
        return reported, tuple(torch.cat(parts) for parts in zip(*finals))
    return reported, torch.cat(finals)


def _single_layer(module: nn.RNNBase, layer: int) -> nn.RNNBase:
    """A time-major one-layer module of ``module``'s kind whose parameters are ``module``'s of
    ``layer``: built once per (module, layer, shape) on the meta device, its parameters set afresh
    at every call (so a module moved or given new weights is followed; building one costs ~10
    aten ops)."""
    kind = next(k for k in (nn.LSTM, nn.GRU, nn.RNN) if isinstance(module, k))
    output_size = module.proj_size or module.hidden_size
    input_size = module.input_size if layer == 0 else output_size * (2 if module.bidirectional else 1)
    options: dict[str, Any] = {}
    if kind is nn.LSTM:
        options["proj_size"] = module.proj_size
    if kind is nn.RNN:
        options["nonlinearity"] = module.nonlinearity
    shape = (kind, input_size, module.hidden_size, module.bias, module.bidirectional, *options.values())
    singles = _SINGLE_LAYERS.setdefault(module, {})
    single = singles.get((layer, shape))
    if single is None:
        single = singles[(layer, shape)] = kind(
            input_size, module.hidden_size, num_layers=1, bias=module.bias, batch_first=False,
            bidirectional=module.bidirectional, device="meta", **options,
        )
    for name in single._flat_weights_names:  # weight_ih_l0[_reverse] → weight_ih_l{layer}[_reverse]
        setattr(single, name, getattr(module, name.replace("_l0", f"_l{layer}", 1)))
    single.training = module.training
    return single


#: The single-layer modules of :func:`_single_layer`, by stacked module (weakly: they go with it).
_SINGLE_LAYERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _dropout(output: Any, p: float) -> Any:
    if isinstance(output, PackedSequence):
        return PackedSequence(F.dropout(output.data, p), output.batch_sizes, output.sorted_indices,
                              output.unsorted_indices)
    return F.dropout(output, p)
