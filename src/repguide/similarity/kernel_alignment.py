"""Centered kernel alignment: linear CKA with the biased (the paper's) and the unbiased HSIC
estimator, RBF CKA, and the minibatch accumulator that sums HSIC₁ over batches for a data set.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from repguide.errors import MeasureError
import torch
from torch import Tensor

from repguide.similarity.base import (
    Measure,
    Prepared,
    get_measure,
    register_measure,
    safe_div,
    safe_sqrt,
    sq_distances,
    upper_triangle,
)
from repguide.similarity.minibatch_grams import centred_gram

__all__ = ["LinearCKA", "MinibatchCKA", "RbfCKA", "UnbiasedLinearCKA", "cka", "gram_norm", "use_gram_form"]


def cka(
    x: Tensor,
    y: Tensor,
    estimator: str = "biased",
    kernel: str = "linear",
    bandwidth: float = 1.0,
) -> Tensor:
    """Centered kernel alignment of ``x: (n, d1)`` and ``y: (n, d2)``.

    ``estimator="biased"`` is the paper's (Kornblith et al. 2019); ``"unbiased"`` uses the unbiased
    HSIC of Song et al. 2012 (the minibatch CKA of Nguyen et al. 2021) and needs n >= 4.
    ``kernel="rbf"`` uses a Gaussian kernel with sigma = bandwidth * sqrt(median squared distance).
    """
    if estimator not in ("biased", "unbiased"):
        raise MeasureError(f"estimator must be 'biased' or 'unbiased', got {estimator!r}")
    if kernel == "linear":
        return get_measure("cka" if estimator == "biased" else "cka_unbiased")(x, y)
    if kernel == "rbf":
        if estimator != "biased":
            raise MeasureError("kernel='rbf' is implemented with the biased estimator only")
        return get_measure("cka_rbf", bandwidth=bandwidth)(x, y)
    raise MeasureError(f"kernel must be 'linear' or 'rbf', got {kernel!r}")


def use_gram_form(n: int, d1: int, d2: int) -> bool:
    """Whether n×n Grams are cheaper than the d1×d2 cross-product form (multiply-add counts)."""
    gram_cost = n * n * (d1 + d2) + 3 * n * n
    feature_cost = n * d1 * d2 + min(n * n * d1, n * d1 * d1) + min(n * n * d2, n * d2 * d2)
    return gram_cost <= feature_cost


def _gram_form(px: Prepared, py: Prepared) -> bool:
    """Whether to compare through the n×n Grams: the cheaper form, or the only one left when an
    input kept its Gram only (:meth:`Prepared.keep_gram_only`)."""
    return px.x is None or py.x is None or use_gram_form(px.n, px.d, py.d)


def _self_inner(p: Prepared) -> Tensor:
    """<K, K>_F for K = X Xᵀ, by whichever of the two equal forms is cheaper."""
    if p._gram is not None or p.n <= p.d:
        return (p.gram * p.gram).sum()
    return (p.cov * p.cov).sum()


def gram_norm(p: Prepared) -> Tensor:
    """|K|_F, kept on ``p``: a guide layer shared by several pairs computes it once."""
    if p._norm is None:
        p._norm = safe_sqrt(_self_inner(p))
    return p._norm


@register_measure("cka")
class LinearCKA(Measure):
    """Linear CKA with the biased HSIC estimator (Kornblith et al. 2019), the paper's choice.

    CKA = <Kc, Lc> / (|Kc| |Lc|) with Kc the centred Gram of x. With centred features this is
    |XᵀY|² / (|XᵀX| |YᵀY|), so the form with the smaller matrices is used.
    """

    def needs_features(self, n: int, d: int, d_other: int) -> bool:
        return not use_gram_form(n, d, d_other)

    def compare(self, px: Prepared, py: Prepared) -> Tensor:
        if _gram_form(px, py):
            cross = (px.gram * py.gram).sum()
        else:
            cross = (px.x.T @ py.x).square().sum()
        return safe_div(cross, gram_norm(px) * gram_norm(py))


@register_measure("cka_unbiased")
class UnbiasedLinearCKA(Measure):
    """Linear CKA from the unbiased HSIC estimator (Song et al. 2012; Nguyen et al. 2021).

    Written as the inner product of U-centred Grams (Székely & Rizzo 2014), which equals
    n(n-3)·HSIC₁, so the value is bounded by Cauchy-Schwarz. Needs n >= 4.
    """

    min_n = 4

    def needs_features(self, n: int, d: int, d_other: int) -> bool:
        return not use_gram_form(n, d, d_other)

    def compare(self, px: Prepared, py: Prepared) -> Tensor:
        n = px.n
        kx, ky = _self_inner(px), _self_inner(py)
        if _gram_form(px, py):
            xy = _u_inner(px.gram, py.gram)
            xx, yy = _u_inner(px.gram, px.gram), _u_inner(py.gram, py.gram)
        else:
            sx, sy = _FeatureSums(px), _FeatureSums(py)
            xy = sx.u_inner(sy, (px.x.T @ py.x).square().sum())
            xx, yy = sx.u_inner(sx, kx), sy.u_inner(sy, ky)
        # A self-term that is rounding noise next to ‖K‖² (e.g. all rows but one identical, where
        # it is exactly 0) is treated as 0, so the value is 0 instead of noise with huge gradients.
        tol = 16 * n * torch.finfo(kx.dtype).eps
        # (A NaN self-term is kept: a non-finite input must give a non-finite value.)
        xx = torch.where(xx <= tol * kx, torch.zeros_like(xx), xx)
        yy = torch.where(yy <= tol * ky, torch.zeros_like(yy), yy)
        return safe_div(xy, safe_sqrt(xx) * safe_sqrt(yy))


def _u_inner(k: Tensor, l: Tensor) -> Tensor:
    """n(n-3)·HSIC₁(K, L) from two (n, n) Grams: tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1/((n-1)(n-2)) - 2/(n-2)·1ᵀK̃L̃1."""
    n = k.shape[0]
    kt = k - torch.diag_embed(k.diagonal())
    lt = l - torch.diag_embed(l.diagonal())
    rk, rl = kt.sum(dim=1), lt.sum(dim=1)
    return (kt * lt).sum() + rk.sum() * rl.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (rk @ rl)


class _FeatureSums:
    """The O(n·d) quantities HSIC₁ needs besides ‖XᵀY‖², for the feature (d1×d2) form."""

    def __init__(self, p: Prepared):
        self.n = p.n
        self.diag = p.x.square().sum(dim=1)  # K_ii
        # Row sums of K̃ = X (Xᵀ1) - K_ii; with centred features Xᵀ1 = 0, but keep it exact.
        self.rows = p.x @ p.x.sum(dim=0) - self.diag
        self.total = self.rows.sum()

    def u_inner(self, other: "_FeatureSums", cross: Tensor) -> Tensor:
        n = self.n
        trace = cross - (self.diag * other.diag).sum()
        return (
            trace
            + self.total * other.total / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * (self.rows @ other.rows)
        )


def _centred_gram(x: Tensor, dtype: torch.dtype, gram_dtype: torch.dtype | None = None) -> Tensor:
    """(n, n) Gram matrix of the column-centred ``x: (n, d)``, returned in ``dtype``; zeros for a
    constant x.

    Centring and product run in ``gram_dtype``: by default the features' own precision (float32 for
    float32, bfloat16 or float16 activations, float64 for float64 ones), never wider than ``dtype``.
    Centring in float32 loses nothing that matters: an entry near the column mean is subtracted
    exactly (Sterbenz), and the mean's own rounding shifts every row alike, which HSIC₁ ignores.
    So a float32 product, half the cost of a float64 one, stays within ~1e-7 of a float64
    reference on float32 activations, nearly constant deep layers included (tests/test_analysis.py).

    :func:`~repguide.similarity.minibatch_grams.centred_gram` centres x and takes the symmetric
    product without :class:`Prepared`'s rescale, deciding from the Gram's diagonal whether the
    product was safe from over- and underflow (else it is redone through Prepared, which rescales)
    and, as Prepared does, what counts as constant, so a constant layer scores 0 here exactly as in
    every measure.
    """
    if gram_dtype is None:
        gram_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if torch.finfo(gram_dtype).bits > torch.finfo(dtype).bits:
        gram_dtype = dtype
    if x.shape[0] < 4:
        raise MeasureError(f"this measure needs at least 4 examples (rows); got n={x.shape[0]}")
    return centred_gram(x.reshape(x.shape[0], -1), dtype, gram_dtype)


def _u_centred(grams: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """The U-centred ``grams[i]: (n, n)`` (Székely & Rizzo 2014), as rows of a ``(len(grams), n²)``
    stack in ``dtype``: ``<U(K), U(L)>_F`` is :func:`_u_inner` ``(K, L)``, so the stacks of two
    models give every layer pair's HSIC₁ in one matrix product instead of one ``_u_inner`` per pair.

    U(K) = K̃ - r1ᵀ - 1rᵀ + c11ᵀ off the diagonal (K̃: K with a zero diagonal, r its row sums / (n-2),
    c its sum / ((n-1)(n-2))), 0 on it; the rank-2 correction is one batched product over all layers,
    ``-(r - c/2)1ᵀ - 1(r - c/2)ᵀ``.
    """
    n = grams[0].shape[0]
    u = torch.empty(len(grams), n, n, dtype=dtype, device=grams[0].device)
    for out, k in zip(u, grams):
        out.copy_(k)
    u.diagonal(dim1=1, dim2=2).zero_()
    rows = u.sum(dim=2) / (n - 2)
    shift = rows - rows.sum(dim=1, keepdim=True) / (2 * (n - 1))  # r - c/2
    ones = torch.ones_like(shift)
    u.baddbmm_(torch.stack([shift, ones], dim=2), torch.stack([ones, shift], dim=1), alpha=-1)
    u.diagonal(dim1=1, dim2=2).zero_()
    return u.flatten(1)


class MinibatchCKA:
    """Linear CKA of every (layer of A, layer of B) pair over a data set, from minibatches.

    Nguyen, Raghu & Kornblith (2021): the unbiased HSIC₁ of Song et al. (2012) is summed over
    minibatches for every pair and every layer with itself, and only then
    CKA = mean HSIC₁(K, L) / sqrt(mean HSIC₁(K, K) · mean HSIC₁(L, L)). Each batch's HSIC₁ is an
    unbiased estimate, so the result approaches the data-set value however small the batches,
    unlike a mean of per-batch CKA values. With one batch it equals ``cka_unbiased``.
    A layer that is constant in every batch scores 0 against everything.
    """

    def __init__(
        self, num_a: int, num_b: int, dtype: torch.dtype = torch.float64, gram_dtype: torch.dtype | None = None
    ):
        # dtype: centring, HSIC terms and their sums; gram_dtype: the Gram products (see _centred_gram).
        self.shape, self.dtype, self.gram_dtype = (num_a, num_b), dtype, gram_dtype
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
            raise MeasureError(f"expected {self.shape} layers, got ({len(features_a)}, {len(features_b)})")
        sizes = {x.shape[0] for x in itertools.chain(features_a, features_b)}
        if len(sizes) != 1:
            raise MeasureError(f"every layer must hold the same examples; got batch sizes {sorted(sizes)}")
        n = sizes.pop()
        if n < 4:
            raise MeasureError(
                f"a minibatch needs at least 4 examples for the unbiased HSIC, got {n}; "
                "drop the last, short batch (DataLoader(drop_last=True)) or use larger batches"
            )
        device = features_a[0].device
        scale = n * (n - 3)  # <U(K), U(L)> is n(n-3)·HSIC₁

        def centred(features: Sequence[Tensor]) -> Tensor:  # (layers, n²)
            return _u_centred([_centred_gram(x.to(device), self.dtype, self.gram_dtype) for x in features], self.dtype)

        u_a = centred(features_a)
        u_b = u_a if features_b is features_a else centred(features_b)
        xy = u_a @ u_b.T / scale
        xx = torch.linalg.vecdot(u_a, u_a) / scale
        yy = xx if u_b is u_a else torch.linalg.vecdot(u_b, u_b) / scale
        if self.xy is None:
            self.xy, self.xx, self.yy = xy, xx, yy
        else:
            self.xy, self.xx, self.yy = self.xy + xy, self.xx + xx, self.yy + yy
        self.batches += 1
        self.examples += n

    def compute(self) -> Tensor:
        """The ``(num_a, num_b)`` CKA matrix (the mean over batches cancels in the ratio)."""
        if self.xy is None:
            raise MeasureError("no minibatch was added; the data gave no batches")
        return safe_div(self.xy, safe_sqrt(self.xx)[:, None] * safe_sqrt(self.yy)[None, :])


def _double_centre(k: Tensor) -> Tensor:
    """H K H in O(n²): subtract row and column means, add back the grand mean."""
    return k - k.mean(dim=0, keepdim=True) - k.mean(dim=1, keepdim=True) + k.mean()


@register_measure("cka_rbf")
class RbfCKA(Measure):
    """CKA with Gaussian kernels, sigma² = bandwidth² · median off-diagonal squared distance.

    The median is the lower middle value for an even count (torch.median); it is not detached,
    so gradients are exact almost everywhere.
    """

    def __init__(self, bandwidth: float = 1.0):
        if not bandwidth > 0:
            raise MeasureError(f"bandwidth must be positive, got {bandwidth}")
        self.bandwidth = bandwidth

    def needs_features(self, n: int, d: int, d_other: int) -> bool:
        return False

    def _centred_kernel(self, p: Prepared) -> Tensor:
        d = sq_distances(p)
        med = upper_triangle(d).median()
        sigma2 = self.bandwidth**2 * torch.where(med > 0, med, torch.ones_like(med))
        return _double_centre(torch.exp(-d / (2 * sigma2)))

    def compare(self, px: Prepared, py: Prepared) -> Tensor:
        kx, ky = self._centred_kernel(px), self._centred_kernel(py)
        num = (kx * ky).sum()
        den = safe_sqrt((kx * kx).sum()) * safe_sqrt((ky * ky).sum())
        # A constant input has all-zero distances: its centred kernel vanishes to rounding only.
        value = safe_div(num, den)
        return torch.where(px.constant | py.constant, torch.zeros_like(value), value)

    def __repr__(self) -> str:
        return f"RbfCKA(bandwidth={self.bandwidth})"
