"""Linear CKA in the Gram form with few ops and no host sync: what a guided step runs per pair.

Two halves, each a handful of aten ops (on a GPU, a handful of kernel launches):

* :func:`unit_centred_gram` turns a frozen (guide) activation into its centred Gram divided by its
  Frobenius norm, decided entirely on the device (no fallback branch that reads a value);
* :func:`linear_cka_stack` compares a stack of target activations ``(m, n, d)`` with a stack of such
  unit Grams ``(m, n, n)`` in one autograd node: forward centre + rescale + ``bmm`` Gram + inner
  products; backward one ``bmm``. Pairs of equal shape are batched through it.

CKA = <K, L̂> / |K| with K the centred Gram of the rescaled target and L̂ = L / |L|.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["linear_cka_stack", "unit_centred_gram", "unit_centred_grams", "unit_gram"]

# An input whose every centred entry is within this many ulps of its largest |entry| is constant
# (what Prepared decides; rounding in a mean leaves residuals of a few ulps).
_CONSTANT_ULPS = 64


def unit_centred_gram(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(L̂, constant)`` for ``x: (n, d)`` (no gradient): L̂ = HLH / |HLH|_F with L the Gram of x,
    zeros for a constant x, NaN wherever x is not finite. Never reads a value on the host.

    The rows are first shifted by the batch's first row and scaled by x's range, one pass:
    y = (x − x₀) / (max x − min x). The centred Gram is invariant to the shift, |y| ≤ 1 rules out
    over- and underflow, and every row of y is within twice the largest deviation from the mean
    (|xᵢ − x₀| ≤ |xᵢ − x̄| + |x₀ − x̄|), so centring the n×n Gram of y loses at most a few ulps
    relative to its largest entry: the precision of centring x itself, without the pass that
    computes the column means first. A constant x gives y = 0 exactly (identical rows).
    """
    n, d = x.shape
    lo, hi = torch.aminmax(x)
    y = (x - x[:1]).div_(hi - lo + torch.finfo(x.dtype).tiny)
    raw = y @ y.T
    rows = raw.mean(dim=1)
    u = torch.sub(rows, rows.mean(), alpha=0.5)  # HLH = L − u1ᵀ − 1uᵀ with u = rows − mean/2
    centred = raw - u - u[:, None]
    norm = torch.linalg.vector_norm(centred)
    # Every centred |entry| below 64 ulps gives |HLH|_F ≤ n·d·(64 ulps)²: treated as constant.
    constant = norm <= n * d * (_CONSTANT_ULPS * torch.finfo(x.dtype).eps) ** 2
    return (centred / norm).masked_fill_(constant, 0), constant


def unit_centred_grams(x: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`unit_centred_gram` of each ``x[i]: (n, d)`` of a stack ``x: (m, n, d)``, in one set of
    batched ops (the positions of a per-position guide layer): ``(L̂: (m, n, n), constant: (m,))``."""
    m, n, d = x.shape
    lo, hi = torch.aminmax(x.reshape(m, -1), dim=1)
    y = (x - x[:, :1]).div_((hi - lo + torch.finfo(x.dtype).tiny)[:, None, None])
    raw = torch.bmm(y, y.transpose(1, 2))
    rows = raw.mean(dim=2)
    u = torch.sub(rows, rows.mean(dim=1, keepdim=True), alpha=0.5)
    centred = raw - u[:, None, :] - u[:, :, None]
    norm = torch.linalg.vector_norm(centred, dim=(1, 2))
    constant = norm <= n * d * (_CONSTANT_ULPS * torch.finfo(x.dtype).eps) ** 2
    return (centred / norm[:, None, None]).masked_fill_(constant[:, None, None], 0), constant


def unit_gram(p) -> Tensor:
    """L̂ of a :class:`~repguide.similarity.base.Prepared` input, computed once and kept on it."""
    unit = getattr(p, "_unit", None)
    if unit is None:
        g = p.gram
        norm = torch.linalg.vector_norm(g)
        unit = p._unit = (g / norm).masked_fill_(norm == 0, 0)
    return unit


class _LinearCKAStack(torch.autograd.Function):
    """CKA of ``x[i]: (n, d)`` against unit centred Grams ``l[i]: (n, n)``, for i < m, one node."""

    @staticmethod
    def forward(ctx, x: Tensor, l: Tensor) -> Tensor:
        m = x.shape[0]
        xc = x - x.mean(dim=1, keepdim=True)
        lo, hi = torch.aminmax(x.reshape(m, -1), dim=1)
        clo, chi = torch.aminmax(xc.reshape(m, -1), dim=1)
        spread = torch.maximum(chi, -clo)  # max |x − x̄|, as Prepared measures it
        constant = spread <= _CONSTANT_ULPS * torch.finfo(x.dtype).eps * torch.maximum(hi, -lo)
        scale = (spread + torch.finfo(x.dtype).tiny).reciprocal_()
        xs = xc.mul_(scale[:, None, None])  # |xs| ≤ 1: its Gram neither over- nor underflows
        k = torch.bmm(xs, xs.transpose(1, 2))
        # |K| ≥ 1 unless constant (some |xs| entry is 1), so only a constant input needs the mask.
        inv = torch.linalg.vector_norm(k, dim=(1, 2)).reciprocal_().masked_fill_(constant, 0)
        sim = (k * l).sum(dim=(1, 2)).mul_(inv)
        ctx.save_for_backward(xs, k, l, inv, sim, scale)
        return sim

    @staticmethod
    def backward(ctx, grad: Tensor):
        xs, k, l, inv, sim, scale = ctx.saved_tensors
        # d sim / dK = (L̂ − sim/|K| · K) / |K|; dK/dxs: (G + Gᵀ) xs = 2 G xs (G symmetric); dxs/dx:
        # the scale times the centring (CKA is invariant to the scale, so its own derivative is 0).
        g = torch.addcmul(l, k, (sim * inv)[:, None, None], value=-1)
        gx = torch.bmm(g, xs).mul_((grad * inv * scale * 2)[:, None, None])
        return gx - gx.mean(dim=1, keepdim=True), None


def linear_cka_stack(x: Tensor, l: Tensor) -> Tensor:
    """``(m,)`` linear CKA of ``x: (m, n, d)`` against unit centred Grams ``l: (m, n, n)`` (from
    :func:`unit_centred_gram` or :func:`unit_gram`); 0 for a constant x[i], NaN for a non-finite one."""
    return _LinearCKAStack.apply(x, l)
