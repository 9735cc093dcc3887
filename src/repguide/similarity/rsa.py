"""Representational similarity analysis: the Pearson correlation of two representational
dissimilarity matrices."""

from __future__ import annotations

from torch import Tensor

from repguide.similarity.base import (
    Measure,
    Prepared,
    register_measure,
    safe_div,
    safe_sqrt,
    sq_distances,
    upper_triangle,
)

__all__ = ["RSA"]


@register_measure("rsa")
class RSA(Measure):
    """Pearson correlation of the two RDMs' upper triangles; RDM = squared Euclidean distances."""

    min_n = 3

    def needs_features(self, n: int, d: int, d_other: int) -> bool:
        return False

    def compare(self, px: Prepared, py: Prepared) -> Tensor:
        a = upper_triangle(sq_distances(px))
        b = upper_triangle(sq_distances(py))
        a = a - a.mean()
        b = b - b.mean()
        return safe_div((a * b).sum(), safe_sqrt((a * a).sum()) * safe_sqrt((b * b).sum()))
