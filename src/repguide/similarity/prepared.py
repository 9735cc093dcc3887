"""One similarity input prepared once: :class:`Prepared` (centred and rescaled, its products made
lazily and cached), and the builders of gram-only guide inputs, one layer at a time or a batch of
layers by one set of ops (:func:`gram_only_stack` for layers of one shape, :func:`gram_only_group`
for layers of one n whose widths differ, :func:`gram_only_positions` for the positions of one layer).
"""

from __future__ import annotations

import torch
from torch import Tensor

from repguide.errors import MeasureError

from repguide.similarity import fused
from repguide.similarity.fused import symmetric_gram, unit_centred_gram, unit_centred_gram_list, unit_centred_grams

__all__ = ["Prepared", "gram_matrix", "gram_only_group", "gram_only_positions", "gram_only_stack"]


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

    @property
    def constant(self) -> Tensor:
        """0-dim bool: whether the input is constant (its Gram then zeros)."""
        c = self._constant
        if isinstance(c, tuple):  # (flags of a stack, index): indexed when read, not every step
            c = self._constant = c[0][c[1]]
        return c

    @constant.setter
    def constant(self, value: Tensor | tuple[Tensor, int]) -> None:
        self._constant = value

    @classmethod
    def _of_unit_gram(cls, unit: Tensor, constant: Tensor | tuple[Tensor, int], d: int) -> "Prepared":
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


def gram_only_stack(x: Tensor, min_n: int = 2, matmul_dtype: torch.dtype | None = None) -> list[Prepared]:
    """:meth:`Prepared.gram_only` (its device path) of each ``x[i]: (n, d)`` of ``x: (m, n, d)``, by
    one set of batched ops (:func:`~repguide.similarity.fused.unit_centred_grams`)."""
    if x.shape[-2] < min_n:
        _check_input(x[0], min_n)
    with torch.no_grad():
        x = (x.detach() if x.requires_grad else x).to(_compute_dtype(x))
        units, constant = unit_centred_grams(x, matmul_dtype)
    return [Prepared._of_unit_gram(u, (constant, i), x.shape[2]) for i, u in enumerate(units.unbind(0))]


def gram_only_group(xs: list[Tensor], min_n: int = 2, matmul_dtype: torch.dtype | None = None) -> list[Prepared]:
    """:meth:`Prepared.gram_only` (its device path) of layers ``(n, d_i)`` of one n, dtype and
    device whose widths differ, by one set of ops for all of them where an op can take them all
    (:func:`~repguide.similarity.fused.unit_centred_gram_list`): 4 ops a layer and 13 for the group,
    where each alone takes 14."""
    _check_input(xs[0], min_n)
    with torch.no_grad():
        xs = [(x.detach() if x.requires_grad else x).to(_compute_dtype(x)) for x in xs]
        units, constant = unit_centred_gram_list(xs, matmul_dtype)
    return [Prepared._of_unit_gram(u, (constant, i), x.shape[1]) for i, (u, x) in enumerate(zip(units.unbind(0), xs))]


def _raw_centred_gram(x: Tensor) -> Tensor | None:
    """The centred Gram of ``x: (n, d)`` from its raw Gram, divided by its Frobenius norm; None
    where that loses precision, decided on the host (one sync): where the rows' common mean holds
    more than 15/16 of their energy (every constant input included), the raw products could over-
    or underflow, or x is not finite. Within ~2e-6 of centring x first, relative to the largest
    entry (benchmarks/README.md, log #8). Where 16 spread rows already show the mean holding more
    than that, a large raw product (≥ 2²⁵ multiply-adds; ~25 µs of small ops buy nothing below) is
    not made at all (a deep layer of a randomly initialised net is often such a layer, and its Gram
    would be made twice, log #65)."""
    finfo = torch.finfo(x.dtype)
    n, d = x.shape
    if n >= 4 * SAMPLE_ROWS and n * n * d >= fused.MIN_BLOCKED_MACS \
            and _mean_energy_fraction(x[:: n // SAMPLE_ROWS][:SAMPLE_ROWS]) > 15 / 16:
        return None
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


#: Rows that :func:`_raw_centred_gram` estimates the mean's share of the energy from.
SAMPLE_ROWS = 16


def _mean_energy_fraction(rows: Tensor) -> float:
    """An estimate of n‖x̄‖² / Σ‖x_i‖² from k rows of x (‖x̄‖² unbiased: the rows' spread taken
    out of their mean's energy); NaN for a non-finite or all-zero input. One host read."""
    k = rows.shape[0]
    energy = rows.square().sum() / k
    mean = rows.mean(dim=0)
    return float((k * mean.dot(mean) - energy) / ((k - 1) * energy))


def _check_input(x: Tensor, min_n: int) -> None:
    if x.dim() != 2:
        raise MeasureError(
            f"similarity inputs must be 2-D (n, d); got shape {tuple(x.shape)}. "
            "Flatten or pool activations to (n, d) first."
        )
    if x.shape[0] < min_n:
        raise MeasureError(f"this measure needs at least {min_n} examples (rows); got n={x.shape[0]}")
