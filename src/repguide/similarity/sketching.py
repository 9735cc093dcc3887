"""A fixed random projection that keeps inner products, to make wide layers' Grams cheaper."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["sketch", "stacked_signs"]


def sketch(x: Tensor, dim: int, seed: int = 0) -> Tensor:
    """A fixed random projection of ``x: (..., d)`` to ``(..., dim)`` that keeps inner products.

    A CountSketch (Charikar et al. 2002), i.e. a sparse Johnson-Lindenstrauss map: feature j is
    added, with a random sign, to bucket j mod dim. Then ``sketch(x) @ sketch(y).T`` is an unbiased
    estimate of ``x @ y.T``, so every Gram-based measure sees an approximate Gram; its error grows
    with the effective rank of the Gram over ``dim`` (about sqrt(2 / dim) of |x||y| per entry for
    random features, far less for real activations). The interleaved partition costs two passes
    over x (three when dim does not divide d) where a random one needs a slower gather, and was as
    accurate as a random one on conv and linear activations (benchmarks/README.md, idea 16).
    O(n·d), where the Gram it shrinks costs O(n²·d); differentiable.
    The signs depend only on (d, seed), so a layer is projected the same way at every step.
    Inputs with ``d <= dim`` are returned as they are.
    """
    d = x.shape[-1]
    if d <= dim:
        return x
    signed = x * _signs(d, seed, x.device).to(x.dtype)
    buckets = -(-d // dim)  # the last one padded with zeros: four aten ops in all
    if buckets * dim > d:
        signed = F.pad(signed, (0, buckets * dim - d))
    return signed.unflatten(-1, (buckets, dim)).sum(-2)


@functools.lru_cache(maxsize=128)
def _signs(d: int, seed: int, device: torch.device) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (d,), generator=generator).float() * 2 - 1).to(device)


@functools.lru_cache(maxsize=64)
def stacked_signs(seeds: tuple[int, ...], d: int, dim: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(len(seeds), 1, buckets, dim)``: for each seed, the signs :func:`sketch` gives a d-wide
    input, zero past d (``buckets·dim ≥ d``): ``(x_padded.view(n, buckets, dim) * signs[i]).sum(1)``
    is ``sketch(x, dim, seeds[i])``. Made once (never an inference tensor)."""
    buckets = -(-d // dim)
    with torch.inference_mode(False):
        rows = [F.pad(_signs(d, seed, device), (0, buckets * dim - d)) for seed in seeds]
        return torch.stack(rows).to(dtype).view(len(seeds), 1, buckets, dim)
