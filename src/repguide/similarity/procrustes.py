"""Orthogonal Procrustes similarity."""

from __future__ import annotations

import torch
from torch import Tensor

from repguide.similarity.base import Measure, Prepared, register_measure, safe_div, safe_sqrt

__all__ = ["Procrustes"]


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
        nx = safe_sqrt(a.square().sum())
        ny = safe_sqrt(b.square().sum())
        product = a.T @ b
        # The SVD refuses non-finite entries; the NaN norm below still makes the value NaN.
        nuclear = torch.linalg.svdvals(torch.where(product.isfinite(), product, 0.0)).sum()
        return safe_div(nuclear, nx * ny)
