"""Capturing layer activations with forward hooks, and discovering candidate layers.

A *layer* is a named submodule (``model.get_submodule(name)``); when a module runs several times in
one forward pass (a shared block applied in a loop) its k-th call (from 0) is named ``"name@k"``.
Activations are normalised to batch-first tensors ``(n, ...)``: tuple outputs (RNNs, attention)
give their first tensor, ``PackedSequence`` is unpacked batch-first, mappings (Hugging Face
``ModelOutput``) give their first tensor value. The batch axis is the one axis whose size is the
batch size; where several axes have that size the module's own ``batch_first`` convention decides,
and otherwise an error asks for ``batch_axes={"layer": axis}``. Nothing is dropped silently.
"""

from __future__ import annotations

import contextlib
import difflib
import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from repguide.errors import LayerError
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

__all__ = [
    "DEFAULT_LAYER_TYPES",
    "REDUCTIONS",
    "Capture",
    "LayerInfo",
    "discover",
    "layers",
    "reduce",
]

#: Module types that are layers by default: the paper's choice (linear maps, convolutions,
#: recurrent layers, attention, Transformer layers), matched with isinstance so subclasses count.
DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.modules.conv._ConvNd,
    nn.RNNBase,
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)

#: How a layer's activation becomes the (n, d) matrix a similarity measure compares.
REDUCTIONS = ("flatten", "mean", "tokens")

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
# Modules whose inputs and outputs PyTorch defines as (N, C, ...): the batch is axis 0.
_BATCH_AXIS_0 = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._NormBase,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.Flatten,
)
_CHANNELS_FIRST_1D = (
    nn.Conv1d,
    nn.ConvTranspose1d,
    nn.BatchNorm1d,
    nn.InstanceNorm1d,
    nn.MaxPool1d,
    nn.AvgPool1d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveMaxPool1d,
)


@dataclass(frozen=True)
class LayerInfo:
    """One candidate layer found by :func:`discover`."""

    name: str
    module_type: str
    shape: tuple[int, ...]  # batch-first activation shape on the example input
    is_output: bool  # its activation is the model's output (the task head)
    batch_axis: int = 0  # where the batch is in the module's raw output
    channels_first: bool = False  # features on axis 1, positions after (conv maps)


def _first_tensor(output: Any) -> Tensor | PackedSequence | None:
    if isinstance(output, (Tensor, PackedSequence)):
        return output
    if isinstance(output, Mapping):
        values = output.values()
    elif isinstance(output, Sequence) and not isinstance(output, str):
        values = output
    else:
        return None
    for value in values:
        found = _first_tensor(value)
        if found is not None:
            return found
    return None


def _own_batch_first(module: nn.Module) -> bool | None:
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return module.self_attn.batch_first
    value = getattr(module, "batch_first", None)
    return value if isinstance(value, bool) else None


def _batch_first_conventions(model: nn.Module) -> dict[nn.Module, bool]:
    """Each module's declared ``batch_first``, or that of its nearest ancestor that declares one

    (so a Linear inside a sequence-first nn.TransformerEncoderLayer is known to be sequence-first).
    """
    by_name: dict[str, bool | None] = {}
    conventions: dict[nn.Module, bool] = {}
    for name, module in model.named_modules():  # parents come before their children
        own = _own_batch_first(module)
        inherited = by_name.get(name.rpartition(".")[0]) if name else None
        by_name[name] = own if own is not None else inherited
        if by_name[name] is not None:
            conventions[module] = by_name[name]
    return conventions


def _channels_first(module: nn.Module, activation: Tensor) -> bool:
    """Whether axis 1 holds features and the trailing axes positions (conv maps)."""
    if activation.dim() >= 4:
        return True
    return activation.dim() == 3 and isinstance(module, _CHANNELS_FIRST_1D)


def reduce(activation: Tensor, how: str, channels_first: bool = False) -> Tensor:
    """Turn a batch-first activation ``(n, ...)`` into what a measure compares.

    ``"flatten"``: ``(n, prod(...))``, the paper's default (a whole sequence is one vector).
    ``"mean"``: average over positions, ``(n, d)`` (spatial axes of conv maps, time of sequences).
    ``"tokens"``: ``(n, positions, d)``; the similarity is then computed per position and averaged.
    """
    if how not in REDUCTIONS:
        raise LayerError(f"unknown reduction {how!r}; choose one of {', '.join(REDUCTIONS)}")
    n = activation.shape[0]
    if how == "flatten" or activation.dim() == 2:
        if how == "tokens":
            raise LayerError(
                f"reduction 'tokens' needs an activation with positions, got shape "
                f"{tuple(activation.shape)}; use 'flatten' or 'mean' for this layer"
            )
        return activation.reshape(n, -1)
    if channels_first:
        activation = activation.flatten(2).transpose(1, 2)  # (n, positions, channels)
    else:
        activation = activation.reshape(n, -1, activation.shape[-1])
    return activation.mean(dim=1) if how == "mean" else activation


class _LayerRef:
    """A layer name resolved to its module and call index."""

    def __init__(self, model: nn.Module, name: str, role: str = "model"):
        base, _, call = name.partition("@")
        self.name, self.base = name, base
        self.call = int(call) if call else 0
        try:
            self.module = model.get_submodule(base)
        except AttributeError:
            raise LayerError(_unknown_layer_message(name, _module_names(model), role)) from None


def _module_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def _unknown_layer_message(name: str, available: Sequence[str], role: str) -> str:
    close = difflib.get_close_matches(name, list(available), n=3, cutoff=0.5)
    hint = f" Closest: {', '.join(close)}." if close else ""
    listing = ", ".join(available[:40]) + (" ..." if len(available) > 40 else "")
    return (
        f"the {role} has no layer named {name!r}.{hint} Its modules: {listing} "
        f"(see repguide.layers({role}, example_input) for candidate layers)"
    )


class _Normaliser:
    """Turns a module's raw output into a batch-first tensor, fixing each layer's batch axis."""

    def __init__(self, model: nn.Module, batch_axes: Mapping[str, int] | None = None):
        self.conventions = _batch_first_conventions(model)
        self.batch_axes: dict[str, int] = dict(batch_axes or {})
        self.channels_first: dict[str, bool] = {}
        self.batch_size = 0

    def __call__(self, name: str, module: nn.Module, output: Any) -> Tensor:
        found = _first_tensor(output)
        if found is None:
            raise LayerError(
                f"layer {name!r} ({type(module).__name__}) returned {type(output).__name__}, "
                "which holds no tensor to compare; choose another layer"
            )
        if isinstance(found, PackedSequence):
            tensor, axis = pad_packed_sequence(found, batch_first=True)[0], 0
        else:
            tensor, axis = found, self._batch_axis(name, module, found)
        if name not in self.channels_first:
            self.channels_first[name] = _channels_first(module, tensor)
        return tensor.movedim(axis, 0) if axis else tensor

    def _batch_axis(self, name: str, module: nn.Module, tensor: Tensor) -> int:
        n, shape = self.batch_size, tuple(tensor.shape)
        if name in self.batch_axes:
            axis = self.batch_axes[name]
            if not -len(shape) <= axis < len(shape) or shape[axis] != n:
                raise LayerError(
                    f"layer {name!r}: batch axis {axis} of output shape {shape} does not have "
                    f"the batch size {n}; fix batch_axes[{name!r}]"
                )
            return axis % len(shape)
        candidates = [i for i, size in enumerate(shape) if size == n]
        if len(candidates) == 1:
            axis = candidates[0]
        else:
            batch_first = self.conventions.get(module)
            if batch_first is not None:
                conventional = 0 if batch_first else 1
            elif len(shape) == 2 or isinstance(module, _BATCH_AXIS_0):
                conventional = 0  # (n, d) outputs, and modules whose input PyTorch fixes as (N, C, ...)
            else:
                conventional = None
            if not candidates:
                raise LayerError(
                    f"layer {name!r} ({type(module).__name__}) has output shape {shape} with no "
                    f"axis of the batch size {n}; it cannot be compared example by example"
                )
            if conventional not in candidates:
                raise LayerError(
                    f"layer {name!r} ({type(module).__name__}): output shape {shape} has several "
                    f"axes of the batch size {n} ({candidates}), so the batch axis is ambiguous. "
                    f"Name it with batch_axes={{{name!r}: <one of {candidates}>}}, or use a batch "
                    "size that differs from the other dimensions."
                )
            axis = conventional
        self.batch_axes[name] = axis  # later batches must agree: fixed once resolved
        return axis


class Capture:
    """Persistent forward hooks that record chosen layers' activations during :meth:`record`.

    Hooks are registered once; outside ``record`` they do nothing, so calling the model directly
    costs nothing and keeps nothing alive.
    """

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        batch_axes: Mapping[str, int] | None = None,
        role: str = "model",
    ):
        self.model = model
        self.names = list(dict.fromkeys(names))
        self.normalise = _Normaliser(model, batch_axes)
        self._refs = [_LayerRef(model, name, role) for name in self.names]
        self._wanted: dict[nn.Module, dict[int, str]] = {}
        for ref in self._refs:
            self._wanted.setdefault(ref.module, {})[ref.call] = ref.name
        self._handles = [m.register_forward_hook(self._hook) for m in self._wanted]
        self._active = False
        self._calls: dict[nn.Module, int] = {}
        self._acts: dict[str, Tensor] = {}

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self._active:
            return
        call = self._calls.get(module, 0)
        self._calls[module] = call + 1
        name = self._wanted[module].get(call)
        if name is not None:
            self._acts[name] = self.normalise(name, module, output)

    @contextlib.contextmanager
    def record(self, batch_size: int) -> Iterator[dict[str, Tensor]]:
        """Record this forward pass: yields the dict that fills with ``name → (n, ...)``."""
        self._acts, self._calls = {}, {}
        self.normalise.batch_size = batch_size
        self._active = True
        try:
            yield self._acts
        finally:
            self._active = False
            self._calls = {}

    def check_complete(self, acts: Mapping[str, Tensor], role: str = "model") -> None:
        missing = [name for name in self.names if name not in acts]
        if missing:
            raise RuntimeError(
                f"the {role}'s forward pass did not run layer(s) {missing}. A module that runs "
                "fewer times than its '@k' suffix says, or one bypassed by a fused fast path "
                "(e.g. nn.TransformerEncoderLayer in eval mode under no_grad), never fires its "
                f"hook; list the layers that do run with repguide.layers({role}, example_input)."
            )

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _candidate_modules(model: nn.Module, types: str | tuple[type, ...]) -> list[tuple[str, nn.Module]]:
    if types == "default":
        types = DEFAULT_LAYER_TYPES
    chosen = []
    for name, module in model.named_modules():
        if not name or isinstance(module, _CONTAINERS):
            continue
        if types == "all" or isinstance(module, types):
            chosen.append((name, module))
    return chosen


@contextlib.contextmanager
def _no_side_effects(model: nn.Module) -> Iterator[None]:
    """Run a probing forward without touching buffers (BatchNorm statistics) or the global RNG."""
    saved = {name: buf.clone() for name, buf in model.named_buffers()}
    # The CUDA generators of the devices the model lives on too: dropout there draws from them.
    tensors = itertools.chain(model.parameters(), model.buffers())
    cuda = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        yield
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name in saved:
                buf.copy_(saved[name])


def discover(
    model: nn.Module,
    *example_args: Any,
    types: str | tuple[type, ...] = "default",
    batch_axes: Mapping[str, int] | None = None,
    input_batch_axis: int = 0,
    **example_kwargs: Any,
) -> list[LayerInfo]:
    """Candidate layers of ``model`` in forward execution order, found with probing forwards.

    The model runs twice, on the example batch and on it with its first example repeated, in its
    current train/eval mode, under no_grad, with its buffers and the RNG restored afterwards. A
    layer's batch axis is the one axis that grew by one, so it is found even when another axis has
    the batch size. Layers whose output has no such axis are not candidates.
    """
    n = _batch_size(example_args, example_kwargs, input_batch_axis)
    chosen = _candidate_modules(model, types)
    order, final = _probe(model, chosen, example_args, example_kwargs)
    grown_args, grown_kwargs = _grow(example_args, example_kwargs, n, input_batch_axis)
    try:
        grown = {name: _shape(output) for name, _, output in _probe(model, chosen, grown_args, grown_kwargs)[0]}
    except Exception:  # a model tied to its batch size (e.g. a fixed memory tensor): no probe
        grown = {}
    axes = dict(batch_axes or {})
    for name, _, output in order:
        axis = _grown_axis(_shape(output), grown.get(name), n)
        if axis is not None:
            axes.setdefault(name, axis)
    normalise = _Normaliser(model, axes)
    normalise.batch_size = n
    infos = []
    for name, module, output in order:
        tensor = _first_tensor(output)
        if tensor is None:
            continue
        try:
            activation = normalise(name, module, output)
        except ValueError as err:
            if "ambiguous" in str(err):
                raise
            continue  # no batch axis at all: not a per-example representation
        axis = 0 if isinstance(tensor, PackedSequence) else normalise.batch_axes[name]
        infos.append(LayerInfo(
            name, type(module).__name__, tuple(activation.shape), tensor is final, axis,
            normalise.channels_first[name],
        ))
    return infos


def _probe(model, chosen, args, kwargs) -> tuple[list[tuple[str, nn.Module, Any]], Any]:
    order: list[tuple[str, nn.Module, Any]] = []
    calls: dict[nn.Module, int] = {}

    def hook(module: nn.Module, inputs: Any, output: Any, name: str) -> None:
        k = calls.get(module, 0)
        calls[module] = k + 1
        order.append((name if k == 0 else f"{name}@{k}", module, output))

    handles = [module.register_forward_hook(lambda m, a, o, name=name: hook(m, a, o, name)) for name, module in chosen]
    try:
        with _no_side_effects(model):
            output = model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return order, _first_tensor(output)


def _grow(args: Sequence[Any], kwargs: Mapping[str, Any], n: int, axis: int) -> tuple[tuple, dict]:
    """The example inputs with their first example appended along the batch axis."""

    def grow(value: Any) -> Any:
        if isinstance(value, Tensor) and value.dim() > axis and value.shape[axis] == n:
            return torch.cat([value, value.narrow(axis, 0, 1)], dim=axis)
        return value

    return tuple(grow(a) for a in args), {k: grow(v) for k, v in kwargs.items()}


def _shape(output: Any) -> tuple[int, ...] | None:
    tensor = _first_tensor(output)
    return tuple(tensor.shape) if isinstance(tensor, Tensor) else None


def _grown_axis(before: tuple[int, ...] | None, after: tuple[int, ...] | None, n: int) -> int | None:
    """The one axis of size n that became n + 1 while every other axis stayed the same."""
    if before is None or after is None or len(before) != len(after):
        return None
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
    if len(changed) == 1 and before[changed[0]] == n and after[changed[0]] == n + 1:
        return changed[0]
    return None


def layers(model: nn.Module, *example_args: Any, types: str | tuple[type, ...] = "default", **kwargs: Any) -> list[str]:
    """Names of ``model``'s candidate layers in forward execution order (see :func:`discover`).

    ``types``: ``"default"`` (linear, conv, recurrent, attention and Transformer layers),
    ``"all"`` (every non-container module) or a tuple of module classes.
    """
    return [info.name for info in discover(model, *example_args, types=types, **kwargs)]


def _batch_size(args: Sequence[Any], kwargs: Mapping[str, Any], axis: int = 0) -> int:
    found = _first_tensor(list(args) + list(kwargs.values()))
    if found is None:
        raise LayerError("the model's inputs hold no tensor, so the batch size is unknown")
    if isinstance(found, PackedSequence):
        return int(found.batch_sizes[0])
    if found.dim() == 0:
        raise LayerError("the first input tensor is 0-dim, so it has no batch axis")
    return found.shape[axis]
