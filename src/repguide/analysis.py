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

import torch
from torch import Tensor, nn

from repguide.capture import Capture, _batch_size, _first_tensor, _no_side_effects, discover, reduce
from repguide.pairing import _select
from repguide.similarity import Prepared, _safe_div, _safe_sqrt

__all__ = [
    "ErrorConsistency",
    "MinibatchCKA",
    "SimilarityMatrix",
    "compare",
    "correct",
    "error_consistency",
    "load_model",
    "ordered_batches",
    "run_config",
    "split_batch",
]

IGNORE_INDEX = -100  # token targets that are not predicted (padding, prompts), as in training

Batch = Any  # a tensor, a tuple/list (*inputs, target), or a dict of keyword inputs


# --------------------------------------------------------------------------------------------
# Minibatch CKA


def _centred_gram(x: Tensor, dtype: torch.dtype) -> Tensor:
    """(n, n) Gram matrix of the column-centred ``x: (n, d)`` in ``dtype``; zeros for a constant x.

    Not :attr:`Prepared.gram`: Prepared rescales each input by its own largest entry, which one CKA
    value is invariant to but a ratio of HSICs summed over batches is not. Prepared still decides
    what counts as constant, so a constant layer scores 0 here exactly as in every measure.
    """
    x = x.reshape(x.shape[0], -1).to(dtype)
    if Prepared(x, min_n=4).constant:
        return x.new_zeros(x.shape[0], x.shape[0])
    xc = x - x.mean(dim=0, keepdim=True)
    return xc @ xc.T


def _u_centre(k: Tensor) -> Tensor:
    """The U-centred ``k: (n, n)`` (Székely & Rizzo 2014): ``<_u_centre(K), _u_centre(L)>_F`` is
    :func:`repguide.similarity._u_inner` ``(K, L)``, so a stack of U-centred Grams gives every
    layer pair's HSIC₁ in one matrix product instead of one ``_u_inner`` call per pair."""
    n = k.shape[0]
    kt = k.clone().fill_diagonal_(0)
    rows = kt.sum(dim=1, keepdim=True) / (n - 2)
    return (kt - rows - rows.T + kt.sum() / ((n - 1) * (n - 2))).fill_diagonal_(0)


class MinibatchCKA:
    """Linear CKA of every (layer of A, layer of B) pair over a data set, from minibatches.

    Nguyen, Raghu & Kornblith (2021): the unbiased HSIC₁ of Song et al. (2012) is summed over
    minibatches for every pair and every layer with itself, and only then
    CKA = mean HSIC₁(K, L) / sqrt(mean HSIC₁(K, K) · mean HSIC₁(L, L)). Each batch's HSIC₁ is an
    unbiased estimate, so the result approaches the data-set value however small the batches,
    unlike a mean of per-batch CKA values. With one batch it equals ``cka_unbiased``.
    A layer that is constant in every batch scores 0 against everything.
    """

    def __init__(self, num_a: int, num_b: int, dtype: torch.dtype = torch.float64):
        self.shape, self.dtype = (num_a, num_b), dtype
        self.xy: Tensor | None = None  # (num_a, num_b) Σ over batches of HSIC₁(K_a, L_b)
        self.xx: Tensor | None = None  # (num_a,) Σ HSIC₁(K_a, K_a)
        self.yy: Tensor | None = None  # (num_b,) Σ HSIC₁(L_b, L_b)
        self.batches = 0
        self.examples = 0

    def update(self, features_a: Sequence[Tensor], features_b: Sequence[Tensor]) -> None:
        """Add one minibatch: ``features_a[i]: (n, d_i)`` per layer of A, ``features_b[j]: (n, e_j)``
        per layer of B, rows the same n >= 4 examples. Passing the same list twice compares a
        model with itself at the cost of one."""
        if (len(features_a), len(features_b)) != self.shape:
            raise ValueError(f"expected {self.shape} layers, got ({len(features_a)}, {len(features_b)})")
        sizes = {x.shape[0] for x in itertools.chain(features_a, features_b)}
        if len(sizes) != 1:
            raise ValueError(f"every layer must hold the same examples; got batch sizes {sorted(sizes)}")
        n = sizes.pop()
        if n < 4:
            raise ValueError(
                f"a minibatch needs at least 4 examples for the unbiased HSIC, got {n}; "
                "drop the last, short batch (DataLoader(drop_last=True)) or use larger batches"
            )
        device = features_a[0].device
        scale = n * (n - 3)  # <U(K), U(L)> is n(n-3)·HSIC₁

        def centred(features: Sequence[Tensor]) -> Tensor:  # (layers, n²)
            return torch.stack([_u_centre(_centred_gram(x.to(device), self.dtype)).flatten() for x in features])

        u_a = centred(features_a)
        u_b = u_a if features_b is features_a else centred(features_b)
        xy = u_a @ u_b.T / scale
        xx = u_a.square().sum(dim=1) / scale
        yy = xx if u_b is u_a else u_b.square().sum(dim=1) / scale
        if self.xy is None:
            self.xy, self.xx, self.yy = xy, xx, yy
        else:
            self.xy, self.xx, self.yy = self.xy + xy, self.xx + xx, self.yy + yy
        self.batches += 1
        self.examples += n

    def compute(self) -> Tensor:
        """The ``(num_a, num_b)`` CKA matrix (the mean over batches cancels in the ratio)."""
        if self.xy is None:
            raise ValueError("no minibatch was added; the data gave no batches")
        return _safe_div(self.xy, _safe_sqrt(self.xx)[:, None] * _safe_sqrt(self.yy)[None, :])


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
            found = _first_tensor(output)
            if isinstance(found, Tensor):
                seen.setdefault(name, tuple(found.shape))

        modules = [(name, m) for name, m in model.named_modules() if name]
        handles = [m.register_forward_hook(functools.partial(hook, name=name)) for name, m in modules]
        try:
            with _no_side_effects(model):
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
    return _select(spec, available, role)


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
    the models' ``(args, kwargs)``. Returns float64 values on the CPU.
    """
    if reduction not in ("flatten", "mean"):
        raise ValueError(f"reduction must be 'flatten' or 'mean' for compare, got {reduction!r}")
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        raise ValueError("compare needs at least one batch; the data gave none")
    same = model_b is model_a and layers_b == layers_a  # one forward serves both sides
    modes = (model_a.training, model_b.training)
    model_a.eval(), model_b.eval()
    captures: list[Capture] = []
    try:
        names, runs = [], []
        for model, spec, role in ((model_a, layers_a, "model A"), (model_b, layers_b, "model B"))[: 1 if same else 2]:
            device = _device_of(model)
            args, kwargs = _move(*inputs(first), device)
            axes = _probe_batch_axes(model, args, kwargs) if _batch_size(args, kwargs) >= max(_PROBES) else {}
            names.append(_layer_names(model, spec, args, kwargs, axes, role, layers))
            captures.append(Capture(model, names[-1], {k: v for k, v in axes.items() if k in names[-1]}, role=role))
            runs.append((model, captures[-1], device, role))
        result = MinibatchCKA(len(names[0]), len(names[-1]), dtype)
        for batch in itertools.chain([first], batches):
            args, kwargs = inputs(batch)
            n = _batch_size(args, kwargs)
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
        raise ValueError(
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
            logits = _first_tensor(model(*args))
            hit = logits.argmax(dim=-1) == y
            out.append(hit[y != IGNORE_INDEX].reshape(-1).cpu())
    finally:
        model.train(was_training)
    if not out:
        raise ValueError("correct needs at least one batch; the data gave none")
    return torch.cat(out)


# --------------------------------------------------------------------------------------------
# Models by reference: a registry name, a run folder or a checkpoint


def load_model(
    ref: str | Path,
    splits,
    *,
    seed: int = 0,
    kwargs: Mapping[str, Any] | None = None,
    weights: str = "final",
) -> nn.Module:
    """The model ``ref`` names, sized to ``splits`` (a :class:`repguide.data.Splits`):

    * a registry name (``"resnet18"``): untrained, from ``seed``, with the size knobs ``kwargs``;
    * ``"NAME:PATH"``: that model with the weights at PATH (a state dict or a run checkpoint);
    * a run folder (``runs/<name>``): its config's model with its ``final.pt``, or with
      ``weights="init"`` its initial weights (rebuilt from the run's seed);
    * a ``final.pt`` / ``.ckpt`` file in a run folder: that run's model with those weights.
    """
    from repguide.config import ModelConfig
    from repguide.models import list_models
    from repguide.runs import CheckpointError, load_weights
    from repguide.train import build_model

    if weights not in ("final", "init"):
        raise ValueError(f"weights must be 'final' or 'init', got {weights!r}")
    path = Path(ref)
    if path.is_dir() or path.is_file():
        run_dir = path if path.is_dir() else path.parent
        config = run_config(run_dir)
        model = build_model(config.model, splits, config.train.seed)
        if weights == "init":
            return model
        file = path / "final.pt" if path.is_dir() else path
        if not file.is_file():
            raise CheckpointError(f"{run_dir} has no final.pt: the run has not finished (or give a .ckpt)")
    else:
        name, _, file = str(ref).partition(":")
        if name not in list_models():
            raise ValueError(
                f"{str(ref)!r} is neither a run folder, a weights file, nor a model name "
                f"({', '.join(list_models())}), optionally as NAME:PATH-TO-WEIGHTS"
            )
        model = build_model(ModelConfig(name=name, kwargs=dict(kwargs or {})), splits, seed)
        if not file:
            return model
    state = load_weights(file)
    if "target" in state and "optimizer" in state:  # a training checkpoint, not a bare state dict
        state = state["target"]
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{file} does not fit {ref}: {str(err).splitlines()[0]}") from None
    return model


def run_config(run_dir: str | Path):
    """The validated :class:`repguide.config.RunConfig` a run folder was trained with."""
    import yaml

    from repguide.config import validate

    file = Path(run_dir) / "config.yaml"
    if not file.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder: it has no config.yaml")
    return validate(yaml.safe_load(file.read_text()))
