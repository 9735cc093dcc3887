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
from repguide.similarity.fused import symmetric_gram, unit_centred_gram, unit_centred_grams

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


# --------------------------------------------------------------------------------------------
# Shared preparation


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _Gram(torch.autograd.Function):
    """``a @ aᵀ`` whose backward is one product, ``(G + Gᵀ) a``, where autograd would do two."""

    @staticmethod
    def forward(ctx, a: Tensor) -> Tensor:
        ctx.save_for_backward(a)
        return a @ a.T

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (a,) = ctx.saved_tensors
        return (grad + grad.T) @ a


def gram_matrix(a: Tensor, dtype: torch.dtype) -> Tensor:
    """``a @ aᵀ`` for ``a: (m, k)`` → ``(m, m)``, with operands cast to ``dtype`` (no gradient then)."""
    if dtype != a.dtype:
        low = a.detach().to(dtype)
        return (low @ low.T).to(a.dtype)
    return _Gram.apply(a) if a.requires_grad else a @ a.T


class Prepared:
    """One input, centred and rescaled once, with its products computed lazily and cached.

    Guidance prepares each guide layer once per step and reuses it for every pair that names it,
    so the guide-side Gram matrix is built once whatever the number of pairs.
    """

    def __init__(self, x: Tensor, min_n: int = 2):
        _check_input(x, min_n)
        x = x.to(_compute_dtype(x))
        self.n, self.d = x.shape
        xc = x - x.mean(dim=0, keepdim=True)
        # Scale-free constant test: rounding in the mean leaves residuals of a few ulps of |x|.
        top = fused.abs_max(x.detach())
        spread = fused.abs_max(xc.detach())
        eps = torch.finfo(x.dtype).eps
        self.constant = spread <= fused.CONSTANT_ULPS * eps * top
        # One in-place multiply rescales to unit spread and zeroes a constant input (spread 0 is
        # constant): two passes over x in all, which matters for 10⁴-wide conv maps.
        inv = torch.where(self.constant, torch.zeros_like(spread), 1 / spread)
        self.x: Tensor | None = xc.mul_(inv)
        #: the largest |centred entry|: the centred input is ``x * spread`` (for sums of Grams
        #: across batches, which one CKA value's scale invariance does not cover).
        self.spread = spread
        #: dtype of the operands of :attr:`gram` and :attr:`cov`; ``torch.bfloat16`` gives faster
        #: products on CPUs with bf16 units (fp32 accumulation, result rounded to bf16).
        self.matmul_dtype = self.x.dtype
        self._gram: Tensor | None = None
        self._cov: Tensor | None = None
        self._norm: Tensor | None = None  # |K|_F, see kernel_alignment.gram_norm()

    @property
    def gram(self) -> Tensor:
        """(n, n) linear Gram matrix of the centred features (hence already double-centred)."""
        if self._gram is None:
            self._gram = gram_matrix(self.x, self.matmul_dtype)
        return self._gram

    @property
    def cov(self) -> Tensor:
        """(d, d) feature cross-product of the centred features."""
        if self._cov is None:
            self._cov = gram_matrix(self.x.T, self.matmul_dtype)
        return self._cov

    @property
    def dtype(self) -> torch.dtype:
        """The dtype it is compared in: float64, or float32 for every other input."""
        return (self.x if self.x is not None else self.gram).dtype

    def keep_gram_only(self) -> None:
        """Build the Gram and drop the (n, d) features, for a measure that needs only the Gram."""
        self.gram
        self.x = None

    @classmethod
    def gram_only(cls, x: Tensor, min_n: int = 2, matmul_dtype: torch.dtype | None = None) -> "Prepared":
        """``Prepared(x)`` after :meth:`keep_gram_only`, without a gradient, built more cheaply;
        its Gram is centred and divided by its Frobenius norm.

        The Gram is :func:`~repguide.similarity.fused.unit_centred_gram`'s, which reads no value on
        the host (no sync on an accelerator): x centred twice (exact to a few ulps of x − x̄
        however large x̄) and divided by its largest |entry|. A constant input (every centred
        entry within 64 ulps of the largest |entry|, which is what :class:`Prepared` tests) gives
        a zero Gram.
        On a CPU, where a host read costs nothing, the raw Gram of x centred as a matrix is taken
        instead wherever a host-side check finds it precise (:func:`_raw_centred_gram`): no pass
        over x besides the product (:data:`~repguide.similarity.fused.CPU_TUNED` turns that off).
        A reduced ``matmul_dtype`` always takes the device path, whose operands are centred before
        they are rounded (the rounding of uncentred ones would be magnified).
        """
        _check_input(x, min_n)
        with torch.no_grad():
            x = (x.detach() if x.requires_grad else x).to(_compute_dtype(x))
            exact = matmul_dtype in (None, x.dtype)
            unit = _raw_centred_gram(x) if exact and fused.CPU_TUNED and x.device.type == "cpu" else None
            if unit is not None:
                constant = torch.zeros((), dtype=torch.bool)
            else:
                unit, constant = unit_centred_gram(x, None if exact else matmul_dtype)
            return cls._of_unit_gram(unit, constant, x.shape[1])

    @classmethod
    def _of_unit_gram(cls, unit: Tensor, constant: Tensor, d: int) -> "Prepared":
        """A gram-only input of ``d`` features whose centred Gram, divided by its norm, is ``unit``."""
        p = cls.__new__(cls)
        p.n, p.d = unit.shape[0], d
        p.x, p.matmul_dtype, p._cov, p._norm = None, unit.dtype, None, None
        p._gram = p._unit = unit
        p.constant = constant
        return p


def gram_only_positions(x: Tensor, min_n: int = 2) -> list[Prepared]:
    """:meth:`Prepared.gram_only` of every position of ``x: (n, positions, d)`` (a per-position
    guide layer), the Grams of all positions made by one set of batched ops on the device path
    (:func:`gram_only_stack`); on a CPU with :data:`~repguide.similarity.fused.CPU_TUNED`, position
    by position on the raw-Gram path."""
    if fused.CPU_TUNED and x.device.type == "cpu":
        return [Prepared.gram_only(xi, min_n) for xi in x.unbind(1)]
    return gram_only_stack(x.transpose(0, 1), min_n)


def gram_only_stack(x: Tensor, min_n: int = 2) -> list[Prepared]:
    """:meth:`Prepared.gram_only` (its device path) of each ``x[i]: (n, d)`` of ``x: (m, n, d)``, by
    one set of batched ops (:func:`~repguide.similarity.fused.unit_centred_grams`)."""
    if x.shape[-2] < min_n:
        _check_input(x[0], min_n)
    with torch.no_grad():
        x = (x.detach() if x.requires_grad else x).to(_compute_dtype(x))
        units, constant = unit_centred_grams(x)
    return [Prepared._of_unit_gram(u, c, x.shape[2]) for u, c in zip(units.unbind(0), constant.unbind(0))]


def _raw_centred_gram(x: Tensor) -> Tensor | None:
    """The centred Gram of ``x: (n, d)`` from its raw Gram, divided by its Frobenius norm; None
    where that loses precision, decided on the host (one sync): where the rows' common mean holds
    more than 15/16 of their energy (every constant input included), the raw products could over-
    or underflow, or x is not finite. Within ~2e-6 of centring x first, relative to the largest
    entry (benchmarks/README.md, log #8)."""
    finfo = torch.finfo(x.dtype)
    raw = symmetric_gram(x)  # on a CPU, in row blocks for large products (log #36, #48)
    rows = raw.mean(dim=1)
    centred = raw - rows[:, None] - rows[None, :] + rows.mean()
    # The row norms bound every partial sum of the product (Cauchy-Schwarz), so none over- or
    # underflowed if the largest is finite, below max/64 and well above tiny.
    norms = raw.diagonal()
    top = norms.amax()
    safe = (top < finfo.max / 64) & (top > finfo.tiny * 1e6 * x.shape[1])
    if not bool(safe & (16 * centred.diagonal().sum() > norms.sum())):
        return None
    return centred.div_(torch.linalg.vector_norm(centred))


def _check_input(x: Tensor, min_n: int) -> None:
    if x.dim() != 2:
        raise MeasureError(
            f"similarity inputs must be 2-D (n, d); got shape {tuple(x.shape)}. "
            "Flatten or pool activations to (n, d) first."
        )
    if x.shape[0] < min_n:
        raise MeasureError(f"this measure needs at least {min_n} examples (rows); got n={x.shape[0]}")


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
        (not a CPU's tuned one), exact products, and this class's own guide preparation."""
        return matmul_dtype is None and type(self).prepare is Measure.prepare \
            and type(self).prepare_guide is Measure.prepare_guide and not (fused.CPU_TUNED and device.type == "cpu")

    def prepare_guides(
        self, xs: Sequence[Tensor], widths: Sequence[Sequence[int | None]], matmul_dtype: torch.dtype | None = None
    ) -> list[Prepared]:
        """:meth:`prepare_guide` of each ``xs[i]: (n, d)`` with its ``widths[i]``. On the device path
        (not a CPU's tuned one) the Gram-only layers of one shape are prepared as one stack, as the
        positions of one layer are (:func:`gram_only_positions`): each op once for the stack."""
        out: list = [None] * len(xs)
        stacks: dict[tuple, list[int]] = {}
        for i, x in enumerate(xs):
            if x.dim() == 2 and self.stacks_guides(x.device, matmul_dtype) \
                    and all(w is not None and not self.needs_features(*x.shape, w) for w in widths[i]):
                stacks.setdefault((x.shape, x.dtype, x.device), []).append(i)
            else:
                out[i] = self.prepare_guide(x, widths[i], matmul_dtype)
        for rows in stacks.values():
            stacked = gram_only_stack(torch.stack([xs[i] for i in rows]), self.min_n) if len(rows) > 1 else None
            for k, i in enumerate(rows):
                out[i] = stacked[k] if stacked else self.prepare_guide(xs[i], widths[i], matmul_dtype)
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
