"""The Gram matrices of :class:`~repguide.similarity.kernel_alignment.MinibatchCKA` (``compare``):
one centring pass before a symmetric product, the range and constancy decided after it.

:class:`~repguide.similarity.prepared.Prepared` centres, then reads the input twice more (the largest
|entry| before and after centring) and rescales it, so that no product can over- or underflow and a
constant input is told from rounding noise. Here the input is only centred; what those passes
decided is read off the n×n Gram's diagonal and the d column means afterwards (a host read per
layer, which an analysis can afford), and only an input whose Gram could have lost precision, or
whose constancy those values cannot settle, is read again (benchmarks/README.md, log #35).

:func:`~repguide.similarity.fused.symmetric_gram` computes ``a @ aᵀ`` in row blocks (the blocks on
and below the diagonal, mirrored), which torch's general product, with no symmetric rank-k update,
does not exploit; the guide's raw Grams on a CPU use it too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from repguide.similarity.prepared import Prepared, _compute_dtype
from repguide.similarity.fused import CONSTANT_ULPS, abs_max, symmetric_gram

__all__ = ["centred_gram", "symmetric_gram"]


def centred_gram(x: Tensor, dtype: torch.dtype, gram_dtype: torch.dtype) -> Tensor:
    """(n, n) Gram of ``x: (n, d)`` centred by its column means, the product in ``gram_dtype``,
    returned in ``dtype``; zeros for an input :class:`Prepared` calls constant (every centred entry
    within 64 ulps of the largest |entry|), non-finite for a non-finite input.

    No rescale: the row norms² on the Gram's diagonal bound every partial sum of the product
    (Cauchy-Schwarz), so where the largest lies in [d·tiny/eps, max/64] none over- or underflowed
    beyond eps of it; outside that range a non-constant input's product is redone through
    :class:`Prepared`. The largest row norm ‖xᶜ_i‖ and ‖xᶜ_i‖/√d bound the largest |centred entry|
    (Prepared's spread) from above and below, and the largest |column mean| and that plus the
    spread bound the largest |entry|; where these bounds leave Prepared's test undecided, the two
    |entry| maxima are read, so the decision is Prepared's own.
    """
    x = x.to(gram_dtype)
    x = x.to(_compute_dtype(x))  # float16/bfloat16 inputs rounded, then computed in float32, as Prepared does
    mean = x.mean(dim=0, keepdim=True)
    xc = x - mean
    gram = symmetric_gram(xc)
    n, d = xc.shape
    finfo = torch.finfo(x.dtype)
    top_row = float(gram.diagonal().amax())  # max ‖xᶜ_i‖²
    if top_row != top_row or top_row == float("inf"):
        if not bool(torch.isfinite(x).all()):
            return gram.to(dtype)  # a non-finite input stays non-finite
        return _through_prepared(x, dtype)  # a finite input that overflowed
    if top_row > finfo.max / 64:
        return _through_prepared(x, dtype)
    slack = 2 * d * finfo.eps  # relative rounding of the computed row norms², generously
    # Squares that underflowed lose less than tiny each: d·tiny bounds what the diagonal misses.
    spread_high = (top_row * (1 + slack) + d * finfo.tiny) ** 0.5
    mean_top = float(abs_max(mean))
    limit = CONSTANT_ULPS * finfo.eps
    mean_slack = (n + 4) * finfo.eps  # a computed mean's rounding, relative to max|x|
    if spread_high <= limit * mean_top * (1 - mean_slack):
        return x.new_zeros(n, n, dtype=dtype)  # spread ≤ spread_high ≤ limit·max|mean| ≤ limit·max|x|
    if top_row < d * finfo.tiny / finfo.eps:
        return _through_prepared(x, dtype)  # partial sums may have underflowed
    spread_low = (max(top_row * (1 - slack), 0.0) / d) ** 0.5
    if spread_low > limit * (mean_top + spread_high) * (1 + mean_slack):
        constant = False  # spread ≥ spread_low > limit·(max|mean| + spread) ≥ limit·max|x|
    else:  # Prepared's own test, on the same centred entries
        constant = bool(abs_max(xc) <= limit * abs_max(x))
    if constant:
        return x.new_zeros(n, n, dtype=dtype)
    return gram.to(dtype)


def _through_prepared(x: Tensor, dtype: torch.dtype) -> Tensor:
    """The centred Gram by way of :class:`Prepared` (centred, rescaled to unit spread, the product,
    scaled back by the spread²), for inputs whose unscaled product could over- or underflow."""
    p = Prepared(x, min_n=4)
    if p.constant:
        return x.new_zeros(x.shape[0], x.shape[0], dtype=dtype)
    return symmetric_gram(p.x).to(dtype) * p.spread.to(dtype).square()
