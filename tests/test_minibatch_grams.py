"""Specifications of repguide.similarity.minibatch_grams, the Grams of MinibatchCKA (compare): the
row-block symmetric product and the centred Gram without Prepared's rescale, each against a float64
reference written here from the definition."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from repguide.similarity import MinibatchCKA, Prepared
from repguide.similarity.kernel_alignment import _u_centred
from repguide.similarity.minibatch_grams import centred_gram, symmetric_gram


def centred_gram_reference(x: torch.Tensor) -> torch.Tensor:
    """(X - 1μᵀ)(X - 1μᵀ)ᵀ in float64."""
    x = x.double()
    x = x - x.mean(dim=0)
    return x @ x.T


def double_centred(k: torch.Tensor) -> torch.Tensor:
    """H K H with H = I - 11ᵀ/n."""
    n = len(k)
    h = torch.eye(n, dtype=k.dtype) - 1 / n
    return h @ k @ h


@pytest.mark.parametrize("n, d", [(256, 600), (200, 1000), (130, 2500), (64, 3000), (256, 100), (10, 7)])
def test_symmetric_gram_equals_the_product(n, d):
    # (256, 600): 4 row blocks; (200, 1000): 3 blocks of uneven size; (130, 2500): 2 blocks;
    # the rest too small for blocks.
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(n + d))
    gram = symmetric_gram(x)
    expected = x.double() @ x.double().T
    assert gram.dtype == x.dtype and gram.shape == (n, n)
    torch.testing.assert_close(gram.double(), expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    torch.testing.assert_close(symmetric_gram(x.double()), expected, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("scale, offset", [(1.0, 0.0), (1.0, 1000.0), (1e-25, 0.0), (1e-30, 1e-28), (1e18, 0.0), (1e30, 0.0)])
def test_centred_gram_matches_centring_in_float64_at_any_scale(scale, offset):
    # 1e-25 and 1e-30: the unscaled products would underflow; 1e18 and 1e30: overflow; both are
    # redone through Prepared, which rescales.
    x = (scale * torch.randn(256, 700, generator=torch.Generator().manual_seed(0)) + offset).float()
    # Centring in float32 shifts every row by the mean's rounding alike, which HSIC₁ (and the double
    # centring H K H) ignores: compared double-centred.
    gram = centred_gram(x, torch.float64, torch.float32)
    assert gram.dtype == torch.float64 and torch.isfinite(gram).all()
    gram, expected = double_centred(gram), double_centred(centred_gram_reference(x))
    assert (gram - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("relative", [0.0, 1e-9, 2e-7, 2e-6, 6e-6, 8e-6, 1e-5, 3e-5, 1e-3])
@pytest.mark.parametrize("where", ["one entry", "everywhere"])
def test_centred_gram_calls_constant_exactly_what_prepared_calls_constant(relative, where):
    # Deviations of `relative` times the offset, around Prepared's bound of 64 ulps (7.6e-6).
    g = torch.Generator().manual_seed(1)
    x = torch.full((64, 300), 3.7) + torch.rand(300, generator=g)
    if where == "one entry":
        x[5, 7] += relative * 4.7
    else:
        x += relative * 4.7 * torch.rand(64, 300, generator=g)
    gram = centred_gram(x, torch.float64, torch.float32)
    assert bool((gram == 0).all()) == bool(Prepared(x).constant)


def test_centred_gram_of_a_non_finite_input_is_non_finite():
    for bad in (float("nan"), float("inf")):
        x = torch.randn(300, 600)
        x[3, 4] = bad
        assert not torch.isfinite(centred_gram(x, torch.float64, torch.float32)).all()


def hsic1(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Song et al. (2012) eq. 5 on float64 Grams."""
    k, l = k.clone().fill_diagonal_(0), l.clone().fill_diagonal_(0)
    n = len(k)
    return ((k * l).sum() + k.sum() * l.sum() / ((n - 1) * (n - 2)) - 2 / (n - 2) * (k @ l).sum()) / (n * (n - 3))


def test_inner_products_of_u_centred_grams_are_n_n_minus_3_times_hsic1():
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(9, d, generator=g, dtype=torch.float64) + 3 for d in (2, 5, 30)]
    grams = [x @ x.T for x in xs]  # uncentred: U-centring removes the mean itself
    u = _u_centred([k.float() for k in grams[:1]] + grams[1:], torch.float64)  # any input dtype
    assert u.shape == (3, 81) and u.dtype == torch.float64
    n = 9
    for i in range(3):
        for j in range(3):
            expected = n * (n - 3) * hsic1(grams[i], grams[j])
            tol = 1e-5 if 0 in (i, j) else 1e-10  # the first Gram was rounded to float32
            assert float(u[i] @ u[j]) == pytest.approx(float(expected), rel=tol, abs=tol * float(expected.abs()) + 1e-9)


def test_minibatch_cka_with_blocked_grams_is_within_1e_6_of_a_float64_reference_on_deep_layers():
    """Batches of 256, where the Grams of the 512-wide layers take the row-block product: layers 1,
    6 and 12 of a ReLU FCN at PyTorch's default init (the deep ones small and nearly constant across
    examples), and a layer far from zero with small deviations."""
    torch.manual_seed(0)
    fcn = nn.Sequential(*[m for i in range(12) for m in (nn.Linear(64 if i == 0 else 512, 512), nn.ReLU())])
    batches = []
    with torch.no_grad():
        for _ in range(3):
            h, acts = torch.randn(256, 64), []
            for i, layer in enumerate(fcn):
                h = layer(h)
                if i in (1, 11, 23):
                    acts.append(h)
            acts.append(1000 + 0.01 * torch.randn(256, 600))
            batches.append(acts)
    assert batches[0][2].std(0).mean() < 0.1 * batches[0][2].abs().mean()  # nearly constant

    grams = [[centred_gram_reference(x) for x in acts] for acts in batches]
    layers = range(len(batches[0]))
    sums = {(i, j): sum(hsic1(b[i], b[j]) for b in grams) for i in layers for j in layers}
    expected = torch.tensor([[float(sums[i, j] / (sums[i, i] * sums[j, j]).sqrt()) for j in layers] for i in layers],
                            dtype=torch.float64)
    acc = MinibatchCKA(len(layers), len(layers))
    for acts in batches:
        acc.update(acts, acts)
    assert (acc.compute() - expected).abs().max() < 1e-6
