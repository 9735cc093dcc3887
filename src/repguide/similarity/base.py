"""What every similarity measure shares: the registry, :class:`Measure`, :class:`Prepared` inputs and
the numerics helpers the measure families build on.

The conventions every measure follows are in the package docstring (:mod:`repguide.similarity`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import torch
from torch import Tensor

from repguide._registry import Registry
from repguide.errors import MeasureError

from repguide.similarity import fused
from repguide.similarity.prepared import (
    Prepared, _compute_dtype, gram_matrix, gram_only_group, gram_only_positions, gram_only_stack,
)

__all__ = [
    "MEASURES",
    "Measure",
    "Prepared",
    "get_measure",
    "gram_matrix",
    "list_measures",
    "register_measure",
    "safe_div",
    "safe_sqrt",
    "similarity",
    "sq_distances",
    "upper_triangle",
]

#: The measures by name: each entry's builder is a :class:`Measure` subclass (or a class with
#: ``__call__``), built with :func:`get_measure`'s keyword arguments.
MEASURES: Registry[type["Measure"]] = Registry("similarity measure", error=MeasureError)


def register_measure(name: str) -> Callable:
    """Decorator: make a :class:`Measure` subclass, or a function ``f(x, y) -> 0-dim tensor``,
    available under ``name``. A function receives both inputs as float32 (or float64), outside
    autocast, after the shape checks."""

    def decorator(obj):
        cls = obj if isinstance(obj, type) else type(name, (_FunctionMeasure,), {"function": staticmethod(obj)})
        MEASURES.register(name, cls)  # a taken name raises before the class is touched
        cls.name = name
        return obj

    return decorator


def list_measures() -> list[str]:
    """Names accepted by :func:`get_measure`."""
    return MEASURES.list()


def get_measure(name: str, **kwargs) -> "Measure":
    """An instance of the measure registered as ``name`` (kwargs go to its constructor)."""
    return MEASURES.get(name).build(**kwargs)


def similarity(x: Tensor, y: Tensor, measure: str = "cka", **kwargs) -> Tensor:
    """Similarity of ``x: (n, d1)`` and ``y: (n, d2)`` under the named measure."""
    return get_measure(measure, **kwargs)(x, y)


def _check_pair(x: Tensor, y: Tensor) -> None:
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise MeasureError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise MeasureError(
            f"expected x: (n, d1) and y: (n, d2) with the same n; got x {tuple(x.shape)} and "
            f"y {tuple(y.shape)}"
        )


def safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den, and 0 where den <= 0 (constant inputs), with finite gradients there. A NaN or
    infinite ``den`` is divided by, so a non-finite input gives a non-finite similarity, never 0."""
    ok = ~(den <= 0)
    return torch.where(ok, num / torch.where(ok, den, 1.0), 0.0)


def safe_sqrt(v: Tensor) -> Tensor:
    """sqrt(v), and 0 where v <= 0, with finite gradients there; a NaN ``v`` stays NaN."""
    ok = ~(v <= 0)
    return torch.where(ok, torch.where(ok, v, 1.0).sqrt(), 0.0)


class Measure:
    """Base class: ``measure(x, y)`` prepares both inputs then calls :meth:`compare`.

    Subclasses set ``min_n`` and implement ``compare(px, py)`` on two :class:`Prepared` inputs.
    """

    name = ""
    min_n = 2

    def prepare(self, x: Tensor) -> Prepared:
        return Prepared(x, self.min_n)

    def compare(self, px: Prepared, py: Prepared) -> Tensor:
        raise NotImplementedError

    def needs_features(self, n: int, d: int, d_other: int) -> bool:
        """Whether :meth:`compare` reads the features of an (n, d) input compared with an
        (n, d_other) one; if not, its Gram is all it needs (see :meth:`Prepared.keep_gram_only`)."""
        return True

    def prepare_guide(
        self, x: Tensor, widths: Sequence[int | None], matmul_dtype: torch.dtype | None = None
    ) -> Prepared:
        """Prepare ``x: (n, d)``, a frozen input (a guide layer; no gradient), once for comparisons
        with inputs of the given ``widths`` (None: not known yet).

        Where no comparison reads its features (:meth:`needs_features`), only its Gram is kept, and
        built by :meth:`Prepared.gram_only` unless :meth:`prepare` is overridden. ``matmul_dtype``
        (e.g. ``torch.bfloat16``) is the dtype of the operands of its products; None keeps its own.
        """
        gram_only = all(w is not None and not self.needs_features(x.shape[0], x.shape[1], w) for w in widths)
        if gram_only and type(self).prepare is Measure.prepare:
            return Prepared.gram_only(x, self.min_n, matmul_dtype)
        p = self.prepare(x)
        if isinstance(p, Prepared):  # not a measure registered as a plain function
            p.matmul_dtype = matmul_dtype or p.matmul_dtype
            if gram_only:
                p.keep_gram_only()
        return p

    def prepare_guide_positions(
        self, x: Tensor, widths: Sequence[int | None], matmul_dtype: torch.dtype | None = None
    ) -> list[Prepared]:
        """:meth:`prepare_guide` of every position of ``x: (n, positions, d)``; where only the
        Grams are needed, all positions' Grams at once (:func:`gram_only_positions`)."""
        n, _, d = x.shape
        gram_only = all(w is not None and not self.needs_features(n, d, w) for w in widths)
        if gram_only and type(self).prepare is Measure.prepare and matmul_dtype in (None, _compute_dtype(x)):
            return gram_only_positions(x, self.min_n)
        return [self.prepare_guide(xi, widths, matmul_dtype) for xi in x.unbind(1)]

    def stacks_guides(self, device: torch.device, matmul_dtype: torch.dtype | None = None) -> bool:
        """Whether :meth:`prepare_guides` stacks Gram-only layers on ``device``: the device path
        (not a CPU's tuned one) and this class's own guide preparation (any ``matmul_dtype``)."""
        return type(self).prepare is Measure.prepare \
            and type(self).prepare_guide is Measure.prepare_guide and not (fused.CPU_TUNED and device.type == "cpu")

    def prepare_guides(
        self, xs: Sequence[Tensor], widths: Sequence[Sequence[int | None]], matmul_dtype: torch.dtype | None = None
    ) -> list[Prepared]:
        """:meth:`prepare_guide` of each ``xs[i]: (n, d)`` with its ``widths[i]``. On the device path
        (not a CPU's tuned one) the Gram-only layers of one shape are prepared as one stack, as the
        positions of one layer are (:func:`gram_only_positions`): each op once for the stack; those
        of one n left over (widths of which there is one layer) as one group (:func:`gram_only_group`)."""
        out: list = [None] * len(xs)
        batches: dict[tuple, list[int]] = {}  # (n, dtype, device) → the layers that can be batched
        for i, x in enumerate(xs):
            if x.dim() == 2 and self.stacks_guides(x.device, matmul_dtype) \
                    and all(w is not None and not self.needs_features(*x.shape, w) for w in widths[i]):
                batches.setdefault((x.shape[0], x.dtype, x.device), []).append(i)
            else:
                out[i] = self.prepare_guide(x, widths[i], matmul_dtype)
        for rows in batches.values():
            shapes: dict[torch.Size, list[int]] = {}
            for i in rows:
                shapes.setdefault(xs[i].shape, []).append(i)
            alone = [i for same in shapes.values() if len(same) == 1 for i in same]
            for same in [same for same in shapes.values() if len(same) > 1]:
                for i, p in zip(same, gram_only_stack(torch.stack([xs[i] for i in same]), self.min_n, matmul_dtype)):
                    out[i] = p
            grouped = gram_only_group([xs[i] for i in alone], self.min_n, matmul_dtype) if len(alone) > 1 else \
                [self.prepare_guide(xs[i], widths[i], matmul_dtype) for i in alone]
            for i, p in zip(alone, grouped):
                out[i] = p
        return out

    def prepare_target(self, x: Tensor, guide: Prepared) -> Prepared:
        """Prepare ``x: (n, d)`` for comparison with ``guide``, made by :meth:`prepare_guide`: in
        float64 if and only if the guide is."""
        if (x.dtype == torch.float64) != (guide.dtype == torch.float64):
            x = x.to(guide.dtype)
        return self.prepare(x)

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        _check_pair(x, y)
        with torch.autocast(device_type=x.device.type, enabled=False):
            px, py = self.prepare(x), self.prepare(y)
            if px.x.dtype != py.x.dtype:
                dtype = torch.promote_types(px.x.dtype, py.x.dtype)
                px, py = self.prepare(x.to(dtype)), self.prepare(y.to(dtype))
            return self.compare(px, py)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class _FunctionMeasure(Measure):
    """A measure given as a plain function of the two (n, d) inputs."""

    function: Callable[[Tensor, Tensor], Tensor]

    def prepare(self, x: Tensor) -> Tensor:
        return x.to(_compute_dtype(x))

    def compare(self, px: Tensor, py: Tensor) -> Tensor:
        return self.function(px, py)

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        _check_pair(x, y)
        with torch.autocast(device_type=x.device.type, enabled=False):
            px, py = self.prepare(x), self.prepare(y)
            dtype = torch.promote_types(px.dtype, py.dtype)
            return self.compare(px.to(dtype), py.to(dtype))

    def __repr__(self) -> str:
        return f"measure {self.name!r} ({self.function.__name__})"


def sq_distances(p: Prepared) -> Tensor:
    """(n, n) squared Euclidean distances between rows, exactly zero on the diagonal."""
    g = p.gram
    sq = g.diagonal()
    d = (sq[:, None] + sq[None, :] - 2 * g).clamp_min(0)
    return d - torch.diag_embed(d.diagonal())


def upper_triangle(m: Tensor) -> Tensor:
    """The entries of ``m: (n, n)`` above the diagonal, row by row: ``(n(n-1)/2,)``."""
    i, j = torch.triu_indices(m.shape[0], m.shape[0], offset=1, device=m.device)
    return m[i, j]
