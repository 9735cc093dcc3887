"""A fixed random projection that keeps inner products, to make wide layers' Grams cheaper."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["signed_buckets", "sketch", "stacked_signs"]


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
    return signed_buckets(x, _bucket_signs(d, seed, dim, x.dtype, x.device))


def signed_buckets(x: Tensor, signs: Tensor) -> Tensor:
    """The CountSketch of ``x: (..., d)`` with ``signs: (..., buckets, dim)`` (broadcast against x's
    leading axes; zero past d): x zero-padded to ``buckets·dim``, signed, the buckets summed. Three
    aten ops, four with the pad (dim does not divide d); one ``mul`` back."""
    width = signs.shape[-2] * signs.shape[-1]
    if width > x.shape[-1]:
        x = F.pad(x, (0, width - x.shape[-1]))
    return (x.unflatten(-1, signs.shape[-2:]) * signs).sum(-2)


@functools.lru_cache(maxsize=128)
def _signs(d: int, seed: int, device: torch.device) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (d,), generator=generator).float() * 2 - 1).to(device)


@functools.lru_cache(maxsize=128)
def _bucket_signs(d: int, seed: int, dim: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(buckets, dim)``: feature j's sign at bucket j // dim, column j mod dim; zero past d. Made
    once (never an inference tensor)."""
    buckets = -(-d // dim)
    with torch.inference_mode(False):
        return F.pad(_signs(d, seed, device), (0, buckets * dim - d)).to(dtype).view(buckets, dim)


@functools.lru_cache(maxsize=64)
def stacked_signs(seeds: tuple[int, ...], d: int, dim: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(len(seeds), 1, buckets, dim)``: each seed's signs of :func:`sketch` for a d-wide input,
    so that ``signed_buckets(x, signs)`` of a stack ``x: (len(seeds), n, d)`` sketches each
    ``x[i]`` as ``sketch(x[i], dim, seeds[i])`` does. Made once (never an inference tensor)."""
    with torch.inference_mode(False):
        return torch.stack([_bucket_signs(d, seed, dim, dtype, device) for seed in seeds])[:, None]
