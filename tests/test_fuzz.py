"""Property-based fuzzing of capture and of Guidance end to end, over random small models (MLPs, 1-D and
2-D conv nets, RNN/LSTM/GRU and Transformer layers, batch-first or not), batch sizes, input dtypes and
input scales. Every outcome is either a finite, well-shaped result or one of the documented errors.
(The similarity measures have their own fuzz tests in test_similarity.py.)"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from repguide import Guidance
from repguide.capture import REDUCTIONS, Capture, discover, reduce
from repguide.similarity import list_measures

HYP = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# The errors capture and Guidance document for inputs they cannot handle; anything else is a bug.
DOCUMENTED = (
    "the batch axis is ambiguous",  # several axes of the batch size: name one with batch_axes=
    "needs at least",  # fewer examples than the measure needs (n < 4 for unbiased CKA)
    "reduction 'tokens'",  # per-position similarity on layers without (matching) positions
    "the guide failed on the target's inputs",  # e.g. a float64 guide given the target's float32 batch
    "does not match weight dtype",  # torch's own ValueError for such an RNN guide, passed on unchanged
)


def documented(err: ValueError) -> bool:
    found = [text for text in DOCUMENTED if text in str(err)]
    event(f"documented error: {found[0] if found else None}")
    return bool(found)


# --------------------------------------------------------------------------------------------
# Random models. A family fixes the input; every model of a family accepts the same input.


class SequenceModel(nn.Module):
    """Embedding (tokens) or raw features → a recurrent or Transformer layer → mean over time → head."""

    def __init__(self, vocab, features, body, batch_first, classes):
        super().__init__()
        self.embed = nn.Embedding(vocab, features) if vocab else None
        self.body = body
        self.batch_first = batch_first
        width = body.linear1.in_features if isinstance(body, nn.TransformerEncoderLayer) else (
            body.hidden_size * (2 if body.bidirectional else 1)
        )
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x) if self.embed is not None else x  # (n, T, d)
        if not self.batch_first:
            h = h.transpose(0, 1)
        out = self.body(h)
        out = out[0] if isinstance(out, tuple) else out
        return self.head(out.mean(1 if self.batch_first else 0))


@st.composite
def mlp(draw, features):
    layers, width = [], features
    for _ in range(draw(st.integers(1, 3))):
        out = draw(st.integers(1, 9))
        layers.append(nn.Linear(width, out))
        if draw(st.booleans()):
            layers.append(nn.BatchNorm1d(out))
        layers.append(draw(st.sampled_from([nn.ReLU, nn.Tanh, nn.GELU, nn.Identity]))())
        if draw(st.booleans()):
            layers.append(nn.Dropout(0.2))
        width = out
    return nn.Sequential(nn.Flatten(), *layers, nn.Linear(width, draw(st.integers(1, 4))))


@st.composite
def convnet(draw, channels, side, dims):
    conv, norm, pool = {1: (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d), 2: (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d)}[dims]
    layers, width = [], channels
    for _ in range(draw(st.integers(1, 3))):
        out = draw(st.integers(1, 6))
        layers.append(conv(width, out, 3, padding=1))
        if draw(st.booleans()):
            layers.append(norm(out))
        layers.append(nn.ReLU())
        if side >= 2 and draw(st.booleans()):
            layers.append(pool(2))
            side //= 2
        width = out
    if draw(st.booleans()):
        head = [nn.Flatten(), nn.Linear(width * side**dims, 3)]
    else:
        head = [nn.AdaptiveAvgPool1d(1) if dims == 1 else nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 3)]
    return nn.Sequential(*layers, *head)


@st.composite
def sequence_model(draw, vocab, features):
    batch_first = draw(st.booleans())
    if draw(st.booleans()):
        heads = draw(st.sampled_from([h for h in (1, 2) if features % h == 0]))
        body = nn.TransformerEncoderLayer(features, heads, draw(st.integers(2, 8)), dropout=0.1, batch_first=batch_first)
    else:
        cell = draw(st.sampled_from([nn.RNN, nn.LSTM, nn.GRU]))
        body = cell(
            features, draw(st.integers(1, 6)), num_layers=draw(st.integers(1, 2)),
            batch_first=batch_first, bidirectional=draw(st.booleans()),
        )
    return SequenceModel(vocab, features, body, batch_first, draw(st.integers(1, 4)))


@st.composite
def family(draw):
    """(input maker ``(n, generator) -> Tensor``, strategy of models that take that input, input dtype)."""
    kind = draw(st.sampled_from(["vector", "conv1d", "conv2d", "tokens", "features_sequence"]))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    scale = draw(st.sampled_from([0.0, 1e-3, 1.0, 30.0]))  # 0: constant inputs
    if dtype in (torch.float16, torch.bfloat16):
        scale = min(scale, 1.0)  # larger inputs overflow half precision inside the models themselves

    def floats(*shape):
        return lambda n, g: (scale * torch.randn(n, *shape, generator=g) + 0.5).to(dtype)

    if kind == "vector":
        features = draw(st.integers(1, 8))
        return floats(features), mlp(features), dtype
    if kind in ("conv1d", "conv2d"):
        dims = 1 if kind == "conv1d" else 2
        channels, side = draw(st.integers(1, 3)), draw(st.integers(1, 6))
        return floats(channels, *[side] * dims), convnet(channels, side, dims), dtype
    length, features = draw(st.integers(1, 5)), draw(st.integers(2, 6))
    if kind == "tokens":
        vocab, token_dtype = draw(st.integers(2, 9)), draw(st.sampled_from([torch.int64, torch.int32]))
        make = lambda n, g: torch.randint(0, vocab, (n, length), generator=g, dtype=token_dtype)  # noqa: E731
        return make, sequence_model(vocab, features), dtype
    return floats(length, features), sequence_model(0, features), dtype


def prepared(model: nn.Module, dtype: torch.dtype, training: bool, n: int) -> nn.Module:
    model = model.to(dtype)
    return model.train(training and n > 1)  # BatchNorm cannot train on one example


def inputs_of(make, n: int, seed: int) -> Tensor:
    return make(n, torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# Capture


@settings(max_examples=120, **HYP)
@given(data=st.data(), fam=family(), n=st.integers(1, 8), training=st.booleans(), seed=st.integers(0, 2**16))
def test_capture_of_random_models_gives_batch_first_activations_of_the_discovered_shapes(data, fam, n, training, seed):
    make, models, dtype = fam
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = prepared(data.draw(models), dtype, training, n)
    x = inputs_of(make, n, seed)
    try:
        infos = discover(model, x, types=data.draw(st.sampled_from(["default", "all"])))
    except ValueError as err:
        assert documented(err), err
        return
    names = [info.name for info in infos]
    assert len(set(names)) == len(names) and names
    assert all(info.shape[0] == n for info in infos)

    capture = Capture(model, names, {info.name: info.batch_axis for info in infos})
    with torch.no_grad(), capture.record(n) as acts:
        model(x)
    capture.check_complete(acts)
    capture.remove()
    for info in infos:
        act = acts[info.name]
        assert tuple(act.shape) == info.shape, info.name
        assert torch.isfinite(act.float()).all(), info.name
        how = data.draw(st.sampled_from(REDUCTIONS))
        if how == "tokens" and act.dim() == 2:
            with pytest.raises(ValueError, match="reduction 'tokens' needs an activation with positions"):
                reduce(act, how)
            continue
        out = reduce(act, how, capture.normalise.channels_first[info.name])
        expected_dims = {"flatten": 2, "mean": 2, "tokens": 3}[how]
        assert out.shape[0] == n and out.dim() == expected_dims
        if how == "flatten":
            assert out.shape[1] == math.prod(act.shape[1:])


# --------------------------------------------------------------------------------------------
# Guidance end to end


@settings(max_examples=100, **HYP)
@given(
    data=st.data(), fam=family(), n=st.integers(1, 9), training=st.booleans(), seed=st.integers(0, 2**16),
    measure=st.sampled_from(sorted(list_measures())), reduction=st.sampled_from(REDUCTIONS),
    weight=st.sampled_from([0.0, 0.5, 1.0]),
)
def test_guidance_of_random_pairs_of_models_is_finite_and_leaves_the_guide_alone(
    data, fam, n, training, seed, measure, reduction, weight
):
    make, models, dtype = fam
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        target = prepared(data.draw(models), dtype, training, n)
        guide_dtype = data.draw(st.sampled_from([dtype, dtype, torch.float64]))
        guide = data.draw(models).to(guide_dtype)
    guide_before = {k: v.clone() for k, v in guide.state_dict().items()}
    x = inputs_of(make, n, seed)
    try:
        guidance = Guidance(target, guide, measure=measure, reduction=reduction, weight=weight, example_input=x)
        guidance.train(target.training)
        out = guidance(x)
        if out.loss.requires_grad:
            out.loss.backward()
    except ValueError as err:
        assert documented(err), err
        return
    assert torch.isfinite(out.loss) and out.loss.dim() == 0
    for key, s in out.similarities.items():
        assert torch.isfinite(s) and s.dim() == 0, key
    assert len(out.similarities) == (len(guidance.pairs) if weight else 0)
    for name, p in target.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    assert all(p.grad is None for p in guide.parameters())
    assert all(torch.equal(v, guide_before[k]) for k, v in guide.state_dict().items())
    if not target.training:  # one target forward, whose output is the target's own
        with torch.no_grad():
            assert torch.equal(out.output.detach(), target(x))
