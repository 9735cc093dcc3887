"""Linear CKA in the Gram form with few ops and no host sync: what a guided step runs per pair.

Two halves, each a handful of aten ops (on a GPU, a handful of kernel launches):

* :func:`unit_centred_gram` turns a frozen (guide) activation into its centred Gram divided by its
  Frobenius norm, decided entirely on the device (no fallback branch that reads a value);
* :func:`linear_cka_stack` compares a stack of target activations ``(m, n, d)`` with a stack of such
  unit Grams ``(m, n, n)`` in one autograd node: forward centre + rescale + ``bmm`` Gram + inner
  products; backward one ``bmm``. Pairs of equal shape are batched through it;
  :func:`linear_cka_loss`, what a guided step runs, also returns their weighted loss from that node.

CKA = <K, L̂> / |K| with K the centred Gram of the rescaled target and L̂ = L / |L|.

:func:`symmetric_gram` is ``a @ aᵀ`` from row blocks on a CPU (the guide's raw Grams there, and
``repguide.compare``'s).
"""

from __future__ import annotations

from math import inf

import torch
from torch import Tensor

from repguide.similarity.sketching import signed_buckets

__all__ = [
    "linear_cka_loss", "linear_cka_stack", "symmetric_gram", "unit_centred_gram", "unit_centred_gram_list",
    "unit_centred_grams", "unit_gram",
]

#: An input whose every centred entry is within this many ulps of its largest |entry| is constant
#: (what Prepared decides; rounding in a mean leaves residuals of a few ulps).
CONSTANT_ULPS = 64

#: Whether a CPU takes the paths tuned for it: the raw guide Gram with its host-side check
#: (:meth:`~repguide.similarity.prepared.Prepared.gram_only`; a host read costs nothing there, and the
#: device path's passes over x cost 17-22% of the guide's Grams, benchmarks/README.md log #31) and
#: max |x| as amax and amin (``vector_norm(ord=inf)``, one op, is 5-10x slower on a CPU, log #47).
#: False takes the accelerator's paths on a CPU too: tests/test_sync_free.py and
#: benchmarks/bench_ops.py set it, so that the ops and host syncs they count on a CPU are the
#: ones an accelerator would run.
CPU_TUNED = True


def abs_max(x: Tensor, dim: tuple[int, ...] | None = None, keepdim: bool = False) -> Tensor:
    """max |x| over ``dim`` (all of x for None), without an |x| temporary: one op on an
    accelerator; on a CPU one ``aminmax`` pass over all of x, or ``amax`` and ``amin`` over some
    dims (``aminmax`` with dims is as slow as ``vector_norm(ord=inf)`` there, log #47)."""
    if CPU_TUNED and x.device.type == "cpu":
        if dim is None:
            low, high = torch.aminmax(x)
            return torch.maximum(high, low.neg_()).view([1] * x.dim() if keepdim else [])
        return torch.maximum(x.amax(dim=dim, keepdim=keepdim), x.amin(dim=dim, keepdim=keepdim).neg_())
    return torch.linalg.vector_norm(x, ord=inf, dim=dim, keepdim=keepdim)


#: Row blocks of at least this many rows, at most :data:`MAX_BLOCKS` of them, and only for products
#: of at least :data:`MIN_BLOCKED_MACS` multiply-adds: below that the smaller products lose more
#: speed than the skipped blocks save (benchmarks/README.md log #36, 1 thread on this project's CPU).
MIN_BLOCK_ROWS = 64
MAX_BLOCKS = 4
MIN_BLOCKED_MACS = 1 << 25


def symmetric_gram(a: Tensor) -> Tensor:
    """``a @ aᵀ`` for ``a: (n, d)``; on a CPU, for large products, from k = 2..4 row blocks: block
    column j is ``a[lo_j:] @ a[lo_j:hi_j]ᵀ`` (the blocks on and below the diagonal) and is mirrored
    above it, (k+1)/(2k) of the multiply-adds. Symmetric to rounding, as ``a @ aᵀ`` is (the blocks
    off the diagonal exactly: each and its mirror are one product)."""
    n, d = a.shape
    k = min(MAX_BLOCKS, n // MIN_BLOCK_ROWS)
    if a.device.type != "cpu" or k < 2 or n * n * d < MIN_BLOCKED_MACS:
        return a @ a.T
    out = a.new_empty(n, n)
    cuts = [i * n // k for i in range(k + 1)]
    for lo, hi in zip(cuts, cuts[1:]):
        column = a[lo:] @ a[lo:hi].T  # (n - lo, hi - lo)
        out[lo:, lo:hi] = column
        out[lo:hi, hi:] = column[hi - lo :].T
    return out


def unit_centred_gram(x: Tensor, matmul_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """``(L̂, constant)`` for ``x: (n, d)`` (no gradient): L̂ = HLH / |HLH|_F with L the Gram of x,
    zeros for a constant x, NaN wherever x is not finite. Never reads a value on the host.

    x is centred twice (the second pass removes what the rounded mean of the first left, so the
    products see x − x̄ to a few ulps of its own size, however large x̄) and divided by its largest
    |entry|: |y| ≤ 2 rules out overflow. x is constant when every centred entry is within 64 ulps
    of that largest |entry| (what :class:`Prepared` tests), i.e. max |y| ≤ 64 ulps; otherwise some
    |y| exceeds it, far from underflow. Fourteen aten ops in all; ``matmul_dtype`` (e.g.
    ``torch.bfloat16``) rounds y to it for the product (one more); the Gram's norm and division
    are in x's dtype (the division's type promotion gives an L̂ of x's dtype without a cast).
    """
    return _unit_centred_grams(x, (0,), matmul_dtype)


def unit_centred_grams(x: Tensor, matmul_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """:func:`unit_centred_gram` of each ``x[i]: (n, d)`` of a stack ``x: (m, n, d)``, in one set of
    batched ops (the positions of a per-position guide layer): ``(L̂: (m, n, n), constant: (m,))``."""
    units, constant = _unit_centred_grams(x, (1, 2), matmul_dtype)
    return units, constant.view(-1)


def unit_centred_gram_list(xs: list[Tensor], matmul_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """:func:`unit_centred_gram` of each of ``xs``, layers ``(n, d_i)`` of one n and dtype whose
    widths differ, their whole-layer steps each one ``_foreach`` op for all of them (the column
    means and the products are per layer): ``(L̂: (k, n, n), constant: (k,))``. On CUDA the
    subtractions and the division, whose operands differ in shape, take PyTorch's per-tensor route
    (one kernel a layer each); the norms and the addition one multi-tensor kernel. A reduced
    ``matmul_dtype`` rounds each centred layer to it for its product (one more op a layer); the
    stacked Grams' norm and division are in x's dtype (no cast back)."""
    ys = torch._foreach_sub(xs, [x.mean(dim=0, keepdim=True) for x in xs])
    torch._foreach_sub_(ys, [y.mean(dim=0, keepdim=True) for y in ys])
    finfo = torch.finfo(xs[0].dtype)
    tops = torch._foreach_norm(xs, inf)  # max |x| of each
    torch._foreach_add_(tops, finfo.tiny)
    torch._foreach_div_(ys, tops)
    constant = torch.stack(torch._foreach_norm(ys, inf)) <= CONSTANT_ULPS * finfo.eps
    if matmul_dtype in (None, xs[0].dtype):
        raw = torch.stack([y @ y.T for y in ys])
        unit = raw.div_(torch.linalg.vector_norm(raw, dim=(1, 2), keepdim=True))
    else:  # the reduced Grams' norm and division in x's dtype: no op to cast them back
        raw = torch.stack([low @ low.T for low in (y.to(matmul_dtype) for y in ys)])
        unit = raw / torch.linalg.vector_norm(raw, dim=(1, 2), keepdim=True, dtype=xs[0].dtype)
    return unit.masked_fill_(constant.view(-1, 1, 1), 0), constant


def _unit_centred_grams(
    x: Tensor, dims: tuple[int, ...], matmul_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """The ops of :func:`unit_centred_gram` on ``x: (n, d)`` (``dims=(0,)``: per-matrix reductions
    over all of x) or on a stack ``x: (m, n, d)`` (``dims=(1, 2)``)."""
    rows, whole = dims[0], None if len(dims) == 1 else dims
    keep = whole is not None
    y = x - x.mean(dim=rows, keepdim=True)
    y.sub_(y.mean(dim=rows, keepdim=True))
    finfo = torch.finfo(x.dtype)
    y.div_(abs_max(x, whole, keep).add_(finfo.tiny))
    constant = abs_max(y, whole, keep) <= CONSTANT_ULPS * finfo.eps
    reduced = matmul_dtype not in (None, x.dtype)
    low = y.to(matmul_dtype) if reduced else y
    if low.dim() == 3:
        raw = torch.bmm(low, low.transpose(1, 2))
    else:  # on a CPU, large exact products from row blocks (fewer multiply-adds, log #66); else y yᵀ
        raw = symmetric_gram(low) if CPU_TUNED and not reduced else low @ low.T
    if reduced:  # norm and division in x's dtype (a norm of ≥ 1 dim promotes): no op to cast back
        unit = raw / torch.linalg.vector_norm(raw, dim=whole, keepdim=True, dtype=x.dtype)
    else:
        unit = raw.div_(torch.linalg.vector_norm(raw, dim=whole, keepdim=keep))
    return unit.masked_fill_(constant, 0), constant


def unit_gram(p) -> Tensor:
    """L̂ of a :class:`~repguide.similarity.prepared.Prepared` input, computed once and kept on it."""
    unit = getattr(p, "_unit", None)
    if unit is None:
        g = p.gram
        norm = torch.linalg.vector_norm(g)
        unit = p._unit = (g / norm).masked_fill_(norm == 0, 0)
    return unit


class _LinearCKAStack(torch.autograd.Function):
    """CKA of ``x[i]: (n, d)`` against unit centred Grams ``l[i]: (n, n)``, for i < m, one node,
    the rows of ``x`` stacked from ``xs`` (each ``(n, d)`` one row, or ``(p, n, d)`` p rows).

    With row weights ``w: (m,)`` (and ``w3`` = −w as ``(m, 1, 1)``) it returns the loss
    ``total − w·sim`` as well as ``sim``: the loss's gradient is folded into the n×n G of the
    backward, so a guided step's loss costs two ops forward and none backward beyond the stack's.
    """

    @staticmethod
    def forward(ctx, l: Tensor, w: Tensor | None, w3: Tensor | None, total: float, layers: bool,
                signs: Tensor | None, *xs: Tensor):
        flat = tuple(x.dim() == 2 for x in xs)
        ctx.layers = xs[0].shape if layers else None
        if layers:  # layers (n, ...) of one shape, each one row flattened: one copy (the stack)
            x = torch.stack(xs).reshape(len(xs), xs[0].shape[0], -1)
        elif len(xs) == 1:
            x = xs[0][None] if flat[0] else xs[0]
        elif all(flat):
            x = torch.stack(xs)
        else:
            x = torch.cat([x if x.dim() == 3 else x[None] for x in xs])
        ctx.sketch = None
        if signs is not None:  # each row's CountSketch (repguide.similarity.sketch), the stack at once
            ctx.sketch, ctx.width = signs, x.shape[-1]
            x = signed_buckets(x, signs)
        m = x.shape[0]
        # Centred, then divided by the largest |x| (as unit_centred_gram): neither over- nor
        # underflows; x[i] is constant when every centred entry is within 64 ulps of it, and its
        # |K| is then taken as inf, so that K̂ = K / |K| is 0 (its similarity 0, its gradient 0).
        top = abs_max(x, (1, 2), keepdim=True).add_(torch.finfo(x.dtype).tiny)
        xs_ = (x - x.mean(dim=1, keepdim=True)).div_(top)
        spread = abs_max(xs_, (1, 2), keepdim=True)
        k = torch.bmm(xs_, xs_.transpose(1, 2))
        norm = torch.linalg.vector_norm(k, dim=(1, 2), keepdim=True)
        norm.masked_fill_(spread <= CONSTANT_ULPS * torch.finfo(x.dtype).eps, inf)
        kn = k.div_(norm)  # K̂, in K's storage
        sim = (kn * l).sum(dim=(1, 2), keepdim=True)
        # d sim / dK = (L̂ − sim · K̂) / |K|; dK/dxs: (G + Gᵀ) xs = 2 G xs (G symmetric); dxs/dx:
        # 1/top times the centring (CKA is invariant to the scale, so its own derivative is 0).
        ctx.save_for_backward(xs_, kn, l, sim, norm.mul_(top), w3)
        ctx.set_materialize_grads(False)  # an output without a gradient gets None, not zeros
        ctx.flat, ctx.rows = flat, [1 if f else x.shape[0] for f, x in zip(flat, xs)]
        sims = sim.view(m)
        if w is None:
            return sims
        return torch.rsub(torch.dot(sims, w), total), sims

    @staticmethod
    def backward(ctx, *grads: Tensor | None):
        xs_, kn, l, sim, norm_top, w3 = ctx.saved_tensors
        if w3 is None or grads[0] is None:  # a gradient through the similarities alone
            row = grads[-1].view(-1, 1, 1)
        else:  # d loss / d sim = −w
            row = w3 * grads[0] if grads[1] is None else grads[1].view(-1, 1, 1) + w3 * grads[0]
        # 2 G xs · grad/(|K| top), the scalars folded into the n×n G (not a pass over the n×d
        # result; beta=0: the first xs only gives the shape). The centring of dxs/dx is left out:
        # G xs is centred already, as 1ᵀG = 1ᵀL̂ − sim·1ᵀK̂ = 0 for a centred L̂ and a centred xs.
        g = torch.addcmul(l, kn, sim, value=-1).mul_(row / norm_top)
        dx = torch.baddbmm(xs_, g, xs_, beta=0, alpha=2)
        if ctx.sketch is not None:  # back through the sketch: each bucket's gradient, signed
            m, n, dim = dx.shape
            dx = (dx.view(m, n, 1, dim) * ctx.sketch).view(m, n, -1)
            dx = dx if dx.shape[-1] == ctx.width else dx[..., : ctx.width]
        flat = ctx.flat
        if ctx.layers is not None:
            parts = dx.view(len(flat), *ctx.layers).unbind(0)
        elif len(flat) == 1:
            parts = (dx[0] if flat[0] else dx,)
        elif all(flat):
            parts = dx.unbind(0)
        else:
            parts = tuple(p[0] if f else p for p, f in zip(dx.split(ctx.rows), flat))
        return (None, None, None, None, None, None, *parts)


def linear_cka_stack(x: Tensor, l: Tensor) -> Tensor:
    """``(m,)`` linear CKA of ``x: (m, n, d)`` against unit centred Grams ``l: (m, n, n)`` (from
    :func:`unit_centred_gram` or :func:`unit_gram`; the gradient assumes them centred, 1ᵀl[i] = 0);
    0 for a constant x[i], NaN for a non-finite one."""
    return _LinearCKAStack.apply(l, None, None, 0.0, False, None, x)


def linear_cka_loss(
    xs: list[Tensor], l: Tensor, w: Tensor, w3: Tensor, total: float, layers: bool = False,
    signs: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(total − w·sim, sim)`` with ``sim: (m,)`` the linear CKA of the rows of ``xs`` (each
    ``(n, d)`` one row, or ``(p, n, d)`` p rows, stacked in order; with ``layers``, activations
    ``(n, ...)`` of one shape, each one row, flattened in the stack's one copy: a non-contiguous
    layer's ``reshape(n, -1)`` would copy it first) against ``l: (m, n, n)``, in one autograd node
    (``w3`` is −w as ``(m, 1, 1)``). Both outputs carry gradients. ``signs: (m, 1, buckets, dim)``
    (one row per layer, ``buckets·dim ≥ d``): each row is first CountSketched as
    :func:`repguide.similarity.sketch` does (zero-padded to ``buckets·dim``, signed, the buckets
    summed), the whole stack in two ops, and its gradient taken back through the sketch in one."""
    return _LinearCKAStack.apply(l, w, w3, total, layers, signs, *xs)
