"""Differentiable similarity measures between two representations of the same examples.

Every measure takes ``x: (n, d1)`` and ``y: (n, d2)`` (rows are the same n examples) and returns a
0-dim tensor. All are computed in float32 at least (float64 stays float64), outside autocast, so
bf16/fp16 activations from mixed-precision training are measured exactly as fp32 ones would be.

Conventions shared by every measure:

* Features are centred by subtracting column means (never with an n×n centring-matrix product).
* Each input is divided by its (detached) largest absolute centred entry before any product. Every
  measure here is invariant to isotropic scaling, so this changes neither the value nor the gradient,
  and it keeps 1e-20- or 1e20-scaled activations from under- or overflowing in float32.
  (:meth:`Prepared.gram_only`, for a frozen guide's layers, centres and rescales the n×n Gram
  instead, and falls back to the above where that could lose precision.)
* A *constant* input (every row identical, to rounding) has no structure to compare: the
  similarity is defined as exactly 0, with zero (finite) gradients. Note this means a layer that has
  collapsed to a constant receives no alignment gradient.
"""

from __future__ import annotations

import difflib
import functools
from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "Measure",
    "Prepared",
    "cka",
    "get_measure",
    "list_measures",
    "register_measure",
    "similarity",
    "sketch",
]

_MEASURES: dict[str, type["Measure"]] = {}


def register_measure(name: str) -> Callable:
    """Decorator: make a :class:`Measure` subclass, or a function ``f(x, y) -> 0-dim tensor``,
    available under ``name``. A function receives both inputs as float32 (or float64), outside
    autocast, after the shape checks."""

    def decorator(obj):
        if name in _MEASURES:
            raise ValueError(f"a similarity measure named {name!r} is already registered")
        cls = obj if isinstance(obj, type) else type(name, (_FunctionMeasure,), {"function": staticmethod(obj)})
        cls.name = name
        _MEASURES[name] = cls
        return obj

    return decorator


def list_measures() -> list[str]:
    """Names accepted by :func:`get_measure`."""
    return sorted(_MEASURES)


def get_measure(name: str, **kwargs) -> "Measure":
    """An instance of the measure registered as ``name`` (kwargs go to its constructor)."""
    if name not in _MEASURES:
        close = difflib.get_close_matches(name, list(_MEASURES), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown similarity measure {name!r}; available: {', '.join(list_measures())}.{hint}"
        )
    return _MEASURES[name](**kwargs)


def similarity(x: Tensor, y: Tensor, measure: str = "cka", **kwargs) -> Tensor:
    """Similarity of ``x: (n, d1)`` and ``y: (n, d2)`` under the named measure."""
    return get_measure(measure, **kwargs)(x, y)


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
        raise ValueError(f"estimator must be 'biased' or 'unbiased', got {estimator!r}")
    if kernel == "linear":
        return get_measure("cka" if estimator == "biased" else "cka_unbiased")(x, y)
    if kernel == "rbf":
        if estimator != "biased":
            raise ValueError("kernel='rbf' is implemented with the biased estimator only")
        return get_measure("cka_rbf", bandwidth=bandwidth)(x, y)
    raise ValueError(f"kernel must be 'linear' or 'rbf', got {kernel!r}")


# --------------------------------------------------------------------------------------------
# Shared preparation


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _abs_max(x: Tensor) -> Tensor:
    """max |x| in one pass without an |x| temporary (``vector_norm(ord=inf)`` is ~30× slower on CPU)."""
    low, high = torch.aminmax(x)
    return torch.maximum(high, -low)


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


def _gram(a: Tensor, dtype: torch.dtype) -> Tensor:
    """``a @ aᵀ`` for ``a: (m, k)`` → ``(m, m)``, with operands cast to ``dtype`` (no gradient then)."""
    if dtype != a.dtype:
        low = a.detach().to(dtype)
        return (low @ low.T).to(a.dtype)
    return _Gram.apply(a) if a.requires_grad else a @ a.T


def sketch(x: Tensor, dim: int, seed: int = 0) -> Tensor:
    """A fixed random projection of ``x: (..., d)`` to ``(..., dim)`` that keeps inner products.

    A CountSketch (Charikar et al. 2002), i.e. a sparse Johnson-Lindenstrauss map: feature j is
    added, with a random sign, to bucket j mod dim. Then ``sketch(x) @ sketch(y).T`` is an unbiased
    estimate of ``x @ y.T``, so every Gram-based measure sees an approximate Gram; its error grows
    with the effective rank of the Gram over ``dim`` (about sqrt(2 / dim) of |x||y| per entry for
    random features, far less for real activations). The interleaved partition costs two passes
    over x (a random one needs a gather, 4× slower here) and measured as accurate as a random one
    on conv and linear activations. O(n·d), where the Gram it shrinks costs O(n²·d); differentiable.
    The signs depend only on (d, seed), so a layer is projected the same way at every step.
    Inputs with ``d <= dim`` are returned as they are.
    """
    d = x.shape[-1]
    if d <= dim:
        return x
    signed = x * _signs(d, seed, x.device).to(x.dtype)
    whole = d // dim * dim
    out = signed[..., :whole].unflatten(-1, (d // dim, dim)).sum(-2)
    if whole < d:
        out[..., : d - whole] += signed[..., whole:]
    return out


@functools.lru_cache(maxsize=128)
def _signs(d: int, seed: int, device: torch.device) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (d,), generator=generator).float() * 2 - 1).to(device)


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
        top = _abs_max(x.detach())
        spread = _abs_max(xc.detach())
        eps = torch.finfo(x.dtype).eps
        self.constant = spread <= 64 * eps * top
        # One in-place multiply rescales to unit spread and zeroes a constant input (spread 0 is
        # constant): two passes over x in all, which matters for 10⁴-wide conv maps.
        inv = torch.where(self.constant, torch.zeros_like(spread), 1 / spread)
        self.x: Tensor | None = xc.mul_(inv)
        #: dtype of the operands of :attr:`gram` and :attr:`cov`; ``torch.bfloat16`` gives products
        #: about 2-3× faster on CPUs with bf16 units (fp32 accumulation, result rounded to bf16).
        self.matmul_dtype = self.x.dtype
        self._gram: Tensor | None = None
        self._cov: Tensor | None = None
        self._norm: Tensor | None = None  # |K|_F, see _norm()

    @property
    def gram(self) -> Tensor:
        """(n, n) linear Gram matrix of the centred features (hence already double-centred)."""
        if self._gram is None:
            self._gram = _gram(self.x, self.matmul_dtype)
        return self._gram

    @property
    def cov(self) -> Tensor:
        """(d, d) feature cross-product of the centred features."""
        if self._cov is None:
            self._cov = _gram(self.x.T, self.matmul_dtype)
        return self._cov

    def keep_gram_only(self) -> None:
        """Build the Gram and drop the (n, d) features, for a measure that needs only the Gram."""
        self.gram
        self.x = None

    @classmethod
    def gram_only(cls, x: Tensor, min_n: int = 2, matmul_dtype: torch.dtype | None = None) -> "Prepared":
        """``Prepared(x)`` after :meth:`keep_gram_only`, without a gradient, built more cheaply.

        The Gram of the raw rows is centred as an n×n matrix (row and column means subtracted: the
        O(n²) Gram centring), which saves the passes that centre and rescale a wide x. It falls back
        to centring x first where that would lose precision, i.e. where the rows' common mean holds
        more than 15/16 of their energy (this includes every constant input), or where the raw
        products could over- or underflow; so the Gram stays within ~1e-6 of the exact one, relative
        to its largest entry. Decides on the host (one sync per call on an accelerator). Also falls
        back for a reduced ``matmul_dtype``, whose rounding the raw mean would magnify.
        """
        _check_input(x, min_n)
        with torch.no_grad():
            x = x.detach().to(_compute_dtype(x))
            n, d = x.shape
            finfo = torch.finfo(x.dtype)
            if matmul_dtype in (None, x.dtype):
                raw = x @ x.T
                rows = raw.mean(dim=1)
                centred = raw - rows[:, None] - rows[None, :] + rows.mean()
                # The row norms bound every partial sum of the product (Cauchy-Schwarz), so none
                # over- or underflowed if the largest is finite, below max/64 and well above tiny.
                norms = raw.diagonal()
                top = norms.amax()
                safe = (top < finfo.max / 64) & (top > finfo.tiny * 1e6 * d)
                if bool(safe & (16 * centred.diagonal().sum() > norms.sum())):
                    p = cls.__new__(cls)
                    p.n, p.d, p.x, p.matmul_dtype, p._cov, p._norm = n, d, None, x.dtype, None, None
                    p.constant = torch.zeros((), dtype=torch.bool, device=x.device)
                    p._gram = centred / centred.diagonal().amax()
                    return p
            p = cls(x, min_n)
            if matmul_dtype is not None:
                p.matmul_dtype = matmul_dtype
            p.keep_gram_only()
            return p


def _check_input(x: Tensor, min_n: int) -> None:
    if x.dim() != 2:
        raise ValueError(
            f"similarity inputs must be 2-D (n, d); got shape {tuple(x.shape)}. "
            "Flatten or pool activations to (n, d) first."
        )
    if x.shape[0] < min_n:
        raise ValueError(f"this measure needs at least {min_n} examples (rows); got n={x.shape[0]}")


def _check_pair(x: Tensor, y: Tensor) -> None:
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"expected x: (n, d1) and y: (n, d2) with the same n; got x {tuple(x.shape)} and "
            f"y {tuple(y.shape)}"
        )


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den, and 0 where den <= 0 (constant inputs), with finite gradients everywhere."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, 1.0), 0.0)


def _safe_sqrt(v: Tensor) -> Tensor:
    ok = v > 0
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


def _use_gram_form(n: int, d1: int, d2: int) -> bool:
    """Whether n×n Grams are cheaper than the d1×d2 cross-product form (multiply-add counts)."""
    gram_cost = n * n * (d1 + d2) + 3 * n * n
    feature_cost = n * d1 * d2 + min(n * n * d1, n * d1 * d1) + min(n * n * d2, n * d2 * d2)
    return gram_cost <= feature_cost


def _gram_form(px: Prepared, py: Prepared) -> bool:
    """Whether to compare through the n×n Grams: the cheaper form, or the only one left when an
    input kept its Gram only (:meth:`Prepared.keep_gram_only`)."""
    return px.x is None or py.x is None or _use_gram_form(px.n, px.d, py.d)


def _self_inner(p: Prepared) -> Tensor:
    """<K, K>_F for K = X Xᵀ, by whichever of the two equal forms is cheaper."""
    if p._gram is not None or p.n <= p.d:
        return (p.gram * p.gram).sum()
    return (p.cov * p.cov).sum()


def _norm(p: Prepared) -> Tensor:
    """|K|_F, kept on ``p``: a guide layer shared by several pairs computes it once."""
    if p._norm is None:
        p._norm = _safe_sqrt(_self_inner(p))
    return p._norm


# --------------------------------------------------------------------------------------------
# Linear CKA


@register_measure("cka")
class LinearCKA(Measure):
    """Linear CKA with the biased HSIC estimator (Kornblith et al. 2019), the paper's choice.

    CKA = <Kc, Lc> / (|Kc| |Lc|) with Kc the centred Gram of x. With centred features this is
    |XᵀY|² / (|XᵀX| |YᵀY|), so the form with the smaller matrices is used.
    """

    def needs_features(self, n: int, d: int, d_other: int) -> bool:
        return not _use_gram_form(n, d, d_other)

    def compare(self, px: Prepared, py: Prepared) -> Tensor:
        if _gram_form(px, py):
            cross = (px.gram * py.gram).sum()
        else:
            cross = (px.x.T @ py.x).square().sum()
        return _safe_div(cross, _norm(px) * _norm(py))


@register_measure("cka_unbiased")
class UnbiasedLinearCKA(Measure):
    """Linear CKA from the unbiased HSIC estimator (Song et al. 2012; Nguyen et al. 2021).

    Written as the inner product of U-centred Grams (Székely & Rizzo 2014), which equals
    n(n-3)·HSIC₁, so the value is bounded by Cauchy-Schwarz. Needs n >= 4.
    """

    min_n = 4

    def needs_features(self, n: int, d: int, d_other: int) -> bool:
        return not _use_gram_form(n, d, d_other)

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
        xx = torch.where(xx > tol * kx, xx, torch.zeros_like(xx))
        yy = torch.where(yy > tol * ky, yy, torch.zeros_like(yy))
        return _safe_div(xy, _safe_sqrt(xx) * _safe_sqrt(yy))


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


# --------------------------------------------------------------------------------------------
# Kernels on Grams: RBF CKA and RSA


def _sq_distances(p: Prepared) -> Tensor:
    """(n, n) squared Euclidean distances between rows, exactly zero on the diagonal."""
    g = p.gram
    sq = g.diagonal()
    d = (sq[:, None] + sq[None, :] - 2 * g).clamp_min(0)
    return d - torch.diag_embed(d.diagonal())


def _upper(m: Tensor) -> Tensor:
    i, j = torch.triu_indices(m.shape[0], m.shape[0], offset=1, device=m.device)
    return m[i, j]


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
            raise ValueError(f"bandwidth must be positive, got {bandwidth}")
        self.bandwidth = bandwidth

    def needs_features(self, n: int, d: int, d_other: int) -> bool:
        return False

    def _centred_kernel(self, p: Prepared) -> Tensor:
        d = _sq_distances(p)
        med = _upper(d).median()
        sigma2 = self.bandwidth**2 * torch.where(med > 0, med, torch.ones_like(med))
        return _double_centre(torch.exp(-d / (2 * sigma2)))

    def compare(self, px: Prepared, py: Prepared) -> Tensor:
        kx, ky = self._centred_kernel(px), self._centred_kernel(py)
        num = (kx * ky).sum()
        den = _safe_sqrt((kx * kx).sum()) * _safe_sqrt((ky * ky).sum())
        # A constant input has all-zero distances: its centred kernel vanishes to rounding only.
        value = _safe_div(num, den)
        return torch.where(px.constant | py.constant, torch.zeros_like(value), value)

    def __repr__(self) -> str:
        return f"RbfCKA(bandwidth={self.bandwidth})"


@register_measure("rsa")
class RSA(Measure):
    """Pearson correlation of the two RDMs' upper triangles; RDM = squared Euclidean distances."""

    min_n = 3

    def needs_features(self, n: int, d: int, d_other: int) -> bool:
        return False

    def compare(self, px: Prepared, py: Prepared) -> Tensor:
        a = _upper(_sq_distances(px))
        b = _upper(_sq_distances(py))
        a = a - a.mean()
        b = b - b.mean()
        return _safe_div((a * b).sum(), _safe_sqrt((a * a).sum()) * _safe_sqrt((b * b).sum()))


# --------------------------------------------------------------------------------------------
# Orthogonal Procrustes


def _narrow(p: Prepared) -> Tensor:
    """An (n, n) matrix with the same Gram as the centred p.x, for inputs wider than they are tall.

    The singular values of XᵀY depend on x and y only through their Grams, so a 65k-wide layer
    costs a QR of (d, n) instead of a d1×d2 product. With Q an orthonormal basis of X's row space,
    X = (XQ)Qᵀ; Q is detached because the gradient of the nuclear norm only involves singular
    vectors that already lie in that space, so it is exact, and QR's own gradient (undefined for
    the rank-deficient inputs that centring always produces) is never needed.
    """
    if p.d <= p.n:
        return p.x
    basis = torch.linalg.qr(p.x.detach().T, mode="reduced").Q
    return p.x @ basis


@register_measure("procrustes")
class Procrustes(Measure):
    """1 − d²/2, d the orthogonal Procrustes distance of the centred, unit-Frobenius inputs.

    Equals the nuclear norm ‖XnᵀYn‖_* in [0, 1].
    """

    def compare(self, px: Prepared, py: Prepared) -> Tensor:
        a, b = _narrow(px), _narrow(py)
        nx = _safe_sqrt(a.square().sum())
        ny = _safe_sqrt(b.square().sum())
        nuclear = torch.linalg.svdvals(a.T @ b).sum()
        return _safe_div(nuclear, nx * ny)
