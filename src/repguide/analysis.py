"""Measuring networks rather than training them: layer×layer similarity over a data set, and error
consistency between two classifiers.

>>> result = compare(model_a, model_b, loader)          # every layer of A against every layer of B
>>> result.matrix.shape == (len(result.layers_a), len(result.layers_b))
>>> error_consistency(correct(model_a, loader), correct(model_b, loader)).kappa
"""

from __future__ import annotations

import csv
import functools
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repguide.errors import ArgumentError
import torch
from torch import Tensor, nn

from repguide.capture import Capture, discover, first_tensor, input_batch_size, no_side_effects, reduce
from repguide.pairing import select_layers
from repguide.similarity import MinibatchCKA

__all__ = [
    "ErrorConsistency",
    "MinibatchCKA",
    "SimilarityMatrix",
    "compare",
    "correct",
    "error_consistency",
    "ordered_batches",
    "split_batch",
]

IGNORE_INDEX = -100  # token targets that are not predicted (padding, prompts), as in training

Batch = Any  # a tensor, a tuple/list (*inputs, target), or a dict of keyword inputs


# --------------------------------------------------------------------------------------------
# compare: every layer of one model against every layer of another


@dataclass
class SimilarityMatrix:
    """``matrix[i, j]``: similarity of ``layers_a[i]`` and ``layers_b[j]`` over ``examples`` examples."""

    matrix: Tensor  # (len(layers_a), len(layers_b)), float64
    layers_a: list[str]
    layers_b: list[str]
    examples: int = 0
    measure: str = "minibatch linear CKA (unbiased HSIC)"

    def __getitem__(self, key: tuple[str, str]) -> float:
        a, b = key
        return float(self.matrix[self.layers_a.index(a), self.layers_b.index(b)])

    def to_csv(self, path: str | Path) -> Path:
        """One row per layer of A, one column per layer of B; the corner cell is ``layer``."""
        path = Path(path)
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["layer", *self.layers_b])
            for name, row in zip(self.layers_a, self.matrix.tolist()):
                writer.writerow([name, *(repr(v) for v in row)])
        return path

    @classmethod
    def read_csv(cls, path: str | Path) -> "SimilarityMatrix":
        with Path(path).open(newline="") as f:
            header, *rows = list(csv.reader(f))
        matrix = torch.tensor([[float(v) for v in row[1:]] for row in rows], dtype=torch.float64)
        return cls(matrix.reshape(len(rows), len(header) - 1), [row[0] for row in rows], header[1:])


def split_batch(batch: Batch) -> tuple[tuple, dict]:
    """A batch's model inputs as ``(args, kwargs)``: a tensor is the one input, a tuple or list is
    ``(*inputs, target)`` (repguide's data sets, most DataLoaders; one element: just the input),
    a dict is keyword inputs (Hugging Face style)."""
    if isinstance(batch, Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)) and batch:
        return tuple(batch[:-1]) if len(batch) > 1 else tuple(batch), {}
    raise TypeError(
        f"cannot tell a {type(batch).__name__} batch's inputs; pass inputs= a function batch -> (args, kwargs)"
    )


def ordered_batches(dataset, batch_size: int, max_examples: int | None = None) -> Iterable[tuple[Tensor, ...]]:
    """A repguide data set's first ``max_examples`` examples (all by default) in order, as batches
    ``(*inputs, target)`` made by its ``batch(idx)``."""
    total = len(dataset) if max_examples is None else min(max_examples, len(dataset))
    for start in range(0, total, batch_size):
        yield dataset.batch(torch.arange(start, min(start + batch_size, total)))


def _device_of(model: nn.Module) -> torch.device | None:
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return None if tensor is None else tensor.device


def _move(args: tuple, kwargs: dict, device: torch.device | None) -> tuple[tuple, dict]:
    def move(v):
        return v.to(device) if isinstance(v, Tensor) and device is not None else v

    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


_PROBES = (5, 6)


def _probe_batch_axes(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, int]:
    """Each module's batch axis, seen as the one axis whose size follows two probe batch sizes.

    An evaluation batch of 64 or 256 often equals a layer's width, where the batch axis of a
    (n, T, 64) output is ambiguous by size alone; two probes of 5 and 6 examples settle it.
    """
    shapes: list[dict[str, tuple[int, ...]]] = []
    for size in _PROBES:
        seen: dict[str, tuple[int, ...]] = {}

        def hook(module, inputs, output, name):
            found = first_tensor(output)
            if isinstance(found, Tensor):
                seen.setdefault(name, tuple(found.shape))

        modules = [(name, m) for name, m in model.named_modules() if name]
        handles = [m.register_forward_hook(functools.partial(hook, name=name)) for name, m in modules]
        try:
            with no_side_effects(model):
                model(*_head(args, size), **_head(kwargs, size))
        finally:
            for handle in handles:
                handle.remove()
        shapes.append(seen)
    axes = {}
    for name, small in shapes[0].items():
        large = shapes[1].get(name, ())
        moved = [i for i, sizes in enumerate(zip(small, large)) if sizes == _PROBES]
        if len(small) == len(large) and len(moved) == 1:
            axes[name] = moved[0]
    return axes


def _layer_names(model: nn.Module, spec, args: tuple, kwargs: dict, axes: dict, role: str, rule: str) -> list[str]:
    if spec is None:
        return [info.name for info in discover(model, *args, layers=rule, batch_axes=axes, **kwargs)]
    available = [info.name for info in discover(model, *args, types="all", batch_axes=axes, **kwargs)]
    return select_layers(spec, available, role)


@torch.no_grad()
def compare(
    model_a: nn.Module,
    model_b: nn.Module,
    batches: Iterable[Batch],
    layers_a: str | Sequence[str] | None = None,
    layers_b: str | Sequence[str] | None = None,
    *,
    reduction: str = "flatten",
    layers: str = "blocks",
    max_examples: int | None = None,
    inputs: Callable[[Batch], tuple[tuple, dict]] = split_batch,
    dtype: torch.dtype = torch.float64,
    gram_dtype: torch.dtype | None = None,
) -> SimilarityMatrix:
    """Minibatch linear CKA (:class:`MinibatchCKA`) of every layer of ``model_a`` against every
    layer of ``model_b`` over ``batches`` (a DataLoader or any iterable; see :func:`split_batch`).

    ``layers_a``/``layers_b``: names or glob patterns (matched against every module, kept in
    execution order); default: the candidate layers of :func:`repguide.layers` under the rule
    ``layers`` (``"blocks"``, ``"leaves"`` or ``"all"``; the output head is one under the last two). Both models run in eval mode under no_grad (their modes are restored), each on the
    device of its parameters. ``reduction``: ``"flatten"`` or ``"mean"`` (see
    :func:`repguide.capture.reduce`). ``max_examples``: stop after this many examples. A batch
    of fewer than 4 examples after the first (a DataLoader's last) is left out: the unbiased
    HSIC needs 4; ``examples`` in the result counts those used. ``inputs``: how a batch becomes
    the models' ``(args, kwargs)``. ``dtype``: the centring and the HSIC sums; ``gram_dtype``: the
    Gram products, by default the activations' own precision (float32 for a float32 model;
    ``torch.float64`` makes every step float64). Returns ``dtype`` values on the CPU.
    """
    if reduction not in ("flatten", "mean"):
        raise ArgumentError(f"reduction must be 'flatten' or 'mean' for compare, got {reduction!r}")
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        raise ArgumentError("compare needs at least one batch; the data gave none")
    same = model_b is model_a and layers_b == layers_a  # one forward serves both sides
    modes = (model_a.training, model_b.training)
    model_a.eval(), model_b.eval()
    captures: list[Capture] = []
    try:
        names, runs = [], []
        for model, spec, role in ((model_a, layers_a, "model A"), (model_b, layers_b, "model B"))[: 1 if same else 2]:
            device = _device_of(model)
            args, kwargs = _move(*inputs(first), device)
            probe = input_batch_size(args, kwargs) >= max(_PROBES)
            axes = _probe_batch_axes(model, args, kwargs) if probe else {}
            if probe:  # discovery needs the modules that run and their shapes, not a whole batch
                args, kwargs = _head(args, max(_PROBES)), _head(kwargs, max(_PROBES))
            names.append(_layer_names(model, spec, args, kwargs, axes, role, layers))
            captures.append(Capture(model, names[-1], {k: v for k, v in axes.items() if k in names[-1]}, role=role))
            runs.append((model, captures[-1], device, role))
        result = MinibatchCKA(len(names[0]), len(names[-1]), dtype, gram_dtype)
        for batch in itertools.chain([first], batches):
            args, kwargs = inputs(batch)
            n = input_batch_size(args, kwargs)
            if max_examples is not None and n > max_examples - result.examples:
                n = max_examples - result.examples
                args, kwargs = _head(args, n), _head(kwargs, n)
            if n < 4 and result.batches:
                continue  # a last, short batch: too small for the unbiased HSIC
            features = [_features(model, capture, *_move(args, kwargs, device), n, reduction, role)
                        for model, capture, device, role in runs]
            result.update(features[0], features[-1])
            if max_examples is not None and result.examples >= max_examples:
                break
    finally:
        for capture in captures:
            capture.remove()
        model_a.train(modes[0]), model_b.train(modes[1])
    return SimilarityMatrix(result.compute().cpu(), names[0], names[-1], result.examples)


def _head(value: Any, n: int) -> Any:
    if isinstance(value, Tensor):
        return value[:n]
    if isinstance(value, tuple):
        return tuple(_head(v, n) for v in value)
    if isinstance(value, dict):
        return {k: _head(v, n) for k, v in value.items()}
    return value


def _features(model, capture: Capture, args, kwargs, n: int, reduction: str, role: str) -> list[Tensor]:
    with capture.record(n) as acts:
        model(*args, **kwargs)
    capture.check_complete(acts, role)
    channels_first = capture.normalise.channels_first
    return [reduce(acts[name], reduction, channels_first[name]) for name in capture.names]


# --------------------------------------------------------------------------------------------
# Error consistency


@dataclass(frozen=True)
class ErrorConsistency:
    """Geirhos et al. (2020): κ = (c_obs − c_exp) / (1 − c_exp).

    ``observed`` (c_obs): the fraction of examples both classifiers get right or both get wrong.
    ``expected`` (c_exp = p_a·p_b + (1 − p_a)(1 − p_b)): that fraction for independent classifiers
    with these accuracies. κ is 0 for independent errors, 1 for identical ones, and NaN when
    c_exp = 1 (both classifiers always right, or both always wrong), where it is undefined.
    """

    kappa: float
    observed: float
    expected: float
    accuracy_a: float
    accuracy_b: float
    examples: int


def error_consistency(correct_a: Tensor, correct_b: Tensor) -> ErrorConsistency:
    """κ of two classifiers from ``correct_a, correct_b: (N,)`` bool, whether each got each example right."""
    if correct_a.shape != correct_b.shape or correct_a.dim() != 1 or len(correct_a) == 0:
        raise ArgumentError(
            f"expected two non-empty (N,) vectors over the same examples, got shapes "
            f"{tuple(correct_a.shape)} and {tuple(correct_b.shape)}"
        )
    a, b = correct_a.bool().cpu(), correct_b.bool().cpu()
    p_a, p_b = a.double().mean().item(), b.double().mean().item()
    observed = (a == b).double().mean().item()
    expected = p_a * p_b + (1 - p_a) * (1 - p_b)
    kappa = (observed - expected) / (1 - expected) if expected < 1 else float("nan")
    return ErrorConsistency(kappa, observed, expected, p_a, p_b, len(a))


@torch.no_grad()
def correct(model: nn.Module, batches: Iterable[Sequence[Tensor]]) -> Tensor:
    """``(N,)`` bool: whether ``model``'s top prediction is right, for every example of ``batches``
    (each ``(*inputs, target)``), in order. Token outputs ``(n, T, V)`` count every predicted
    token (targets of -100 are skipped). The model runs in eval mode (its mode is restored)."""
    was_training = model.training
    model.eval()
    device, out = _device_of(model), []
    try:
        for batch in batches:
            *args, y = (t.to(device) if device is not None else t for t in batch)
            logits = first_tensor(model(*args))
            hit = logits.argmax(dim=-1) == y
            out.append(hit[y != IGNORE_INDEX].reshape(-1).cpu())
    finally:
        model.train(was_training)
    if not out:
        raise ArgumentError("correct needs at least one batch; the data gave none")
    return torch.cat(out)
