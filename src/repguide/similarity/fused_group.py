"""Linear CKA of target layers of one batch whose widths differ, in one autograd node.

:func:`repguide.similarity.fused.linear_cka_loss` stacks target layers of one shape; a network
whose paired layers have several widths (a CNN's stages, an MLP that narrows) would otherwise run
one such node per width, each with its ~20 ops forward and ~7 backward for one or two layers. Here
the layers of every width go through one node: per width the centring, the rescale and the Gram
(the layers of one width stacked, a ``bmm``), then the Grams of all widths stacked and the rest
(norms, constancy, inner products, the weighted loss; backward the n×n G) once for all of them
(issue 14: 30.5 extra aten ops a pair on a two-pair CNN target, where a node per width cost
41.5; benchmarks/README.md, log #68).

Where every width has one layer, the whole-layer steps (max |x|, subtracting the column means,
dividing, max |y|) are one ``_foreach`` op for all of them on an accelerator; on CUDA those whose
operands differ in shape take PyTorch's per-tensor route (one kernel a layer). The arithmetic is
that of :class:`~repguide.similarity.fused._LinearCKAStack`, row by row.
"""

from __future__ import annotations

from math import inf

import torch
from torch import Tensor

from repguide.similarity import fused

__all__ = ["linear_cka_group_loss"]


def _tops_and_centred(xs: list[Tensor]) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """``(ys, tops, spread)`` of the blocks ``xs`` (each (n, d_j), or (m_j, n, d_j) rows of one
    width): y = (x − column means) / top per row with top = max |x| + tiny (one per block, 0-dim
    or (m_j, 1, 1)), and spread = max |y| of every row, (m, 1, 1)."""
    tiny = torch.finfo(xs[0].dtype).tiny
    if all(x.dim() == 2 for x in xs) and not (fused.CPU_TUNED and xs[0].device.type == "cpu"):
        tops = torch._foreach_norm(xs, inf)
        torch._foreach_add_(tops, tiny)
        ys = torch._foreach_sub(xs, [x.mean(dim=0, keepdim=True) for x in xs])
        torch._foreach_div_(ys, tops)
        spreads = torch._foreach_norm(ys, inf)
        return ys, tops, torch.stack(spreads).view(-1, 1, 1)
    ys, tops, spreads = [], [], []
    for x in xs:
        x3 = x if x.dim() == 3 else x[None]
        top = fused.abs_max(x3, (1, 2), keepdim=True).add_(tiny)
        y = (x3 - x3.mean(dim=1, keepdim=True)).div_(top)
        ys.append(y if x.dim() == 3 else y[0])
        tops.append(top if x.dim() == 3 else top[0])
        spreads.append(fused.abs_max(y, (1, 2), keepdim=True))
    return ys, tops, torch.cat(spreads)


class _LinearCKAGroup(torch.autograd.Function):
    """CKA of target layers ``(n, d_j)`` against unit centred Grams ``l: (m, n, n)``, one row a
    layer in the order given; ``counts[j]`` layers of block j share a width (stacked), the blocks'
    widths differ. Returns ``(total − w·sim, sim)``, as ``linear_cka_loss`` does."""

    @staticmethod
    def forward(ctx, l: Tensor, w: Tensor, w3: Tensor, total: float, counts: tuple[int, ...], *layers: Tensor):
        blocks, start = [], 0
        for c in counts:
            blocks.append(layers[start] if c == 1 else torch.stack(layers[start : start + c]))
            start += c
        ys, tops, spread = _tops_and_centred(blocks)
        grams = [torch.mm(y, y.T) if y.dim() == 2 else torch.bmm(y, y.transpose(1, 2)) for y in ys]
        k = torch.stack(grams) if all(g.dim() == 2 for g in grams) else torch.cat(
            [g if g.dim() == 3 else g[None] for g in grams])
        norm = torch.linalg.vector_norm(k, dim=(1, 2), keepdim=True)
        norm.masked_fill_(spread <= fused.CONSTANT_ULPS * torch.finfo(k.dtype).eps, inf)
        kn = k.div_(norm)  # K̂; a constant row's |K| is inf, so its K̂, similarity and gradient are 0
        sim = (kn * l).sum(dim=(1, 2), keepdim=True)
        ctx.save_for_backward(kn, l, sim, norm, w3, *ys, *tops)
        ctx.set_materialize_grads(False)
        ctx.counts = counts
        sims = sim.view(-1)
        return torch.rsub(torch.dot(sims, w), total), sims

    @staticmethod
    def backward(ctx, *grads: Tensor | None):
        kn, l, sim, norm, w3, *rest = ctx.saved_tensors
        ys, tops = rest[: len(ctx.counts)], rest[len(ctx.counts) :]
        if grads[0] is None:
            row = grads[1].view(-1, 1, 1)
        else:
            row = w3 * grads[0] if grads[1] is None else grads[1].view(-1, 1, 1) + w3 * grads[0]
        # As _LinearCKAStack: d sim/dK = (L̂ − sim·K̂)/|K|, dK/dy = 2 G y, dy/dx = 1/top (the
        # centring left out: G y is centred already); |K| in G, each block's 1/top after its product.
        g = torch.addcmul(l, kn, sim, value=-1).mul_(row / norm)
        blocks, start = [], 0
        for y, c in zip(ys, ctx.counts):
            if y.dim() == 2:
                blocks.append(torch.addmm(y, g[start], y, beta=0, alpha=2))
            else:
                blocks.append(torch.baddbmm(y, g[start : start + c], y, beta=0, alpha=2))
            start += c
        torch._foreach_div_(blocks, list(tops))
        parts = [part for b in blocks for part in ((b,) if b.dim() == 2 else b.unbind(0))]
        return (None, None, None, None, None, *parts)


def linear_cka_group_loss(blocks: list[list[Tensor]], l: Tensor, w: Tensor, w3: Tensor,
                          total: float) -> tuple[Tensor, Tensor]:
    """``(total − w·sim, sim)`` with ``sim: (m,)`` the linear CKA of every layer of ``blocks``
    (lists of ``(n, d_j)`` layers, one width a list, the rows in that order) against ``l: (m, n, n)``,
    weights ``w: (m,)`` and ``w3`` = −w as ``(m, 1, 1)``: one autograd node, as
    :func:`~repguide.similarity.fused.linear_cka_loss` is for one width."""
    counts = tuple(len(b) for b in blocks)
    return _LinearCKAGroup.apply(l, w, w3, total, counts, *(x for b in blocks for x in b))
