"""Candidate layers of a model, in forward execution order.

Four rules (``layers=``):

- ``"blocks"`` (default): the model's *blocks*, i.e. the non-leaf children of an ``nn.ModuleList``,
  ``nn.Sequential`` or ``nn.ModuleDict`` that have at least one sibling of the same class, taking the
  outermost such groups (``transformer.h.N``, ``encoder.layer.N``, ``model.layers.N``, ``blocks.N``,
  the residual blocks of each ResNet stage). A layer is a block's output: what Hugging Face's
  ``output_hidden_states`` and timm's ``forward_intermediates`` expose, except that the last one is
  the last block's output, before any final norm (a layer even where it is the model's output: a
  block is never the task head). The embedding or stem is not a layer. A model
  with no blocks falls back to its leaf layers: linear maps (``nn.Linear``, Hugging Face's
  ``Conv1D``), convolutions, every layer of a recurrent module, attention, Transformer layers and
  normalisation layers.
- ``"leaves"``: modules of :data:`DEFAULT_LAYER_TYPES` (repguide's default before blocks; a
  stacked recurrent module is one layer).
- ``"all"``: every non-container module, and every layer of a stacked recurrent module.
- ``"official"``: what the paper's research code recorded (its ``layer_extract.py``): modules whose
  exact class (not a subclass) is one of :data:`OFFICIAL_LAYER_TYPES`, LayerNorm and whole
  ``nn.TransformerDecoderLayer`` calls included, a stacked recurrent module as one layer, one layer
  per call of a module called several times, and the last recorded layer dropped (the head, on
  the official models). A module may say which of those classes it stands for with a
  ``stands_for`` attribute: repguide's own attention counts as ``nn.MultiheadAttention`` (whose
  projections are not modules, so the attention's inner layers are not recorded), its Transformer
  block with a cross-attention as ``nn.TransformerDecoderLayer``.

``types=`` (a tuple of module classes) overrides the rule; the strings ``"default"`` (= ``"leaves"``,
what stored configs say) and ``"all"`` are accepted there too.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from repguide.capture._hooks import _CONTAINERS, _Normaliser, first_tensor, input_batch_size, uncompiled
from repguide.capture._recurrent import is_stacked, layer_by_layer, layer_name
from repguide.errors import LayerError

#: The ways of choosing candidate layers; see the module docstring.
LAYER_RULES = ("blocks", "leaves", "all", "official")

#: The ``"leaves"`` rule: the paper's choice (linear maps, convolutions, recurrent layers,
#: attention, Transformer layers), matched with isinstance so subclasses count.
DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.modules.conv._ConvNd,
    nn.RNNBase,
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)
#: The ``"official"`` rule's classes, matched exactly (the official code's ``layers_to_retain``).
OFFICIAL_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv2d,
    nn.Linear,
    nn.AdaptiveAvgPool2d,
    nn.LSTM,
    nn.RNN,
    nn.TransformerDecoderLayer,
    nn.LayerNorm,
    nn.MultiheadAttention,
)
# Leaf layers of a model without blocks; Hugging Face's Conv1D and norms (LlamaRMSNorm, ...) by
# class name, so that transformers need not be imported.
_LEAF_TYPES = DEFAULT_LAYER_TYPES + (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
_LOOKED_FOR = {
    "blocks": "blocks (non-leaf children of an nn.ModuleList/Sequential/ModuleDict with a sibling of the same "
    "class) and, there being none, leaf layers (Linear, Conv1D, convolutions, recurrent, attention, "
    "Transformer and normalisation layers)",
    "leaves": "modules of repguide.capture.DEFAULT_LAYER_TYPES (Linear, Bilinear, convolutions, "
    "recurrent, MultiheadAttention, Transformer layers)",
    "all": "every module",
    "official": "modules whose exact class is one of repguide.capture.OFFICIAL_LAYER_TYPES (Conv2d, "
    "Linear, AdaptiveAvgPool2d, LSTM, RNN, TransformerDecoderLayer, LayerNorm, MultiheadAttention), "
    "the last one dropped",
}

Named = list[tuple[str, nn.Module]]


@dataclass(frozen=True)
class LayerInfo:
    """One candidate layer found by :func:`discover`."""

    name: str
    module_type: str
    shape: tuple[int, ...]  # batch-first activation shape on the example input
    is_output: bool  # the task head: its activation is the model's output (a block or a recurrent layer never is)
    batch_axis: int = 0  # where the batch is in the module's raw output
    channels_first: bool = False  # features on axis 1, positions after (conv maps)
    overwritten: bool = False  # a later op of the forward changed the output in place (an in-place ReLU)


def block_names(model: nn.Module) -> list[str]:
    """The model's blocks (see the module docstring), in registration order."""
    blocks: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        children = list(module.named_children())
        kinds = Counter(type(c) for _, c in children if _has_children(c))
        grouped = isinstance(module, (nn.ModuleList, nn.Sequential, nn.ModuleDict))
        for name, child in children:
            full = f"{prefix}.{name}" if prefix else name
            if grouped and _has_children(child) and kinds[type(child)] > 1:
                blocks.append(full)  # outermost: a block's insides are not searched
            else:
                visit(full, child)

    visit("", model)
    return blocks


def _has_children(module: nn.Module) -> bool:
    return next(module.children(), None) is not None


def _is_leaf_layer(module: nn.Module) -> bool:
    kind = type(module).__name__
    return isinstance(module, _LEAF_TYPES) or kind == "Conv1D" or kind.endswith("Norm")


def _candidates(model: nn.Module, layers: str, types: str | tuple[type, ...] | None) -> tuple[Named, Named, str]:
    """(modules whose outputs are candidates, stacked recurrent modules whose every layer is,
    what was looked for)."""
    if isinstance(types, tuple):
        kinds = ", ".join(t.__name__ for t in types)
        return [(n, m) for n, m in model.named_modules() if n and isinstance(m, types)], [], f"modules of type {kinds}"
    if types is not None:
        if types not in ("default", "all"):
            raise LayerError(f"types must be a tuple of module classes, 'default' or 'all'; got {types!r}")
        layers = "leaves" if types == "default" else "all"
    if layers not in LAYER_RULES:
        raise LayerError(f"unknown layer rule {layers!r}; choose one of {', '.join(LAYER_RULES)}")
    modules = [(n, m) for n, m in model.named_modules() if n and not isinstance(m, _CONTAINERS)]
    if layers == "leaves":
        return [(n, m) for n, m in modules if isinstance(m, DEFAULT_LAYER_TYPES)], [], _LOOKED_FOR[layers]
    if layers == "official":
        return _official_candidates(model), [], _LOOKED_FOR[layers]
    stacked = [(n, m) for n, m in modules if is_stacked(m)]
    if layers == "all":
        return modules, stacked, _LOOKED_FOR[layers]
    blocks = block_names(model)
    if blocks:
        return [(n, model.get_submodule(n)) for n in blocks], [], _LOOKED_FOR[layers]
    leaves = [(n, m) for n, m in modules if _is_leaf_layer(m) and not is_stacked(m)]
    return leaves, stacked, _LOOKED_FOR[layers]


def _official_candidates(model: nn.Module) -> Named:
    """The ``"official"`` rule's modules: exact classes, or the class a module ``stands_for``;
    nothing inside a module that stands for ``nn.MultiheadAttention``."""
    chosen: Named = []
    opaque: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix + ".") for prefix in opaque):
            continue
        kind = getattr(module, "stands_for", type(module))
        if kind is nn.MultiheadAttention:
            opaque.append(name)
        if kind in OFFICIAL_LAYER_TYPES:
            chosen.append((name, module))
    return chosen


def _no_layer_message(model: nn.Module, looked_for: str) -> str:
    kinds = Counter(type(m).__name__ for n, m in model.named_modules() if n and not isinstance(m, _CONTAINERS))
    common = ", ".join(f"{kind} ×{count}" for kind, count in kinds.most_common(5)) or "none"
    return (
        f"{type(model).__name__} has no candidate layer: discovery looked for {looked_for}, and found "
        f"none whose output holds the batch. Its most common module types: {common}. Name the layer "
        "types with layer_types=(...) (types= in repguide.layers / discover), or give the pairs "
        "explicitly with pairs=[(target_layer, guide_layer), ...]."
    )


@contextlib.contextmanager
def no_side_effects(model: nn.Module) -> Iterator[None]:
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
    layers: str = "blocks",
    types: str | tuple[type, ...] | None = None,
    batch_axes: Mapping[str, int] | None = None,
    input_batch_axis: int = 0,
    **example_kwargs: Any,
) -> list[LayerInfo]:
    """Candidate layers of ``model`` in forward execution order, found with probing forwards.

    ``layers``: ``"blocks"``, ``"leaves"``, ``"all"`` or ``"official"``; ``types``: module classes
    that override it (see the module docstring). The model runs twice, on the example batch and on
    it with its first example repeated, in its current train/eval mode, under no_grad, with its
    buffers and the RNG restored afterwards. A layer's batch axis is the one axis that grew by one,
    so it is found even when another axis has the batch size. Layers whose output has no such axis are not
    candidates; a model with no candidate at all is an error that says what to do.
    """
    model = uncompiled(model)  # probed eagerly, its layers named as the original module names them
    n = input_batch_size(example_args, example_kwargs, input_batch_axis)
    chosen, stacked, looked_for = _candidates(model, layers, types)
    order, final, overwritten = _probe(model, chosen, stacked, example_args, example_kwargs)
    if layers == "official" and types is None:
        order = order[:-1]  # the official code dropped the last recorded layer
    grown_args, grown_kwargs = _grow(example_args, example_kwargs, n, input_batch_axis)
    try:
        grown_order = _probe(model, chosen, stacked, grown_args, grown_kwargs)[0]
        grown = {name: _shape(output) for name, _, output in grown_order}
    except Exception:  # a model tied to its batch size (e.g. a fixed memory tensor): no probe
        grown = {}
    axes = dict(batch_axes or {})
    for name, _, output in order:
        axis = _grown_axis(_shape(output), grown.get(name), n)
        if axis is not None:
            axes.setdefault(name, axis)
    blocks = set(block_names(model)) if layers == "blocks" and types is None else set()
    normalise = _Normaliser(model, axes)
    normalise.batch_size = n
    infos = []
    for name, module, output in order:
        tensor = first_tensor(output)
        if tensor is None:
            continue
        try:
            activation = normalise(name, module, output)
        except ValueError as err:
            if "ambiguous" in str(err):
                raise
            continue  # no batch axis at all: not a per-example representation
        axis = 0 if isinstance(tensor, PackedSequence) else normalise.batch_axes[name]
        head = _is_output(tensor, final) and name.split("@")[0] not in blocks and not isinstance(module, nn.RNNBase)
        infos.append(LayerInfo(
            name, type(module).__name__, tuple(activation.shape), head, axis,
            normalise.channels_first[name], name in overwritten,
        ))
    if not infos:
        raise LayerError(_no_layer_message(model, looked_for))
    return infos


def _is_output(tensor: Any, final: Any) -> bool:
    """``tensor`` is the model's output, the output is a view of its memory (a transpose, a
    reshape, a slice: ``head(h).transpose(0, 1)``, ``head(h)[:, -1]``), its (log-)softmax over
    the last axis (PyTorch's MNIST example returns ``F.log_softmax(self.fc2(x), dim=1)``) or its
    sigmoid (a multi-label head), or ``a · tensor + b`` for scalars a ≠ 0 and b (logits divided
    by a temperature, CLIP's ``logit_scale.exp() * logits``)."""
    if tensor is final:
        return True
    if not isinstance(tensor, Tensor) or not isinstance(final, Tensor) or not tensor.numel() or not final.numel():
        return False
    if tensor.device != final.device:
        return False
    if tensor.untyped_storage().data_ptr() == final.untyped_storage().data_ptr():
        return True
    if tensor.shape != final.shape or not tensor.is_floating_point() or not final.is_floating_point():
        return False
    logits, final = tensor.detach().to(final.dtype), final.detach()
    if any(torch.allclose(f(logits, -1), final, rtol=1e-4, atol=1e-6) for f in (torch.log_softmax, torch.softmax)):
        return True
    return torch.allclose(torch.sigmoid(logits), final, rtol=1e-4, atol=1e-6) or _scalar_affine(logits, final)


def _scalar_affine(x: Tensor, y: Tensor) -> bool:
    """Whether ``y = a · x + b`` for scalars a ≠ 0, b (least squares, float64; the residual within
    1e-5 of y's spread)."""
    x, y = x.double().flatten(), y.double().flatten()
    if x.numel() < 2:
        return False
    xc, yc = x - x.mean(), y - y.mean()
    xx, yy = float(xc @ xc), float(yc @ yc)
    if xx == 0 or yy == 0:
        return False
    a = float(xc @ yc) / xx
    return float((yc - a * xc).norm()) <= 1e-5 * yy ** 0.5


def _probe(
    model: nn.Module, chosen: Named, stacked: Named, args, kwargs,
) -> tuple[list[tuple[str, nn.Module, Any]], Any, set[str]]:
    """One forward: ``[(name, module, raw output)]`` in execution order, the model's output, and
    the layers whose output a later op changed in place."""
    order: list[tuple[str, nn.Module, Any]] = []
    calls: Counter[str] = Counter()
    versions: dict[str, int] = {}

    def record(name: str, module: nn.Module, output: Any) -> None:
        k = calls[name]
        calls[name] += 1
        label = name if k == 0 else f"{name}@{k}"
        order.append((label, module, output))
        tensor = first_tensor(output)
        if isinstance(tensor, Tensor) and not tensor.is_inference():
            versions[label] = tensor._version

    handles = [m.register_forward_hook(lambda m, a, o, name=name: record(name, m, o)) for name, m in chosen]
    by_layer = {m: lambda layer, o, name=name, m=m: record(layer_name(name, layer), m, o) for name, m in stacked}
    try:
        with no_side_effects(model), layer_by_layer(by_layer):
            output = model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    overwritten = {label for label, _, out in order
                   if label in versions and first_tensor(out)._version != versions[label]}
    return order, first_tensor(output), overwritten


def _grow(args: Sequence[Any], kwargs: Mapping[str, Any], n: int, axis: int) -> tuple[tuple, dict]:
    """The example inputs with their first example appended along the batch axis."""

    def grow(value: Any) -> Any:
        if isinstance(value, Tensor) and value.dim() > axis and value.shape[axis] == n:
            return torch.cat([value, value.narrow(axis, 0, 1)], dim=axis)
        return value

    return tuple(grow(a) for a in args), {k: grow(v) for k, v in kwargs.items()}


def _shape(output: Any) -> tuple[int, ...] | None:
    tensor = first_tensor(output)
    return tuple(tensor.shape) if isinstance(tensor, Tensor) else None


def _grown_axis(before: tuple[int, ...] | None, after: tuple[int, ...] | None, n: int) -> int | None:
    """The one axis of size n that became n + 1 while every other axis stayed the same."""
    if before is None or after is None or len(before) != len(after):
        return None
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
    if len(changed) == 1 and before[changed[0]] == n and after[changed[0]] == n + 1:
        return changed[0]
    return None


def layers(
    model: nn.Module,
    *example_args: Any,
    layers: str = "blocks",
    types: str | tuple[type, ...] | None = None,
    **kwargs: Any,
) -> list[str]:
    """Names of ``model``'s candidate layers in forward execution order (see :func:`discover`).

    ``layers``: ``"blocks"`` (default), ``"leaves"``, ``"all"`` or ``"official"``; ``types``: a
    tuple of module classes that overrides it.
    """
    return [info.name for info in discover(model, *example_args, layers=layers, types=types, **kwargs)]
