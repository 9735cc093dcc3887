import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repguide as rg
from repguide.errors import GuidanceError

from _nets import CountForwards, cnn, mlp


def small_cnn():
    return cnn(4)


class LSTMClassifier(nn.Module):
    def __init__(self, vocab=7, dim=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        return self.head(self.lstm(self.emb(x))[0][:, -1])


class EncoderClassifier(nn.Module):
    def __init__(self, vocab=7, dim=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=True), 2, enable_nested_tensor=False
        )
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        return self.head(self.encoder(self.emb(x)).mean(1))


class GRUClassifier(nn.Module):
    def __init__(self, vocab=7, dim=12):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.gru = nn.GRU(dim, dim, num_layers=2, batch_first=True)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        return self.head(self.gru(self.emb(x))[0][:, -1])


def image_batch():
    return torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))


def token_batch():
    return torch.randint(0, 7, (16, 6)), torch.randint(0, 3, (16,))


CASES = {
    "mlp<-cnn": (mlp, small_cnn, image_batch),
    "lstm<-transformer": (LSTMClassifier, EncoderClassifier, token_batch),
    "transformer<-gru": (EncoderClassifier, GRUClassifier, token_batch),
}


@pytest.mark.parametrize("case", list(CASES))
def test_guided_step_trains_the_target_leaves_the_guide_and_runs_the_target_once(case):
    make_target, make_guide, batch = CASES[case]
    torch.manual_seed(0)
    target, guide = CountForwards(make_target()), make_guide()
    x, y = batch()
    guidance = rg.Guidance(target, guide, example_input=x)
    assert len(guidance.pairs) >= 1
    guide_before = {k: v.clone() for k, v in guide.state_dict().items()}
    target_before = [p.detach().clone() for p in target.parameters()]
    optimizer = torch.optim.SGD(guidance.parameters(), lr=0.1)
    target.calls = 0
    for _ in range(3):
        out = guidance(x)
        loss = F.cross_entropy(out.output, y) + out.loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert target.calls == 3
    assert all(torch.equal(guide_before[k], v) for k, v in guide.state_dict().items())
    assert all(p.grad is None for p in guide.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(target_before, target.parameters()))
    assert set(out.similarities) == {p.key for p in guidance.pairs}
    assert all(torch.isfinite(s) and -1 <= s <= 1 + 1e-6 for s in out.similarities.values())


def test_alignment_loss_is_the_weighted_sum_of_one_minus_similarity():
    torch.manual_seed(0)
    x, _ = image_batch()
    guidance = rg.Guidance(mlp(), small_cnn(), pairs=[("1", "0", 2.0), ("4", "3")], weight=0.5)
    out = guidance(x)
    s = out.similarities
    expected = 0.5 * (2.0 * (1 - s[("1", "0")]) + (1 - s[("4", "3")]))
    assert torch.allclose(out.loss, expected)


def test_alignment_gradient_reaches_the_target_only_through_the_paired_layers():
    torch.manual_seed(0)
    target, guide = mlp(), small_cnn()
    x, _ = image_batch()
    guidance = rg.Guidance(target, guide, pairs=[("1", "0")])
    guidance(x).loss.backward()
    assert target[1].weight.grad.abs().sum() > 0
    assert target[4].weight.grad is None and target[7].weight.grad is None


def test_similarities_match_the_measure_on_flattened_activations():
    torch.manual_seed(0)
    target, guide = mlp().eval(), small_cnn()
    x, _ = image_batch()
    guidance = rg.Guidance(target, guide, pairs=[("4", "3")]).eval()
    got = guidance(x).similarities[("4", "3")]
    t = target[:5](x)
    g = guide[:4](x)
    assert torch.allclose(got, rg.cka(t.flatten(1), g.flatten(1)), atol=1e-6)


def test_guide_stays_in_eval_mode_when_guidance_trains():
    guidance = rg.Guidance(mlp(), small_cnn(), pairs=[("1", "0")])
    guidance.train()
    assert guidance.target.training and not guidance.guide.training
    assert not any(p.requires_grad for p in guidance.guide.parameters())


def test_weight_schedule_switches_guidance_off_and_skips_the_guide():
    torch.manual_seed(0)
    guide = CountForwards(small_cnn())
    x, _ = image_batch()
    guidance = rg.Guidance(mlp(), guide, pairs=[("1", "model.0")], weight=rg.OffAfter(1.0, 2), example_input=x)
    guide.calls = 0  # the probing forwards of layer discovery do not count
    weights, losses = [], []
    for _ in range(4):
        out = guidance(x)
        out.output.sum().backward()
        weights.append(out.weight)
        losses.append(float(out.loss.detach()))
    assert weights == [1.0, 1.0, 0.0, 0.0]
    assert losses[2] == losses[3] == 0.0 and losses[0] > 0
    assert guide.calls == 2
    assert int(guidance.step) == 4
    assert "step" in guidance.state_dict()


def test_noise_inputs_are_deterministic_per_step_and_differ_from_the_batch():
    torch.manual_seed(0)
    x, _ = image_batch()
    seen = []
    guide = small_cnn()
    guide.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    guidance = rg.Guidance(mlp(), guide, pairs=[("1", "0")], guide_input="noise", noise_seed=3, example_input=x)
    seen.clear()
    guidance(x)
    guidance.step.zero_()
    guidance(x)
    assert torch.equal(seen[0], seen[1]) and not torch.equal(seen[0], x)
    assert seen[0].shape == x.shape and seen[0].dtype == x.dtype


def test_integer_noise_stays_in_the_observed_token_range():
    torch.manual_seed(0)
    x, _ = token_batch()
    seen = []
    guide = GRUClassifier()
    guide.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    rg.Guidance(LSTMClassifier(), guide, pairs=[("lstm", "gru")], guide_input="noise")(x)
    assert seen[0].dtype == x.dtype and seen[0].min() >= x.min() and seen[0].max() <= x.max()


def test_guide_inputs_of_another_batch_size_are_an_error():
    x, _ = image_batch()
    guidance = rg.Guidance(mlp(), small_cnn(), pairs=[("1", "0")], guide_input=lambda a, k: ((a[0][:8],), k))
    with pytest.raises(ValueError, match="batch size 8"):
        guidance(x)


def test_pairs_are_resolved_lazily_and_explain_how_to_resolve_them_early():
    guidance = rg.Guidance(mlp(), small_cnn(), layers="leaves")
    with pytest.raises(RuntimeError, match="example_input"):
        guidance.pairs
    guidance(image_batch()[0])
    assert len(guidance.pairs) == 2  # 2 hidden Linear layers vs 2 conv layers; heads excluded


def test_unknown_layer_in_explicit_pairs_is_an_error():
    with pytest.raises(ValueError, match="the guide has no layer named 'conv0'"):
        rg.Guidance(mlp(), small_cnn(), pairs=[("1", "conv0")])
    with pytest.raises(ValueError, match="the target has no layer named '9'"):
        rg.Guidance(mlp(), small_cnn(), pairs=[("9", "0")])


def test_tokens_reduction_averages_per_position_similarity():
    torch.manual_seed(0)
    x, _ = token_batch()
    target, guide = LSTMClassifier(), GRUClassifier()
    out = rg.Guidance(target, guide, pairs=[("lstm", "gru")], reduction="tokens")(x)
    t = target.lstm(target.emb(x))[0]
    g = guide.gru(guide.emb(x))[0]
    expected = torch.stack([rg.cka(t[:, i], g[:, i]) for i in range(x.shape[1])]).mean()
    assert torch.allclose(out.similarities[("lstm", "gru")], expected, atol=1e-6)


def test_every_measure_can_guide():
    x, _ = image_batch()
    for name in rg.list_measures():
        out = rg.Guidance(mlp(), small_cnn(), pairs=[("1", "0")], measure=name)(x)
        out.loss.backward()
        assert torch.isfinite(out.loss)


def test_bad_options_are_errors():
    with pytest.raises(ValueError, match="reduction"):
        rg.Guidance(mlp(), small_cnn(), reduction="max")
    with pytest.raises(ValueError, match="guide_input"):
        rg.Guidance(mlp(), small_cnn(), guide_input="zeros")
    with pytest.raises(ValueError, match="unknown similarity measure"):
        rg.Guidance(mlp(), small_cnn(), measure="cca")
    model = mlp()
    with pytest.raises(ValueError, match="different modules"):
        rg.Guidance(model, model)


# --------------------------------------------------------------------------------------------
# The guide is isolated from the target: nothing shared, its mode enforced, no activation kept


class Embedder(nn.Module):
    def __init__(self, emb):
        super().__init__()
        self.emb, self.head = emb, nn.Linear(4 * 6, 3)

    def forward(self, x):
        return self.head(self.emb(x).flatten(1))


def test_a_guide_sharing_a_module_with_the_target_is_refused_naming_it():
    shared = nn.Embedding(7, 4)
    target, guide = Embedder(shared), Embedder(shared)
    with pytest.raises(GuidanceError, match=r"the target's module 'emb' \(the guide's 'emb'\)"):
        rg.Guidance(target, guide)
    assert all(p.requires_grad for p in target.parameters())  # nothing was frozen


def test_a_guide_sharing_one_parameter_or_buffer_with_the_target_is_refused_naming_it():
    target, guide = mlp(), mlp()
    guide[4].weight = target[4].weight
    with pytest.raises(GuidanceError, match=r"tensor '4.weight' \(the guide's '4.weight'\)"):
        rg.Guidance(target, guide)
    target, guide = mlp(), mlp()
    guide[2].register_buffer("running_mean", target[2].running_mean)
    with pytest.raises(GuidanceError, match="'2.running_mean'"):
        rg.Guidance(target, guide)
    with pytest.raises(GuidanceError, match="the target's module itself"):
        rg.Guidance(target, nn.Sequential(target, nn.Linear(3, 3)))


def batchnorm_stats(model):
    return [b.clone() for b in model.buffers()]


def test_the_guide_stays_in_eval_mode_whatever_train_calls_reach_it():
    torch.manual_seed(0)
    x, _ = image_batch()
    target, guide = mlp(), nn.Sequential(small_cnn(), nn.Dropout(0.5))
    guidance = rg.Guidance(target, guide)
    parent = nn.ModuleDict({"guidance": guidance, "guide": guide})  # registers the guide after the Guidance
    before = batchnorm_stats(guide)
    parent.train()
    first = guidance(x).similarities
    guide.train()  # directly
    second = guidance(x).similarities
    assert all(torch.equal(a, b) for a, b in zip(before, batchnorm_stats(guide)))
    assert not any(m.training for m in guide.modules())
    # No dropout either: the same target and input give the same similarities.
    target.eval()
    assert all(torch.equal(a, b) for a, b in zip(guidance(x).similarities.values(), guidance(x).similarities.values()))
    assert first.keys() == second.keys()


def test_guide_mode_train_runs_the_guide_with_dropout_and_updates_its_statistics():
    torch.manual_seed(0)
    x, _ = image_batch()
    guide = small_cnn()
    guidance = rg.Guidance(mlp(), guide, guide_mode="train")
    guidance.eval()
    before = batchnorm_stats(guide)
    guidance(x)
    assert all(m.training for m in guide.modules())
    assert not all(torch.equal(a, b) for a, b in zip(before, batchnorm_stats(guide)))
    assert not any(p.requires_grad for p in guide.parameters())


def test_guide_mode_is_checked_and_train_refuses_the_guide_feature_cache():
    with pytest.raises(GuidanceError, match="guide_mode must be one of eval, train"):
        rg.Guidance(mlp(), small_cnn(), guide_mode="dropout")
    with pytest.raises(GuidanceError, match="guide_mode='train' gives new ones"):
        rg.Guidance(mlp(), small_cnn(), guide_mode="train", guide_cache=rg.GuideFeatureCache(16))


@pytest.mark.parametrize("weight", [-1.0, -1, float("nan"), float("inf"), "1", True, None])
def test_a_weight_that_is_no_finite_non_negative_number_is_refused_at_construction(weight):
    with pytest.raises(GuidanceError, match=r"weight must be a finite number >= 0, a WeightSchedule or a step -> "):
        rg.Guidance(mlp(), mlp(), weight=weight)


def test_a_schedule_that_goes_negative_is_refused_at_the_step_it_does():
    guidance = rg.Guidance(mlp(), mlp(), weight=lambda step: 1.0 - step)
    x = torch.randn(8, 1, 8, 8)
    assert [guidance(x).weight for _ in range(2)] == [1.0, 0.0]
    with pytest.raises(GuidanceError, match=r"the weight at step 2 must be a finite number >= 0.*got -1.0"):
        guidance(x)
    assert rg.Guidance(mlp(), mlp(), weight=lambda step: torch.tensor(0.5))(x).weight == 0.5  # a 0-dim tensor


@pytest.mark.parametrize("pairs, message", [
    (5, r"pairs must be 'stretch', 'official', a list of \(target, guide\[, weight\]\) pairs, .*; got 5"),
    ([("1", "1", "x")], r"pair weight must be a finite number >= 0, got 'x'"),
    ([("1", "1", float("nan"))], r"pair weight must be a finite number >= 0, got nan"),
    ([("1", "1", -2)], r"pair weight must be a finite number >= 0, got -2"),
])
def test_pairs_of_the_wrong_kind_are_a_layer_error_that_says_what_pairs_can_be(pairs, message):
    with pytest.raises(rg.errors.LayerError, match=message):
        rg.Guidance(mlp(), mlp(), pairs=pairs)(torch.randn(8, 1, 8, 8))


class NaNAt(nn.Module):
    """The identity, but one activation entry is NaN (or inf)."""

    def __init__(self, value=float("nan")):
        super().__init__()
        self.value = value

    def forward(self, x):
        x = x.clone()
        x[1, 2] = self.value
        return x


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_nonfinite_activation_gives_a_nonfinite_similarity_not_zero(value):
    from repguide.steps import _nonfinite_culprit

    x = torch.randn(8, 5)
    bad = NaNAt(value)(x)
    for name in rg.list_measures():
        assert not torch.isfinite(rg.similarity.get_measure(name)(bad, torch.randn(8, 4))), name
    assert torch.isnan(rg.cka(bad, x))
    target = nn.Sequential(nn.Linear(5, 6), NaNAt(value), nn.Linear(6, 3))
    guidance = rg.Guidance(target, nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)), pairs=[("1", "0")])
    out = guidance(x)
    assert not torch.isfinite(out.loss)
    culprit = _nonfinite_culprit(torch.tensor(1.0), out.loss, out.similarities, False)  # the loop's check
    assert "similarity of pair (target '1', guide '0')" in culprit


def test_a_constant_layer_still_gives_a_finite_similarity_with_finite_gradients():
    x = torch.ones(8, 5, requires_grad=True)
    value = rg.cka(x, torch.randn(8, 4))
    value.backward()
    assert float(value.detach()) == 0.0 and torch.isfinite(x.grad).all()


def test_the_target_can_be_copied_pickled_and_averaged_after_a_guided_step():
    import copy
    import io
    import pickle

    x, y = image_batch()
    target = mlp()
    guidance = rg.Guidance(target, small_cnn())
    out = guidance(x)
    (F.cross_entropy(out.output, y) + out.loss).backward()
    twin = copy.deepcopy(target)
    assert torch.equal(twin(x), target(x))
    pickle.loads(pickle.dumps(target.state_dict()))
    torch.save(target, io.BytesIO())
    ema = torch.optim.swa_utils.AveragedModel(target)
    ema.update_parameters(target)
    assert all(not c._acts for c in guidance._captures.values())


@pytest.mark.parametrize("measure, n", [("cka", 1), ("cka_unbiased", 3)])
def test_a_batch_too_small_for_the_measure_is_an_error_that_names_drop_last(measure, n):
    torch.manual_seed(0)
    guidance = rg.Guidance(mlp(), mlp(), measure=measure)
    guidance(torch.randn(8, 1, 8, 8))  # a full batch first, as in a loader
    with pytest.raises(GuidanceError, match=rf"needs at least \d examples per batch.*got a batch of {n}\..*drop_last=True"):
        guidance(torch.randn(n, 1, 8, 8))
    assert float(guidance(torch.randn(8, 1, 8, 8)).loss) >= 0  # and the next full batch runs


class Checkpointed(nn.Module):
    """Blocks from ``first`` on run through torch.utils.checkpoint, as memory-bound loops do."""

    def __init__(self, reentrant=None, first=0):
        super().__init__()
        self.reentrant, self.first = reentrant, first
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(64 if i == 0 else 32, 32), nn.Tanh()) for i in range(3)])
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        x = x.flatten(1)
        for i, block in enumerate(self.blocks):
            if self.reentrant is None or i < self.first:
                x = block(x)
            else:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=self.reentrant)
        return self.head(x)


def test_checkpointed_blocks_train_as_plain_ones_or_warn_that_they_cannot():
    import copy
    import warnings

    torch.manual_seed(0)
    plain, guide, x = Checkpointed(), mlp(), torch.randn(8, 1, 8, 8)

    def step(reentrant, first):
        model = copy.deepcopy(plain)
        model.reentrant, model.first = reentrant, first
        out = rg.Guidance(model, guide)(x)
        (F.cross_entropy(out.output, torch.arange(8) % 3) + out.loss).backward()
        return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in model.parameters()])

    want = step(None, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for reentrant, first in ((False, 0), (True, 1)):  # inputs that require grad: as plain blocks
            assert torch.allclose(step(reentrant, first), want, atol=1e-6), (reentrant, first)
    # The reentrant variant on inputs that do not require grad runs every block under no_grad
    # (torch warns that gradients will be None): no pair can train its block, and each says so.
    with pytest.warns(RuntimeWarning, match=r"'blocks.0' of the target.*no gradient.*use_reentrant=False") as seen:
        step(True, 0)
    warned = [str(w.message) for w in seen if "carries no gradient" in str(w.message)]
    assert len(warned) == 3 and "'blocks.2'" in warned[2]  # once for each layer
    assert {w.filename for w in seen if "carries no gradient" in str(w.message)} == {__file__}  # step()'s call
