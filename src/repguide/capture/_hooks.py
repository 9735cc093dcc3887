"""Forward hooks that record named layers' activations, normalised to batch-first tensors.

A *layer* is a named submodule (``model.get_submodule(name)``) or one layer of a stacked recurrent
module (``"rnn.layer1"``, see :mod:`._recurrent`); when a module runs several times in one forward
pass (a shared block applied in a loop) its k-th call (from 0) is named ``"name@k"``.
Activations are normalised to batch-first tensors ``(n, ...)``: tuple outputs (RNNs, attention)
give their first tensor, ``PackedSequence`` is unpacked batch-first, mappings (Hugging Face
``ModelOutput``) give their first tensor value. The batch axis is the one axis whose size is the
batch size; where several axes have that size the module's own ``batch_first`` convention decides,
and otherwise an error asks for ``batch_axes={"layer": axis}``. Nothing is dropped silently.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from repguide._registry import did_you_mean
from repguide.capture._recurrent import layer_by_layer, stacked_layer, stacked_layer_names
from repguide.errors import CaptureError, LayerError, user_stacklevel

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


_COMPILED_PREFIX = "_orig_mod."


def uncompiled(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped, or ``model`` itself when it is not compiled.

    A compiled module names its layers ``_orig_mod.<name>``; repguide names them as the original
    module does, and probes them on it, eagerly (hooks added and removed inside a compiled forward
    recompile it once per layer).
    """
    original = getattr(model, "_orig_mod", None)
    return original if isinstance(original, nn.Module) and type(model).__name__ == "OptimizedModule" else model


def plain_name(model: nn.Module, name: str) -> str:
    """``name`` without the ``_orig_mod.`` prefix when ``model`` is compiled."""
    if uncompiled(model) is not model and name.startswith(_COMPILED_PREFIX):
        return name[len(_COMPILED_PREFIX):]
    return name


def first_tensor(output: Any) -> Tensor | PackedSequence | None:
    """The first tensor (or ``PackedSequence``) in ``output``, depth first through sequences and
    mappings; None if it holds none."""
    if isinstance(output, (Tensor, PackedSequence)):
        return output
    if isinstance(output, Mapping):
        values = output.values()
    elif isinstance(output, Sequence) and not isinstance(output, str):
        values = output
    else:
        return None
    for value in values:
        found = first_tensor(value)
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
    """A layer name resolved to its module, call index and, for a stacked recurrent module's
    layer, the layer's index (else None)."""

    def __init__(self, model: nn.Module, name: str, role: str = "model"):
        base, _, call = plain_name(model, name).partition("@")
        model = uncompiled(model)  # (the same modules; its names are the ones users know)
        self.name, self.base = name, base
        self.call = int(call) if call else 0
        self.layer: int | None = None
        try:
            self.module = model.get_submodule(base)
        except AttributeError:
            found = stacked_layer(model, base)
            if found is None:
                raise LayerError(_unknown_layer_message(name, _module_names(model), role)) from None
            self.module, self.layer = found


def _module_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name] + stacked_layer_names(model)


def _unknown_layer_message(name: str, available: Sequence[str], role: str) -> str:
    hint = did_you_mean(name, available, " Closest: {}.", n=3, cutoff=0.5)
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
        found = first_tensor(output)
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
        overwritten: Mapping[str, bool] | None = None,
    ):
        self.model = model
        self.role = role
        self.names = list(dict.fromkeys(names))
        self.normalise = _Normaliser(model, batch_axes)
        self._refs = [_LayerRef(model, name, role) for name in self.names]
        # module → {(call, layer or None for the module's own output): name}
        self._wanted: dict[nn.Module, dict[tuple[int, int | None], str]] = {}
        for ref in self._refs:
            self._wanted.setdefault(ref.module, {})[ref.call, ref.layer] = ref.name
        # The hooks also count the calls of stacked recurrent modules of which only layers are wanted.
        self._handles = [m.register_forward_hook(self._hook) for m in self._wanted]
        self._stacked = [m for m, wanted in self._wanted.items() if any(layer is not None for _, layer in wanted)]
        self._active = False
        self._calls: dict[nn.Module, int] = {}
        self._acts: dict[str, Tensor] = {}
        # Layers whose output a later op of the forward changes in place (``nn.ReLU(inplace=True)``
        # after a convolution, ``out += identity`` after a norm): each is copied as it is recorded,
        # so that it stays the layer's own output. ``overwritten`` gives what a probing forward saw
        # (repguide.capture.discover); every other layer is copied until a forward has shown
        # whether its output is changed after it ran.
        known = dict(overwritten or {})
        self._unverified: set[str] = {name for name in self.names if name not in known}
        self._copied: set[str] = self._unverified | {name for name in self.names if known.get(name)}
        self._watched: dict[str, tuple[Any, int]] = {}  # name → (output or a weak reference, version)
        self._inert: set[str] = set()  # layers warned of for carrying no gradient

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self._active:
            return
        call = self._calls.get(module, 0)
        self._calls[module] = call + 1
        name = self._wanted[module].get((call, None))
        if name is not None:
            self._keep(name, module, output)

    def _on_layer(self, module: nn.Module, layer: int, output: Any) -> None:
        """One layer of a stacked recurrent module has run (before the module's own hook)."""
        name = self._wanted[module].get((self._calls.get(module, 0), layer))
        if name is not None:
            self._keep(name, module, output)

    def _keep(self, name: str, module: nn.Module, output: Any) -> None:
        tensor = self.normalise(name, module, output)
        raw = first_tensor(output)
        if isinstance(raw, Tensor) and not raw.is_inference():  # (an unpacked PackedSequence is a copy)
            # Verifying holds the output until the forward ends; later forwards watch it without
            # keeping it alive (an output freed before the end can no longer change what is kept).
            ref = raw if name in self._unverified else weakref.ref(raw)
            self._watched[name] = (ref, raw._version)
        self._acts[name] = tensor.clone() if name in self._copied else tensor

    def _check_overwritten(self) -> None:
        """After a forward: which recorded outputs a later op changed in place. A layer being
        verified keeps being copied only if its output changed; one no longer copied whose output
        changed (a forward that changes it only sometimes) is copied from now on, with a warning,
        since this forward compared the changed values."""
        for name, (ref, version) in self._watched.items():
            raw = ref if name in self._unverified else ref()
            changed = raw is not None and raw._version != version
            if name in self._unverified:
                self._unverified.discard(name)
                if not changed:
                    self._copied.discard(name)
            elif changed and name not in self._copied:
                self._copied.add(name)
                _warn(name, self.role, "an op after it changed its output in place (e.g. "
                      "nn.ReLU(inplace=True), `x += y`), which earlier forwards did not; this forward "
                      "compared the changed values. From the next forward on the layer is copied as it runs.")

    @property
    def modules(self) -> list[nn.Module]:
        """The modules whose forward hooks record the layers (for hooks of one's own after them)."""
        return list(self._wanted)

    @contextlib.contextmanager
    def record(self, batch_size: int) -> Iterator[dict[str, Tensor]]:
        """Record this forward pass: yields the dict that fills with ``name → (n, ...)``."""
        self._acts, self._calls, self._watched = {}, {}, {}
        self.normalise.batch_size = batch_size
        self._active = True
        try:
            with layer_by_layer({m: functools.partial(self._on_layer, m) for m in self._stacked}):
                yield self._acts
            self._active = False
            self._check_overwritten()
        finally:
            # The caller keeps the yielded dict; the capture keeps no activation past the pass
            # (a graph-holding tensor on the module would break deepcopy, pickling and EMA copies).
            self._active = False
            self._acts, self._calls, self._watched = {}, {}, {}

    def check_complete(self, acts: Mapping[str, Tensor], role: str = "model", trains: bool = False) -> None:
        """Raise if a layer did not run; where the forward ``trains`` (the recorded layers are to
        carry a gradient), warn once for each layer whose output carries none."""
        for name in [name for name, t in acts.items() if trains and not t.requires_grad and name not in self._inert]:
            self._inert.add(name)
            _warn(name, role, "its recorded output carries no gradient (it ran under no_grad, e.g. inside "
                  "torch.utils.checkpoint with use_reentrant=True, or in a frozen part of the model), so its "
                  "pairs' alignment cannot train the model through it. With checkpointing, use "
                  "use_reentrant=False.")
        missing = [name for name in self.names if name not in acts]
        if missing:
            raise CaptureError(
                f"the {role}'s forward pass did not run layer(s) {missing}. A module that runs "
                "fewer times than its '@k' suffix says, or one bypassed by a fused fast path "
                "(e.g. nn.TransformerEncoderLayer in eval mode under no_grad), never fires its "
                f"hook; list the layers that do run with repguide.layers({role}, example_input)."
            )

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _warn(layer: str, role: str, message: str) -> None:
    """A RuntimeWarning about one layer, shown at the caller's line that ran the model."""
    warnings.warn(f"layer {layer!r} of the {role}: {message}", RuntimeWarning, stacklevel=user_stacklevel())


def input_batch_size(args: Sequence[Any], kwargs: Mapping[str, Any], axis: int = 0) -> int:
    """The batch size of a forward call's inputs: the size along ``axis`` of its first tensor."""
    found = first_tensor(list(args) + list(kwargs.values()))
    if found is None:
        raise LayerError("the model's inputs hold no tensor, so the batch size is unknown")
    if isinstance(found, PackedSequence):
        return int(found.batch_sizes[0])
    if found.dim() == 0:
        raise LayerError("the first input tensor is 0-dim, so it has no batch axis")
    return found.shape[axis]
