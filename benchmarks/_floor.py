"""The floor of an exact guided step: every matrix product linear CKA needs for every pair, from the
layer widths, each timed alone (benchmarks/README.md, "Definitions"; used by bench_step)."""

from __future__ import annotations

import torch

from _common import DEVICE, interleaved

import repguide as rg
from repguide.similarity.kernel_alignment import use_gram_form


def floor_products(guidance: rg.Guidance, x: torch.Tensor) -> list[tuple[str, str, tuple, int]]:
    """``(what, op, dims, count)`` for every product one exact step needs, from the layer widths.

    ``op`` is ``"a@a.T"`` (a: (m, k)), ``"a.T@b"`` (a: (n, p), b: (n, q)) or ``"a@b"`` (m×k @ k×p).
    """
    target_capture, guide_capture = guidance._captures["target"], guidance._captures["guide"]
    n = x.shape[0]
    with torch.no_grad(), target_capture.record(n) as t_acts, guide_capture.record(n) as g_acts:
        guidance.target(x)
        guidance.guide(x)
    width = {name: a[0].numel() for name, a in {**t_acts, **g_acts}.items()}
    counts: dict[tuple, int] = {}

    def need(what, op, dims):
        counts[(what, op, dims)] = counts.get((what, op, dims), 0) + 1

    def self_term(what, d, backward):
        if d < n:  # d×d cross-product, and x @ (G + Gᵀ) backward
            need(what, "a.T@b", (n, d, d))
            if backward:
                need(what + " backward", "a@b", (n, d, d))
        else:  # n×n Gram, and (G + Gᵀ) @ x backward
            need(what, "a@a.T", (n, d))
            if backward:
                need(what + " backward", "a@b", (n, n, d))

    guide_self = set()
    for pair in guidance.pairs:
        dt, dg = width[pair.target], width[pair.guide]
        if use_gram_form(n, dt, dg):
            self_term("target Gram", dt, True)
            guide_self.add((pair.guide, "guide Gram"))
        else:
            need("cross product", "a.T@b", (n, dt, dg))
            need("cross product backward", "a@b", (n, dg, dt))
            self_term("target self-product", dt, True)
            guide_self.add((pair.guide, "guide self-product"))
    for g, what in guide_self:
        self_term(what, width[g], False)
    return [(what, op, dims, c) for (what, op, dims), c in counts.items()]


def _product(op: str, dims: tuple):
    if op == "a@a.T":
        a = torch.randn(*dims, device=DEVICE)
        return lambda: a @ a.T
    if op == "a.T@b":
        n, p, q = dims
        a, b = torch.randn(n, p, device=DEVICE), torch.randn(n, q, device=DEVICE)
        return lambda: a.T @ b
    m, k, p = dims
    a, b = torch.randn(m, k, device=DEVICE), torch.randn(k, p, device=DEVICE)
    return lambda: a @ b


def time_products(products, repeats: int) -> dict:
    """Median seconds of each distinct product, each timed alone."""
    fns = {str((op, dims)): _product(op, dims) for _, op, dims, _ in products}
    return {k: v["median"] for k, v in interleaved(fns, repeats).items()}
