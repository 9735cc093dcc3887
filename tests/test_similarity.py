"""Tests for repguide.similarity, written from the definitions (see tests/_reference.py).

The references are slow, explicit float64 implementations; the library is never consulted to
compute an expected value.
"""

from __future__ import annotations

import math
import os
import sys
import uuid
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(__file__))
import _reference as R  # noqa: E402

import repguide as rg  # noqa: E402
from repguide import similarity as S  # noqa: E402

MEASURES = ["cka", "cka_rbf", "cka_unbiased", "procrustes", "rsa"]
BOUNDED_01 = ["cka", "cka_rbf", "procrustes"]
BOUNDED_PM1 = ["rsa", "cka_unbiased"]
TEST_PREFIX = "_test_registered_"  # names this file adds to the registry

HYP = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # every tensor here is tiny: one intra-op thread is fastest and avoids oversubscription
    # when the machine is busy; restored afterwards for other test modules
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _measure(name):
    return S.get_measure(name)


def _val(t) -> float:
    return float(t.detach().double().item())


def _tt(a, dtype=torch.float64, requires_grad=False):
    t = torch.as_tensor(np.asarray(a, dtype=np.float64), dtype=torch.float64).to(dtype)
    if requires_grad:
        t.requires_grad_(True)
    return t


def make_pair(seed, n, d1, d2, corr=1.0, noise=0.5):
    """x ~ N(0,1) with uneven column scales; y = corr * x W + noise * N(0,1)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d1)) * rng.uniform(0.5, 2.0, size=d1)
    w = rng.standard_normal((d1, d2)) / math.sqrt(d1)
    y = corr * (x @ w) + noise * rng.standard_normal((n, d2))
    return x, y


def random_orthogonal(seed, d):
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def close(a, b, rtol, atol):
    return abs(a - b) <= atol + rtol * abs(b)


def min_n(name):
    return 4 if name == "cka_unbiased" else 3


# ---------------------------------------------------------------------------------------------
# 0. registry / API surface
# ---------------------------------------------------------------------------------------------


def test_list_measures_is_sorted_and_contains_the_five_builtins():
    names = S.list_measures()
    assert list(names) == sorted(names)
    builtin = [n for n in names if not n.startswith(TEST_PREFIX)]
    assert builtin == MEASURES


@pytest.mark.parametrize("name", MEASURES)
def test_get_measure_returns_callable_giving_0dim_tensor(name):
    x, y = make_pair(0, 10, 4, 3)
    v = _measure(name)(_tt(x), _tt(y))
    assert isinstance(v, torch.Tensor)
    assert v.dim() == 0
    assert v.dtype == torch.float64


def test_get_measure_unknown_name_raises_value_error_listing_names():
    with pytest.raises(ValueError) as ei:
        S.get_measure("no_such_measure_xyz")
    msg = str(ei.value)
    for name in MEASURES:
        assert name in msg


@pytest.fixture
def restore_registry():
    # registering test measures must not leak into other tests (list_measures() equality)
    with S.MEASURES.restore_on_exit():
        yield


def test_register_measure_function_and_duplicate_name_raises(restore_registry):
    name = TEST_PREFIX + "fn_" + uuid.uuid4().hex[:8]

    @S.register_measure(name)
    def my_measure(x, y):
        return (x.mean() - y.mean()).abs() * 0 + 0.25

    assert name in S.list_measures()
    x, y = make_pair(1, 6, 3, 3)
    v = S.get_measure(name)(_tt(x), _tt(y))
    assert _val(v) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        S.register_measure(name)(my_measure)


def test_register_measure_class_with_call(restore_registry):
    name = TEST_PREFIX + "cls_" + uuid.uuid4().hex[:8]

    @S.register_measure(name)
    class MyMeasure:
        def __call__(self, x, y):
            return torch.zeros((), dtype=x.dtype) + 0.5

    assert name in S.list_measures()
    x, y = make_pair(1, 6, 3, 3)
    v = S.get_measure(name)(_tt(x), _tt(y))
    assert isinstance(v, torch.Tensor)
    assert _val(v) == pytest.approx(0.5)


@pytest.mark.parametrize("name", MEASURES)
def test_registering_a_builtin_name_again_raises(name, restore_registry):
    with pytest.raises(ValueError):

        @S.register_measure(name)
        def dup(x, y):  # pragma: no cover - never called
            return x.sum() * 0

    # the builtin is untouched
    x, y = make_pair(2, 8, 3, 3)
    assert close(_val(_measure(name)(_tt(x), _tt(y))), R.reference(name, x, y), 1e-5, 1e-10)


@pytest.mark.parametrize("name", MEASURES)
def test_similarity_convenience_matches_get_measure(name):
    x, y = make_pair(3, 12, 5, 4)
    a = _val(S.similarity(_tt(x), _tt(y), measure=name))
    b = _val(_measure(name)(_tt(x), _tt(y)))
    assert a == pytest.approx(b, rel=1e-12, abs=1e-14)


def test_similarity_default_measure_is_linear_cka():
    x, y = make_pair(4, 12, 5, 4)
    assert close(_val(S.similarity(_tt(x), _tt(y))), R.ref_cka(x, y), 1e-5, 1e-10)


@pytest.mark.parametrize(
    "kwargs,ref",
    [
        ({}, lambda x, y: R.ref_cka(x, y)),
        ({"estimator": "biased", "kernel": "linear"}, lambda x, y: R.ref_cka(x, y)),
        ({"estimator": "unbiased"}, lambda x, y: R.ref_cka_unbiased(x, y)),
        ({"kernel": "rbf"}, lambda x, y: R.ref_cka_rbf(x, y)),
        ({"kernel": "rbf", "bandwidth": 0.5}, lambda x, y: R.ref_cka_rbf(x, y, bandwidth=0.5)),
        ({"kernel": "rbf", "bandwidth": 3.0}, lambda x, y: R.ref_cka_rbf(x, y, bandwidth=3.0)),
    ],
)
def test_rg_cka_options_match_reference(kwargs, ref):
    x, y = make_pair(5, 15, 6, 4)
    v = rg.cka(_tt(x), _tt(y), **kwargs)
    assert v.dim() == 0
    assert close(_val(v), ref(x, y), 1e-5, 1e-10)


@pytest.mark.parametrize("bandwidth", [0.25, 0.5, 2.0])
def test_cka_rbf_bandwidth_keyword_via_similarity(bandwidth):
    x, y = make_pair(6, 15, 6, 4)
    v = S.similarity(_tt(x), _tt(y), measure="cka_rbf", bandwidth=bandwidth)
    assert close(_val(v), R.ref_cka_rbf(x, y, bandwidth=bandwidth), 1e-5, 1e-10)


@pytest.mark.parametrize("kwargs", [{"estimator": "bogus"}, {"kernel": "bogus"}])
def test_rg_cka_rejects_unknown_estimator_or_kernel(kwargs):
    x, y = make_pair(7, 8, 3, 3)
    with pytest.raises(ValueError):
        rg.cka(_tt(x), _tt(y), **kwargs)


# ---------------------------------------------------------------------------------------------
# 1. agreement with the float64 references
# ---------------------------------------------------------------------------------------------

SHAPES = [
    (8, 300, 300),
    (8, 2000, 50),
    (8, 40, 2000),
    (300, 5, 5),
    (300, 5, 7),
    (20, 10, 3),
    (6, 4, 5),
    (50, 50, 50),
    (4, 3, 2),
    (33, 1, 1),
]


@pytest.mark.parametrize("kind", ["correlated", "independent"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "n%d_d%d_d%d" % s)
@pytest.mark.parametrize("name", MEASURES)
def test_measure_matches_float64_reference(name, shape, kind):
    n, d1, d2 = shape
    if n < min_n(name):
        pytest.skip("measure needs more rows")
    seed = zlib.crc32(f"{n},{d1},{d2},{kind}".encode())
    x, y = make_pair(seed, n, d1, d2, corr=1.0 if kind == "correlated" else 0.0, noise=0.5)
    ref = R.reference(name, x, y)
    # float64 input: float64 result, 1e-5 relative
    v64 = _measure(name)(_tt(x), _tt(y))
    assert v64.dtype == torch.float64 and v64.dim() == 0
    assert close(_val(v64), ref, 1e-5, 1e-10), (_val(v64), ref)
    # float32 input: float32 result, 1e-4 against the reference on the float32-rounded data
    x32, y32 = _tt(x, torch.float32), _tt(y, torch.float32)
    ref32 = R.reference(name, x32, y32)
    v32 = _measure(name)(x32, y32)
    assert v32.dtype == torch.float32 and v32.dim() == 0
    assert close(_val(v32), ref32, 1e-4, 1e-4), (_val(v32), ref32)


def test_correlated_inputs_give_values_well_away_from_zero():
    # guards the reference test above against comparing only near-zero numbers
    x, y = make_pair(11, 50, 10, 8, corr=1.0, noise=0.2)
    for name in MEASURES:
        assert R.reference(name, x, y) > 0.3, name
        assert _val(_measure(name)(_tt(x), _tt(y))) > 0.3, name


def test_procrustes_reference_forms_agree():
    # the nuclear-norm form equals 1 - d^2/2 with d the orthogonal Procrustes distance
    for seed, shape in enumerate([(10, 4, 6), (7, 9, 3), (30, 5, 5)]):
        x, y = make_pair(seed, *shape)
        assert R.ref_procrustes(x, y) == pytest.approx(R.ref_procrustes_distance_form(x, y), abs=1e-12)
        v = _val(_measure("procrustes")(_tt(x), _tt(y)))
        assert close(v, R.ref_procrustes_distance_form(x, y), 1e-5, 1e-10)


# ---------------------------------------------------------------------------------------------
# 2. golden values (computed once with tests/_reference.py; a refactor that changes them fails)
# ---------------------------------------------------------------------------------------------


def golden_inputs():
    n, d1, d2 = 10, 6, 4
    i = np.arange(n)[:, None]
    x = np.sin(0.9 * i + 1.7 * np.arange(d1)[None, :] + 0.3 * i * np.arange(d1)[None, :])
    y = np.cos(1.1 * i - 0.6 * np.arange(d2)[None, :]) + 0.5 * x[:, :d2] ** 2
    return x, y


GOLDEN = {
    ("cka", ()): 0.28733805984202676,
    ("cka_rbf", ()): 0.3846066062061841,
    ("cka_unbiased", ()): 0.0662971178972911,
    ("procrustes", ()): 0.4750709108453414,
    ("rsa", ()): -0.12519923720046888,
    ("cka_rbf", (("bandwidth", 0.5),)): 0.5522431391447188,
    ("cka_rbf", (("bandwidth", 2.0),)): 0.3144885604985062,
}


@pytest.mark.parametrize("key", list(GOLDEN), ids=lambda k: k[0] + "".join(f"_{a}{b}" for a, b in k[1]))
def test_golden_values(key):
    name, kw = key
    x, y = golden_inputs()
    expected = GOLDEN[key]
    # the reference itself still produces the literal
    assert R.reference(name, x, y, **dict(kw)) == pytest.approx(expected, rel=1e-12)
    v = S.similarity(_tt(x), _tt(y), measure=name, **dict(kw))
    assert close(_val(v), expected, 1e-6, 1e-12), (_val(v), expected)
    v32 = S.similarity(_tt(x, torch.float32), _tt(y, torch.float32), measure=name, **dict(kw))
    assert close(_val(v32), expected, 1e-4, 1e-5), (_val(v32), expected)


# ---------------------------------------------------------------------------------------------
# 3. properties (hypothesis)
# ---------------------------------------------------------------------------------------------


@st.composite
def pair_params(draw, min_rows=5, max_rows=24):
    n = draw(st.integers(min_rows, max_rows))
    d1 = draw(st.integers(1, 12))
    d2 = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    corr = draw(st.sampled_from([0.0, 0.3, 1.0, 3.0]))
    scale = 10.0 ** draw(st.integers(-3, 3))
    return n, d1, d2, seed, corr, scale


def _pair_from(params):
    n, d1, d2, seed, corr, scale = params
    x, y = make_pair(seed, n, d1, d2, corr=corr, noise=0.5)
    return x * scale, y


@pytest.mark.parametrize("name", MEASURES)
@settings(max_examples=50, **HYP)
@given(params=pair_params())
def test_measure_is_symmetric(name, params):
    x, y = _pair_from(params)
    m = _measure(name)
    a = _val(m(_tt(x), _tt(y)))
    b = _val(m(_tt(y), _tt(x)))
    assert abs(a - b) <= 1e-7, (a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", MEASURES)
@settings(max_examples=50, **HYP)
@given(params=pair_params(), same=st.booleans())
def test_measure_is_within_bounds(name, dtype, params, same):
    x, y = _pair_from(params)
    if same:
        y = x
    v = _val(_measure(name)(_tt(x, dtype), _tt(y, dtype)))
    lo = 0.0 if name in BOUNDED_01 else -1.0
    assert lo - 1e-5 <= v <= 1.0 + 1e-5, v


@pytest.mark.parametrize("name", MEASURES)
@settings(max_examples=50, **HYP)
@given(params=pair_params(), log_c=st.floats(-3.0, 3.0), which=st.sampled_from(["x", "y", "both"]))
def test_measure_is_invariant_to_isotropic_scaling(name, params, log_c, which):
    x, y = _pair_from(params)
    c = 10.0**log_c
    m = _measure(name)
    base = _val(m(_tt(x), _tt(y)))
    xs = x * c if which in ("x", "both") else x
    ys = y * c if which in ("y", "both") else y
    v = _val(m(_tt(xs), _tt(ys)))
    assert abs(v - base) <= 1e-5, (v, base)


@pytest.mark.parametrize("name", MEASURES)
@settings(max_examples=50, **HYP)
@given(params=pair_params(), qseed=st.integers(0, 2**31 - 1), both=st.booleans())
def test_measure_is_invariant_to_orthogonal_transform(name, params, qseed, both):
    x, y = _pair_from(params)
    m = _measure(name)
    base = _val(m(_tt(x), _tt(y)))
    xq = x @ random_orthogonal(qseed, x.shape[1])
    yq = y @ random_orthogonal(qseed + 1, y.shape[1]) if both else y
    v = _val(m(_tt(xq), _tt(yq)))
    assert abs(v - base) <= 1e-5, (v, base)


@pytest.mark.parametrize("name", MEASURES)
@settings(max_examples=50, **HYP)
@given(params=pair_params(), bseed=st.integers(0, 2**31 - 1), log_b=st.floats(-2.0, 2.0))
def test_measure_is_invariant_to_translation(name, params, bseed, log_b):
    x, y = _pair_from(params)
    rng = np.random.default_rng(bseed)
    spread = float(np.abs(x).max())
    bx = rng.standard_normal(x.shape[1]) * spread * 10.0**log_b
    by = rng.standard_normal(y.shape[1]) * float(np.abs(y).max()) * 10.0**log_b
    m = _measure(name)
    base = _val(m(_tt(x), _tt(y)))
    v = _val(m(_tt(x + bx), _tt(y + by)))
    assert abs(v - base) <= 1e-5, (v, base)


@pytest.mark.parametrize("name", MEASURES)
@settings(max_examples=50, **HYP)
@given(params=pair_params())
def test_measure_of_input_with_itself_is_one(name, params):
    x, _ = _pair_from(params)
    v = _val(_measure(name)(_tt(x), _tt(x)))
    assert abs(v - 1.0) <= 1e-5, v


@pytest.mark.parametrize("name", MEASURES)
@pytest.mark.parametrize("shape", [(10, 3), (40, 20), (6, 50)])
def test_measure_of_float32_input_with_itself_is_one(name, shape):
    x, _ = make_pair(sum(shape), shape[0], shape[1], 1)
    v = _measure(name)(_tt(x, torch.float32), _tt(x, torch.float32))
    assert v.dtype == torch.float32
    assert abs(_val(v) - 1.0) <= 1e-4, _val(v)


@pytest.mark.parametrize("name", MEASURES)
def test_independent_noise_scores_lower_than_shared_structure(name):
    x, y_rel = make_pair(21, 40, 8, 6, corr=1.0, noise=0.1)
    _, y_ind = make_pair(22, 40, 8, 6, corr=0.0, noise=1.0)
    m = _measure(name)
    assert _val(m(_tt(x), _tt(y_rel))) > _val(m(_tt(x), _tt(y_ind))) + 0.1


# ---------------------------------------------------------------------------------------------
# 4. gradients
# ---------------------------------------------------------------------------------------------


def _gradcheck(name, n, d1, d2, seed):
    x, y = make_pair(seed, n, d1, d2, corr=1.0, noise=0.7)
    xt = _tt(x, requires_grad=True)
    yt = _tt(y, requires_grad=True)
    assert torch.autograd.gradcheck(_measure(name), (xt, yt), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", MEASURES)
def test_gradcheck_small(name, seed):
    _gradcheck(name, 6, 4, 5, seed)


@pytest.mark.parametrize(
    "shape", [(5, 12, 12), (5, 12, 7), (12, 3, 3), (12, 3, 2), (7, 2, 30)], ids=lambda s: "n%d_d%d_d%d" % s
)
@pytest.mark.parametrize("name", ["cka", "cka_unbiased"])
def test_gradcheck_linear_cka_wide_and_tall(name, shape):
    _gradcheck(name, *shape, seed=3)


@pytest.mark.parametrize("shape", [(5, 12, 9), (12, 3, 2)], ids=lambda s: "n%d_d%d_d%d" % s)
@pytest.mark.parametrize("name", ["cka_rbf", "procrustes", "rsa"])
def test_gradcheck_other_measures_wide_and_tall(name, shape):
    _gradcheck(name, *shape, seed=4)


SWITCH_DS = [16, 32, 48, 63, 64, 65, 96, 128, 256]


@pytest.mark.parametrize("d1", SWITCH_DS)
@pytest.mark.parametrize("name", ["cka", "cka_unbiased"])
def test_linear_cka_value_and_gradient_are_consistent_around_gram_feature_switch(name, d1):
    n = 64
    torch_ref = R.torch_ref_cka if name == "cka" else R.torch_ref_cka_unbiased
    for d2 in (d1, 64, max(1, d1 // 2)):
        x, y = make_pair(1000 + d1 * 7 + d2, n, d1, d2, corr=1.0, noise=0.7)
        ref = R.reference(name, x, y)
        xt, yt = _tt(x, requires_grad=True), _tt(y, requires_grad=True)
        v = _measure(name)(xt, yt)
        assert close(_val(v), ref, 1e-5, 1e-10), (d1, d2, _val(v), ref)
        gx, gy = torch.autograd.grad(v, (xt, yt))
        xr, yr = _tt(x, requires_grad=True), _tt(y, requires_grad=True)
        rx, ry = torch.autograd.grad(torch_ref(xr, yr), (xr, yr))
        for g, r in ((gx, rx), (gy, ry)):
            assert torch.allclose(g, r, rtol=1e-6, atol=1e-9 * float(r.abs().max())), (d1, d2)
        v32 = _measure(name)(_tt(x, torch.float32), _tt(y, torch.float32))
        assert close(_val(v32), R.reference(name, x.astype(np.float32), y.astype(np.float32)), 1e-4, 1e-4)


# ---------------------------------------------------------------------------------------------
# 5. robustness
# ---------------------------------------------------------------------------------------------

ALL_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
DT_IDS = ["f16", "bf16", "f32", "f64"]


def _result_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grads_finite(name, x, y):
    x = x.detach().clone().requires_grad_(True)
    y = y.detach().clone().requires_grad_(True)
    v = _measure(name)(x, y)
    gx, gy = torch.autograd.grad(v, (x, y), allow_unused=True)
    for g in (gx, gy):
        if g is not None:
            assert torch.isfinite(g).all(), g
    return v


@pytest.mark.parametrize("which", ["x", "y", "both"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("name", MEASURES)
def test_constant_input_gives_exactly_zero_with_finite_gradients(name, dtype, which):
    x, y = make_pair(31, 9, 4, 3)
    rng = np.random.default_rng(5)
    if which in ("x", "both"):
        x = np.tile(rng.standard_normal((1, 4)) * 3.0, (9, 1))
    if which in ("y", "both"):
        y = np.tile(rng.standard_normal((1, 3)) * 3.0, (9, 1))
    v = _grads_finite(name, _tt(x, dtype), _tt(y, dtype))
    assert v.dim() == 0
    assert v.dtype == _result_dtype(dtype)
    assert torch.isfinite(v)
    assert _val(v) == 0.0


@pytest.mark.parametrize("name", MEASURES)
def test_constant_input_with_itself_gives_zero(name):
    x = np.tile(np.array([[1.5, -2.0, 0.25]]), (7, 1))
    v = _grads_finite(name, _tt(x), _tt(x))
    assert _val(v) == 0.0


@pytest.mark.parametrize("name", MEASURES)
def test_all_zero_input_gives_zero(name):
    x = np.zeros((8, 5))
    _, y = make_pair(3, 8, 5, 4)
    v = _grads_finite(name, _tt(x, torch.float32), _tt(y, torch.float32))
    assert _val(v) == 0.0


@pytest.mark.parametrize("which", ["x", "both"])
@pytest.mark.parametrize("scale", [1e-20, 1e20], ids=["tiny", "huge"])
@pytest.mark.parametrize("name", MEASURES)
def test_tiny_and_huge_float32_inputs_match_unit_scale(name, scale, which):
    x, y = make_pair(41, 12, 6, 5, corr=1.0, noise=0.5)
    base = _val(_measure(name)(_tt(x, torch.float32), _tt(y, torch.float32)))
    xs = _tt(x, torch.float32) * scale
    ys = _tt(y, torch.float32) * (scale if which == "both" else 1.0)
    assert torch.isfinite(xs).all() and (xs != 0).all()
    v = _grads_finite(name, xs, ys)
    assert v.dtype == torch.float32
    assert torch.isfinite(v)
    assert abs(_val(v) - base) <= 1e-4, (_val(v), base)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("name", MEASURES)
def test_half_precision_inputs_are_measured_in_float32(name, dtype):
    x, y = make_pair(51, 32, 16, 8, corr=1.0, noise=0.5)
    x32, y32 = _tt(x, torch.float32), _tt(y, torch.float32)
    xh, yh = x32.to(dtype), y32.to(dtype)
    v = _grads_finite(name, xh, yh)
    assert v.dtype == torch.float32 and v.dim() == 0
    assert torch.isfinite(v)
    # close to the float32 value of the unrounded data ...
    full = _val(_measure(name)(x32, y32))
    assert abs(_val(v) - full) <= 1e-2, (_val(v), full)
    # ... and (computation in float32) equal to the reference on the half-rounded values
    ref = R.reference(name, xh.float(), yh.float())
    assert abs(_val(v) - ref) <= 1e-4, (_val(v), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", MEASURES)
def test_one_constant_column_gives_normal_value(name, dtype):
    x, y = make_pair(61, 15, 6, 5, corr=1.0, noise=0.5)
    x[:, 2] = 5.0
    y[:, 0] = -1.0
    v = _grads_finite(name, _tt(x, dtype), _tt(y, dtype))
    ref = R.reference(name, _tt(x, dtype), _tt(y, dtype))
    if dtype == torch.float64:
        assert close(_val(v), ref, 1e-5, 1e-10), (_val(v), ref)
    else:
        assert close(_val(v), ref, 1e-4, 1e-4), (_val(v), ref)
    assert abs(ref) > 0.05


def test_rbf_with_majority_duplicate_rows_is_finite():
    # > half of all pairs are identical rows, so the median squared distance is 0
    rng = np.random.default_rng(0)
    base = rng.standard_normal((3, 4))
    x = base[[0] * 8 + [1, 2]]
    y = rng.standard_normal((10, 3))
    for dtype in (torch.float32, torch.float64):
        v = _grads_finite("cka_rbf", _tt(x, dtype), _tt(y, dtype))
        assert torch.isfinite(v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    "n,d1,d2,dups",
    [(4, 11, 2, 3), (4, 11, 1, 3), (6, 5, 3, 5), (8, 6, 4, 7), (10, 12, 5, 8)],
)
@pytest.mark.parametrize("name", MEASURES)
def test_duplicate_rows_give_finite_gradients(name, n, d1, d2, dups, dtype):
    # `dups` identical rows plus distinct ones: x is rank-deficient after centering (a realistic
    # batch with repeated examples). The value must match the reference, the gradient be finite.
    rng = np.random.default_rng(n * 100 + d1 * 10 + d2)
    x = np.vstack([np.tile(rng.standard_normal((1, d1)), (dups, 1)), rng.standard_normal((n - dups, d1))])
    y = rng.standard_normal((n, d2))
    if name == "cka_rbf" and dups * (dups - 1) // 2 > (n * (n - 1) // 2 - 1) // 2:
        pytest.skip("median squared distance is 0: value unspecified (finiteness fuzzed elsewhere)")
    v = _grads_finite(name, _tt(x, dtype), _tt(y, dtype))
    assert torch.isfinite(v)
    ref = R.reference(name, _tt(x, dtype), _tt(y, dtype))
    if not math.isfinite(ref):
        # e.g. unbiased HSIC(K, K) is exactly 0 when all rows but one coincide: 0/0, undefined
        return
    tol = 1e-5 if dtype == torch.float64 else 1e-4
    assert close(_val(v), ref, tol, tol), (_val(v), ref)


@pytest.mark.parametrize("n,d1,dups", [(4, 11, 3), (6, 5, 5), (10, 12, 8), (9, 3, 4)])
def test_procrustes_gradient_matches_reference_when_one_side_is_a_single_feature(n, d1, dups):
    # With d2 = 1, Xn^T Yn is a vector and its nuclear norm is its (smooth) 2-norm, so the gradient
    # is unique even though x (with duplicated rows) is rank-deficient.
    rng = np.random.default_rng(7 * n + d1)
    x = np.vstack([np.tile(rng.standard_normal((1, d1)), (dups, 1)), rng.standard_normal((n - dups, d1))])
    y = rng.standard_normal((n, 1))
    xt, yt = _tt(x, requires_grad=True), _tt(y, requires_grad=True)
    gx, gy = torch.autograd.grad(_measure("procrustes")(xt, yt), (xt, yt))
    xr, yr = _tt(x, requires_grad=True), _tt(y, requires_grad=True)
    rx, ry = torch.autograd.grad(R.torch_ref_procrustes(xr, yr), (xr, yr))
    for g, r in ((gx, rx), (gy, ry)):
        assert torch.allclose(g, r, rtol=1e-6, atol=1e-9 * float(r.abs().max())), (g, r)


@pytest.mark.parametrize("shape", [(6, 4, 5), (5, 12, 9), (30, 3, 7)], ids=lambda s: "n%d_d%d_d%d" % s)
def test_procrustes_gradient_matches_svd_reference(shape):
    x, y = make_pair(8, *shape, corr=1.0, noise=0.7)
    xt, yt = _tt(x, requires_grad=True), _tt(y, requires_grad=True)
    gx, gy = torch.autograd.grad(_measure("procrustes")(xt, yt), (xt, yt))
    xr, yr = _tt(x, requires_grad=True), _tt(y, requires_grad=True)
    rx, ry = torch.autograd.grad(R.torch_ref_procrustes(xr, yr), (xr, yr))
    for g, r in ((gx, rx), (gy, ry)):
        assert torch.allclose(g, r, rtol=1e-6, atol=1e-9 * float(r.abs().max()))


# fuzz -----------------------------------------------------------------------------------------

_SCALE_RANGE = {torch.float16: (-3, 2), torch.bfloat16: (-10, 10), torch.float32: (-20, 20), torch.float64: (-20, 20)}
_KINDS = ["gaussian", "lowrank", "dup_rows", "integer", "constant_x", "const_col", "outlier"]


@st.composite
def fuzz_case(draw):
    n = draw(st.integers(4, 40))
    d1 = draw(st.integers(1, 50))
    d2 = draw(st.integers(1, 50))
    dtype = draw(st.sampled_from(ALL_DTYPES))
    lo, hi = _SCALE_RANGE[dtype]
    k = draw(st.integers(lo, hi))
    kind = draw(st.sampled_from(_KINDS))
    seed = draw(st.integers(0, 2**31 - 1))
    return n, d1, d2, dtype, k, kind, seed


def _fuzz_inputs(case):
    n, d1, d2, dtype, k, kind, seed = case
    rng = np.random.default_rng(seed)
    x, y = make_pair(seed, n, d1, d2, corr=float(rng.choice([0.0, 1.0])), noise=0.5)
    if kind == "lowrank":
        x = rng.standard_normal((n, 1)) @ rng.standard_normal((1, d1))
    elif kind == "dup_rows":
        rows = rng.standard_normal((3, d1))
        x = rows[rng.choice(3, size=n, p=[0.8, 0.1, 0.1])]
    elif kind == "integer":
        x = rng.integers(-1, 2, size=(n, d1)).astype(np.float64)
    elif kind == "constant_x":
        x = np.tile(rng.standard_normal((1, d1)), (n, 1))
    elif kind == "const_col":
        x[:, 0] = 2.0
    elif kind == "outlier":
        x[0] *= 10.0 if dtype == torch.float16 else 1e3
    s = 10.0**k
    return _tt(x * s, dtype), _tt(y * s, dtype)


def _call_allowing_documented_errors(name, x, y):
    try:
        return _measure(name)(x, y)
    except ValueError:
        n = x.shape[0]
        if name == "cka_unbiased" and n < 4 or name == "rsa" and n < 3:
            return None
        raise


@pytest.mark.parametrize("name", MEASURES)
@settings(max_examples=300, **HYP)
@given(case=fuzz_case())
def test_fuzz_value_is_finite(name, case):
    x, y = _fuzz_inputs(case)
    assert torch.isfinite(x).all() and torch.isfinite(y).all()
    v = _call_allowing_documented_errors(name, x, y)
    assert v is not None
    assert v.dim() == 0
    assert v.dtype == _result_dtype(case[3])
    assert torch.isfinite(v), (case, v)
    if case[5] == "constant_x":
        assert _val(v) == 0.0
    lo = 0.0 if name in BOUNDED_01 else -1.0
    assert lo - 1e-3 <= _val(v) <= 1.0 + 1e-3, (case, _val(v))


@pytest.mark.parametrize("name", MEASURES)
@settings(max_examples=300, **HYP)
@given(case=fuzz_case())
def test_fuzz_gradients_are_finite(name, case):
    x, y = _fuzz_inputs(case)
    # Leaves are float32 (cast to the fuzzed dtype inside the graph), so that a large but finite
    # true gradient is not turned into inf merely by being stored in a float16 .grad.
    dtype = case[3]
    x32 = x.float().requires_grad_(True) if dtype != torch.float64 else x.clone().requires_grad_(True)
    y32 = y.float().requires_grad_(True) if dtype != torch.float64 else y.clone().requires_grad_(True)
    v = _measure(name)(x32.to(dtype), y32.to(dtype))
    assert torch.isfinite(v)
    gx, gy = torch.autograd.grad(v, (x32, y32))
    assert torch.isfinite(gx).all() and torch.isfinite(gy).all(), (case, gx, gy)


# ---------------------------------------------------------------------------------------------
# 6. errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3])
def test_unbiased_with_fewer_than_four_rows_raises_mentioning_4(n):
    x, y = make_pair(0, n, 3, 3)
    with pytest.raises(ValueError, match="4"):
        _measure("cka_unbiased")(_tt(x), _tt(y))
    with pytest.raises(ValueError, match="4"):
        rg.cka(_tt(x), _tt(y), estimator="unbiased")


def test_unbiased_with_four_rows_works():
    x, y = make_pair(0, 4, 3, 3)
    v = _measure("cka_unbiased")(_tt(x), _tt(y))
    assert close(_val(v), R.ref_cka_unbiased(x, y), 1e-5, 1e-10)


def test_rsa_with_two_rows_raises():
    x, y = make_pair(0, 2, 3, 3)
    with pytest.raises(ValueError):
        _measure("rsa")(_tt(x), _tt(y))


@pytest.mark.parametrize("name", MEASURES)
def test_single_row_raises(name):
    with pytest.raises(ValueError):
        _measure(name)(torch.randn(1, 3), torch.randn(1, 4))


@pytest.mark.parametrize("name", MEASURES)
def test_mismatched_rows_raise_value_error_mentioning_shapes(name):
    with pytest.raises(ValueError) as ei:
        _measure(name)(torch.randn(5, 3), torch.randn(7, 2))
    msg = str(ei.value)
    assert "5" in msg and "7" in msg, msg


@pytest.mark.parametrize("bad", ["x1d", "y1d", "x3d", "y3d", "x0d"])
@pytest.mark.parametrize("name", MEASURES)
def test_non_2d_inputs_raise_value_error(name, bad):
    x, y = torch.randn(6, 3), torch.randn(6, 4)
    if bad == "x1d":
        x = torch.randn(6)
    elif bad == "y1d":
        y = torch.randn(6)
    elif bad == "x3d":
        x = torch.randn(6, 3, 2)
    elif bad == "y3d":
        y = torch.randn(6, 4, 2)
    elif bad == "x0d":
        x = torch.tensor(1.0)
    with pytest.raises(ValueError):
        _measure(name)(x, y)


# ---------------------------------------------------------------------------------------------
# 7. autocast
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MEASURES)
def test_measure_under_bf16_autocast_matches_float32(name):
    x, y = make_pair(71, 48, 20, 12, corr=1.0, noise=0.5)
    x32, y32 = _tt(x, torch.float32), _tt(y, torch.float32)
    plain = _measure(name)(x32, y32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = _measure(name)(x32, y32)
    assert v.dtype == torch.float32
    assert close(_val(v), _val(plain), 1e-5, 1e-7), (_val(v), _val(plain))


def test_cka_under_autocast_has_float32_gradient():
    x, y = make_pair(72, 30, 10, 6)
    xt = _tt(x, torch.float32, requires_grad=True)
    yt = _tt(y, torch.float32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = _measure("cka")(xt, yt)
    v.backward()
    assert xt.grad is not None and xt.grad.dtype == torch.float32
    assert torch.isfinite(xt.grad).all()
    xr, yr = _tt(x, requires_grad=True), _tt(y, requires_grad=True)
    (rx,) = torch.autograd.grad(R.torch_ref_cka(xr, yr), (xr,))
    assert torch.allclose(xt.grad.double(), rx, rtol=1e-3, atol=1e-4 * float(rx.abs().max()))


# ---------------------------------------------------------------------------------------------
# 8. the biased estimator's known floor for independent Gaussians
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,expected,tol", [(256, 0.28, 0.03), (16, 0.85, 0.05)])
def test_biased_cka_floor_for_independent_gaussians(n, expected, tol):
    p = 100
    vals = []
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, p, generator=g)
        y = torch.randn(n, p, generator=g)
        vals.append(_val(_measure("cka")(x, y)))
    assert abs(float(np.mean(vals)) - expected) <= tol, vals


def test_unbiased_cka_has_no_floor_for_independent_gaussians():
    vals = []
    for seed in range(5):
        g = torch.Generator().manual_seed(100 + seed)
        x = torch.randn(64, 100, generator=g, dtype=torch.float64)
        y = torch.randn(64, 100, generator=g, dtype=torch.float64)
        vals.append(_val(_measure("cka_unbiased")(x, y)))
    assert abs(float(np.mean(vals))) < 0.05, vals
