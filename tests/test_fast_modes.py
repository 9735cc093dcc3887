"""The exact fast path (one-product Gram backward, Gram-only guide layers) and the opt-in fast modes
of Guidance: bf16 guide Grams, CountSketch projections, the guide-feature cache."""

import pytest
import torch
from torch import nn

import repguide as rg
from repguide.guidance import GuideFeatureCache
from repguide.similarity import Prepared, get_measure, sketch
from repguide.similarity import fused
from repguide.similarity.base import gram_matrix

from _nets import CountForwards, mlp
from _nets import cnn as _cnn


def cnn():
    return _cnn(8)


PAIRS = [("1", "0"), ("4", "3")]  # target widths 32; guide widths 8·8·8 = 512


def images(n=16, seed=0):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def similarities(guidance, x, **kwargs):
    out = guidance(x, **kwargs)
    return torch.stack([out.similarities[k] for k in PAIRS]).detach(), out


# --------------------------------------------------------------------------------------------
# Exact fast path


def test_gram_backward_is_the_gradient_of_x_xt():
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: gram_matrix(a, a.dtype), (x,))
    assert torch.autograd.gradgradcheck(lambda a: gram_matrix(a, a.dtype), (x,))


@pytest.mark.parametrize("name", ["cka", "cka_unbiased", "cka_rbf", "rsa"])
def test_gram_only_input_gives_the_same_similarity_and_gradient(name):
    measure = get_measure(name)
    torch.manual_seed(0)
    x = torch.randn(12, 300, requires_grad=True)
    y = torch.randn(12, 5) @ torch.randn(5, 200)
    assert not measure.needs_features(12, 200, 300)
    full = measure.compare(measure.prepare(x), measure.prepare(y))
    (grad_full,) = torch.autograd.grad(full, x)
    slim = measure.prepare(y)
    slim.keep_gram_only()
    assert slim.x is None
    reduced = measure.compare(measure.prepare(x), slim)
    (grad_reduced,) = torch.autograd.grad(reduced, x)
    assert torch.allclose(full, reduced, atol=1e-6)
    assert torch.allclose(grad_full, grad_reduced, atol=1e-6)


def test_prepare_guide_keeps_features_only_where_a_comparison_reads_them():
    y = torch.randn(12, 5) @ torch.randn(5, 200)
    linear, procrustes = get_measure("cka"), get_measure("procrustes")
    assert linear.prepare_guide(y, [300, 300]).x is None  # the Gram form for both widths
    assert linear.prepare_guide(y, [300, None]).x is not None  # a width not known yet
    assert linear.prepare_guide(torch.randn(256, 20), [2]).x is not None  # the feature form
    assert procrustes.prepare_guide(y, [300]).x is not None
    assert linear.prepare_guide(y, [300], torch.bfloat16).gram.dtype == torch.float32
    target = linear.prepare_target(torch.randn(12, 300, dtype=torch.float64), linear.prepare_guide(y, [300]))
    assert target.dtype == torch.float32  # compared in the guide's precision


def _unit(k):
    return k / k.diagonal().amax()


@pytest.fixture(params=[True, False], ids=["raw Gram on the CPU", "device path"])
def gram_path(request, monkeypatch):
    """Both paths of Prepared.gram_only: the CPU default (raw Gram, host-side check) and the
    sync-free device path an accelerator takes."""
    monkeypatch.setattr(fused, "CPU_TUNED", request.param)
    return request.param


def test_gram_centred_as_a_matrix_matches_centring_the_features(gram_path):
    torch.manual_seed(0)
    x = torch.relu(torch.randn(32, 700)) + 0.5  # post-ReLU-like: the mean is a good part of the energy
    exact = Prepared(x.double()).gram
    fast = Prepared.gram_only(x)
    assert fast.x is None and not fast.constant
    assert torch.allclose(_unit(fast.gram).double(), _unit(exact), atol=2e-6)
    y = torch.randn(32, 40)
    cka = get_measure("cka")
    assert torch.allclose(cka.compare(cka.prepare(y), fast), rg.cka(y, x), atol=1e-6)


@pytest.mark.parametrize("x", [
    torch.randn(16, 50) + 1000.0,  # the mean dominates: centring the raw Gram would cancel digits
    torch.randn(16, 50) * 1e30,  # raw products would overflow float32
    torch.randn(16, 50) * 1e-30,  # ... or underflow
    torch.relu(torch.randn(64, 3000)) * 1e-3,  # small, mostly mean
])
def test_gram_only_is_as_precise_as_centring_the_features(x, gram_path):
    # Device path: shifted by the first row and scaled by the range, no fallback branch, no sync;
    # raw path: these inputs fall back to centring x (all but the last) or pass the host check.
    fast = Prepared.gram_only(x)
    exact = Prepared(x.double()).gram
    assert not bool(fast.constant)
    assert torch.allclose(_unit(fast.gram).double(), _unit(exact), atol=2e-6)


def test_gram_only_of_a_constant_input_is_zero_and_of_a_non_finite_one_is_not_finite(gram_path):
    fast = Prepared.gram_only(torch.randn(1, 50).repeat(16, 1))
    assert bool(fast.constant) and torch.equal(fast.gram, torch.zeros(16, 16))
    assert bool(Prepared.gram_only(torch.zeros(8, 5)).constant)
    for bad in (float("nan"), float("inf")):
        x = torch.randn(16, 50)
        x[3, 7] = bad
        assert not torch.isfinite(Prepared.gram_only(x).gram).any()


def test_guide_activations_are_not_kept_after_the_step():
    torch.manual_seed(0)
    guidance = rg.Guidance(mlp(), cnn(), pairs=PAIRS)
    for _ in range(2):
        guidance(images())
    assert guidance._captures["guide"]._acts == {}


def test_float64_models_are_compared_in_float64():
    torch.manual_seed(0)
    target, guide = mlp().double().eval(), cnn().double()
    x = images().double()
    got = rg.Guidance(target, guide, pairs=[("4", "3")]).eval()(x).similarities[("4", "3")]
    assert got.dtype == torch.float64
    expected = rg.cka(target[:5](x), guide[:4](x).flatten(1))
    assert torch.allclose(got, expected, atol=1e-12)


# --------------------------------------------------------------------------------------------
# bf16 guide Grams


def test_bf16_guide_grams_stay_close_to_the_exact_similarity():
    torch.manual_seed(0)
    target, guide = mlp(), cnn()
    x = images(64)
    exact, _ = similarities(rg.Guidance(target, guide, pairs=PAIRS), x)
    fast, out = similarities(rg.Guidance(target, guide, pairs=PAIRS, guide_precision="bf16"), x)
    assert torch.allclose(exact, fast, atol=5e-3)
    out.loss.backward()
    assert target[1].weight.grad is not None and torch.isfinite(target[1].weight.grad).all()


def test_unknown_guide_precision_is_an_error():
    with pytest.raises(ValueError, match="guide_precision"):
        rg.Guidance(mlp(), cnn(), pairs=PAIRS, guide_precision="fp16")


# --------------------------------------------------------------------------------------------
# Sketches


def test_sketch_is_an_unbiased_fixed_projection_of_the_last_axis():
    x, y = torch.randn(3, 500, dtype=torch.float64), torch.randn(4, 500, dtype=torch.float64)
    assert sketch(x, 64, seed=1).shape == (3, 64)
    assert torch.equal(sketch(x, 64, seed=1), sketch(x, 64, seed=1))
    assert not torch.equal(sketch(x, 64, seed=1), sketch(x, 64, seed=2))
    assert sketch(x, 500) is x
    assert sketch(torch.randn(2, 5, 500), 64).shape == (2, 5, 64)
    mean = torch.stack([sketch(x, 64, s) @ sketch(y, 64, s).T for s in range(400)]).mean(0)
    sigma = (x.norm(dim=1)[:, None] * y.norm(dim=1)).max() / (64 * 400) ** 0.5  # of the mean
    assert torch.allclose(mean, x @ y.T, atol=4 * float(sigma))


@pytest.mark.parametrize("d", [500, 512])  # dim divides d or not
def test_sketch_adds_feature_j_with_its_sign_to_bucket_j_mod_dim(d):
    from repguide.similarity.sketching import _signs

    x = torch.randn(3, d, dtype=torch.float64)
    dense = torch.zeros(d, 64, dtype=torch.float64)  # the CountSketch matrix, written out
    dense[torch.arange(d), torch.arange(d) % 64] = _signs(d, 5, x.device).double()
    assert torch.allclose(sketch(x, 64, seed=5), x @ dense, rtol=0, atol=1e-12)


def test_sketch_keeps_norms_exactly_in_expectation_and_has_a_gradient():
    x = torch.randn(5, 300, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: sketch(a, 32, 7), (x,))
    norms = torch.stack([sketch(x.detach(), 32, s).square().sum(1) for s in range(300)]).mean(0)
    assert torch.allclose(norms, x.detach().square().sum(1), rtol=0.05)


def test_a_sketch_wider_than_every_layer_is_exact():
    torch.manual_seed(0)
    target, guide = mlp(), cnn()
    x = images()
    exact, _ = similarities(rg.Guidance(target, guide, pairs=PAIRS), x)
    wide, _ = similarities(rg.Guidance(target, guide, pairs=PAIRS, sketch_dim=512), x)
    assert torch.equal(exact, wide)


def test_a_narrow_sketch_approximates_and_is_the_same_at_every_step():
    torch.manual_seed(0)
    target, guide = mlp().eval(), cnn()
    x = images(32)
    exact, _ = similarities(rg.Guidance(target, guide, pairs=PAIRS).eval(), x)
    guidance = rg.Guidance(target, guide, pairs=PAIRS, sketch_dim=128).eval()
    first, _ = similarities(guidance, x)
    second, _ = similarities(guidance, x)
    assert torch.allclose(first, second, atol=1e-6)  # the same projection (to rounding)
    assert not torch.allclose(first, exact, atol=1e-3)
    assert (first - exact).abs().max() < 0.1


def _dense_sketch(d: int, dim: int, seed: int) -> torch.Tensor:
    """The CountSketch of width ``dim`` as a (d, dim) float64 matrix, written out."""
    from repguide.similarity.sketching import _signs

    dense = torch.zeros(d, dim, dtype=torch.float64)
    dense[torch.arange(d), torch.arange(d) % dim] = _signs(d, seed, torch.device("cpu")).double()
    return dense


@pytest.mark.parametrize("d, layers", [(96, False), (100, False), (4 * 25, True)])  # dim 32 divides d or not
def test_the_stack_s_own_sketch_against_float64(d, layers):
    """linear_cka_loss with signs: each row sketched inside the node (padded, signed, summed), its
    loss, similarities and gradient those of float64 CKA of x @ S (S the dense CountSketch)."""
    from repguide.similarity.fused import linear_cka_loss
    from repguide.similarity.sketching import stacked_signs

    torch.manual_seed(3)
    shape = (12, 4, d // 4) if layers else (12, d)
    xs = [(torch.randn(*shape) + 2.0).requires_grad_() for _ in range(3)]
    if layers:  # non-contiguous activations of one shape, as a batch-first RNN's
        xs = [x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for x in xs]
    guides = [torch.randn(12, 5) @ torch.randn(5, 9) for _ in range(3)]
    units = torch.stack([fused.unit_centred_gram(g)[0] for g in guides])
    w, seeds = torch.tensor([1.0, 0.5, 2.0]), (11, 12, 13)
    signs = stacked_signs(seeds, d, 32, torch.float32, torch.device("cpu"))
    loss, sims = linear_cka_loss(xs, units, w, (-w).view(-1, 1, 1), 3.5, layers, signs)
    sketched = [x.double().reshape(12, -1) @ _dense_sketch(d, 32, s) for x, s in zip(xs, seeds)]
    want = torch.stack([rg.cka(x, g.double()) for x, g in zip(sketched, guides)])
    want_loss = (w.double() * (1 - want)).sum()
    assert torch.allclose(sims.double(), want, rtol=1e-6, atol=0)
    assert abs(loss.item() - want_loss.item()) <= 1e-6 * want_loss.item()
    for grad, want_grad in zip(torch.autograd.grad(loss + sims.sum(), xs),
                               torch.autograd.grad(want_loss + want.sum(), xs)):
        assert grad.shape == want_grad.shape
        assert torch.allclose(grad, want_grad, rtol=1e-4, atol=1e-6 * want_grad.abs().max().item())


def test_a_sketched_guided_step_equals_float64_cka_of_the_sketched_layers():
    """Guidance(sketch_dim=...) on two non-contiguous target layers of one shape (sketched by the
    stack) and on ones of different widths (each sketched alone): every similarity is float64 CKA
    of the layers through their fixed sketches, and the stack's path needs no copy of a layer."""
    from repguide.guidance._compute import sketch_seed

    torch.manual_seed(0)
    x = torch.randn(10, 7, 6)
    guide = nn.Sequential(nn.Linear(6, 40), nn.Tanh(), nn.Linear(40, 40), nn.Tanh()).eval()
    from test_sync_free import _BatchFirstView

    target = nn.Sequential(_BatchFirstView(False), nn.Identity(), nn.Flatten(), nn.Linear(35, 50))
    for pairs in ([("0", "1"), ("1", "3")], [("0", "1"), ("3", "3")]):
        guidance = rg.Guidance(target, guide, pairs=pairs, sketch_dim=16)
        out = guidance(x)
        t_acts = {"0": target[0](x), "1": target[0](x), "3": target(x)}
        g_acts = {"1": guide[:2](x), "3": guide(x)}
        for t_name, g_name in pairs:
            t = t_acts[t_name].reshape(10, -1).double()
            g = g_acts[g_name].reshape(10, -1).double()
            t = t @ _dense_sketch(t.shape[1], 16, sketch_seed(0, "target", t_name))
            g = g @ _dense_sketch(g.shape[1], 16, sketch_seed(0, "guide", g_name))
            assert abs(out.similarities[(t_name, g_name)].item() - rg.cka(t, g).item()) <= 1e-6
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in target.parameters() if p.grad is not None)


@pytest.mark.parametrize("bad", [0, -3, True, 2.5, "1024"])
def test_bad_sketch_dim_is_an_error(bad):
    with pytest.raises(ValueError, match="sketch_dim"):
        rg.Guidance(mlp(), cnn(), pairs=PAIRS, sketch_dim=bad)


# --------------------------------------------------------------------------------------------
# Guide-feature cache


def test_guide_cache_replaces_the_guide_forward_once_every_example_is_stored():
    torch.manual_seed(0)
    target, guide = mlp(), CountForwards(cnn())
    data = images(48)
    pairs = [("1", "model.0"), ("4", "model.3")]
    exact = rg.Guidance(target, guide, pairs=pairs)
    cache = GuideFeatureCache(len(data))
    cached = rg.Guidance(target, guide, pairs=pairs, guide_cache=cache)
    batches = [torch.arange(0, 16), torch.arange(16, 32), torch.arange(32, 48)]
    for index in batches:  # first epoch: the guide runs and fills the cache
        cached(data[index], guide_index=index)
    assert cache.complete
    filled = guide.calls
    for index in [torch.tensor([5, 40, 17, 2, 33, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 47])] + batches:
        got = cached(data[index], guide_index=index)
        calls = guide.calls
        want = exact(data[index])
        guide.calls = calls
        for key in want.similarities:
            assert torch.allclose(got.similarities[key], want.similarities[key], atol=1e-6)
    assert guide.calls == filled
    got.loss.backward()
    assert all(p.grad is None for p in guide.parameters())


def test_guide_cache_in_bf16_stays_close_and_sketched_cache_matches_sketched_guidance():
    torch.manual_seed(0)
    target, guide = mlp().eval(), cnn()
    data, index = images(32), torch.arange(32)
    exact, _ = similarities(rg.Guidance(target, guide, pairs=PAIRS).eval(), data)
    bf16 = rg.Guidance(target, guide, pairs=PAIRS, guide_cache=GuideFeatureCache(32, dtype=torch.bfloat16)).eval()
    similarities(bf16, data, guide_index=index)
    stored, _ = similarities(bf16, data, guide_index=index)
    assert bf16.guide_cache.features["0"].dtype == torch.bfloat16
    assert torch.allclose(stored, exact, atol=1e-2)
    sketched, _ = similarities(rg.Guidance(target, guide, pairs=PAIRS, sketch_dim=64).eval(), data)
    cached = rg.Guidance(target, guide, pairs=PAIRS, sketch_dim=64, guide_cache=GuideFeatureCache(32)).eval()
    similarities(cached, data, guide_index=index)
    from_cache, _ = similarities(cached, data, guide_index=index)
    assert cached.guide_cache.features["0"].shape == (32, 64)
    assert torch.allclose(from_cache, sketched, atol=1e-6)


def test_guide_cache_misuse_is_an_error():
    data, index = images(16), torch.arange(16)
    with pytest.raises(ValueError, match="guide_index"):
        rg.Guidance(mlp(), cnn(), pairs=PAIRS)(data, guide_index=index)
    with pytest.raises(ValueError, match="guide_index"):
        rg.Guidance(mlp(), cnn(), pairs=PAIRS, guide_cache=GuideFeatureCache(16))(data)
    with pytest.raises(ValueError, match="guide_input='same'"):
        rg.Guidance(mlp(), cnn(), pairs=PAIRS, guide_input="noise", guide_cache=GuideFeatureCache(16))
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        rg.Guidance(mlp(), cnn(), pairs=PAIRS, guide_cache=GuideFeatureCache(8))(data, guide_index=index)
    cache = GuideFeatureCache(16)
    rg.Guidance(mlp(), cnn(), pairs=PAIRS, guide_cache=cache)(data, guide_index=index)
    with pytest.raises(ValueError, match="one cache per Guidance"):
        rg.Guidance(mlp(), cnn(), pairs=PAIRS, sketch_dim=64, guide_cache=cache)(data, guide_index=index)
    with pytest.raises(ValueError, match="num_examples"):
        GuideFeatureCache(0)
