"""Guide layers of one shape prepared as one stack, and a stacked LSTM captured layer by layer with
one set of zero initial states (issue 14: fewer ops per guided step). On the device path
(``similarity.fused.CPU_TUNED = False``), which is the one that stacks."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import repguide as rg
from repguide.capture import Capture
from repguide.guidance import _guide_stream
from repguide.similarity import fused, get_measure


@pytest.fixture
def device_path(monkeypatch):
    monkeypatch.setattr(fused, "CPU_TUNED", False)


def _centred_unit_gram64(x):
    x = x.double() - x.double().mean(0)
    g = x @ x.T
    return g / torch.linalg.norm(g)


def test_layers_of_one_shape_are_prepared_as_one_stack_and_equal_their_float64_grams(device_path):
    torch.manual_seed(0)
    xs = [torch.randn(12, 30) * 10.0 ** k + 5.0 for k in (-3, 0, 3)] + [torch.full((12, 30), 2.0), torch.randn(12, 7)]
    cka = get_measure("cka")
    prepared = cka.prepare_guides(xs, [[8]] * len(xs))
    units = [p.gram for p in prepared]
    # The three (12, 30) non-constant layers and the constant one are rows of one (4, 12, 12) tensor.
    assert len({u.untyped_storage().data_ptr() for u in units[:4]}) == 1
    assert units[4].untyped_storage().data_ptr() != units[0].untyped_storage().data_ptr()
    for x, u, p in zip(xs, units, prepared):
        if x.std() == 0:
            assert bool(p.constant) and torch.equal(u, torch.zeros(12, 12))
        else:
            assert not bool(p.constant)
            torch.testing.assert_close(u.double() / torch.linalg.norm(u.double()), _centred_unit_gram64(x),
                                       rtol=0, atol=1e-6)


def test_a_layer_whose_features_are_needed_is_not_stacked(device_path):
    torch.manual_seed(0)
    xs = [torch.randn(12, 30), torch.randn(12, 30)]
    widths = [[8], [None]]  # None: the target's width is not known yet
    prepared = get_measure("cka").prepare_guides(xs, widths)
    assert prepared[0].x is None and prepared[1].x is not None


def _pairs_of_one_shape():
    torch.manual_seed(0)
    target = nn.Sequential(*[m for _ in range(3) for m in (nn.Linear(16, 16), nn.Tanh())])
    guide = nn.Sequential(*[m for _ in range(3) for m in (nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 16))])
    return target, guide.eval(), [("1", "1"), ("3", "4"), ("5", "7")]


def test_a_guided_step_is_the_same_whether_its_guide_layers_are_stacked_or_not(device_path, monkeypatch):
    from repguide.similarity import base

    stacks = []
    original = base.gram_only_stack
    monkeypatch.setattr(base, "gram_only_stack",
                        lambda x, min_n=2, md=None: stacks.append(x.shape) or original(x, min_n, md))
    x = torch.randn(20, 16)
    results = []
    for hold in (_guide_stream.HOLD_BYTES, 0):  # 0: every layer prepared alone, as it comes
        monkeypatch.setattr(_guide_stream, "HOLD_BYTES", hold)
        target, guide, pairs = _pairs_of_one_shape()
        guidance = rg.Guidance(target, guide, pairs=pairs)
        guidance(x)
        out = guidance(x)
        out.loss.backward()
        results.append((out, [p.grad.clone() for p in target.parameters()]))
    assert stacks == [(3, 20, 24)] * 2  # both steps with the default budget; none with 0
    (stacked, grads_s), (alone, grads_a) = results
    for key in stacked.similarities:
        assert abs(stacked.similarities[key].item() - alone.similarities[key].item()) <= 1e-6
    for gs, ga in zip(grads_s, grads_a):
        torch.testing.assert_close(gs, ga, rtol=1e-5, atol=1e-7)
    target, guide, pairs = _pairs_of_one_shape()
    want = rg.cka(target[:2](x).double(), guide[:2](x).double()).item()
    assert abs(stacked.similarities[("1", "1")].item() - want) <= 1e-6


def test_the_held_layers_never_exceed_the_budget(monkeypatch):
    held = []
    stream = _guide_stream.GuideStream({}, lambda name, a: a, lambda names, gs: held.append(list(names)) or gs)
    monkeypatch.setattr(_guide_stream, "HOLD_BYTES", 3 * 40 * 4)  # three (4, 10) float32 layers
    for i in range(5):
        stream.acts[f"l{i}"] = torch.zeros(4, 10)
        stream.on_layer()
    stream.acts["big"] = torch.zeros(4, 40)  # alone over the budget: prepared at once
    stream.on_layer()
    stream.flush()
    assert held == [["l0", "l1", "l2"], ["big"], ["l3", "l4"]]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("proj_size", [0, 3])
def test_a_stacked_lstm_by_layer_with_zero_states_made_once_is_the_fused_lstm(batch_first, proj_size):
    torch.manual_seed(0)
    lstm = nn.LSTM(4, 6, num_layers=3, batch_first=batch_first, proj_size=proj_size).eval()
    model = nn.Sequential(lstm)
    x = torch.randn(5, 7, 4)
    out, (h, c) = model(x)
    capture = Capture(model, ["0.layer0", "0.layer1", "0.layer2"])
    with capture.record(5 if batch_first else 7) as acts:
        out_l, (h_l, c_l) = model(x)
    capture.remove()
    for got, want in ((out_l, out), (h_l, h), (c_l, c)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert torch.equal(acts["0.layer2"], out_l if batch_first else out_l.transpose(0, 1))  # captured batch-first


class _Constant(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 0 + 1.5


class _Broken(nn.Linear):
    def forward(self, x):
        out = super().forward(x).clone()
        out[3, 2] = float("nan")
        return out


class _ThreeHeads(nn.Module):
    """Three guide layers of one shape: a constant one, one with a NaN, a plain one."""

    def __init__(self):
        super().__init__()
        self.constant, self.broken, self.plain = _Constant(8, 40), _Broken(8, 40), nn.Linear(8, 40)

    def forward(self, x):
        return self.constant(x), self.broken(x), self.plain(x)


def test_a_constant_and_a_non_finite_guide_layer_in_one_stack_stay_their_own(device_path, monkeypatch):
    """Stacked with the others, a constant guide layer gives similarity 0 and a non-finite one NaN,
    and neither changes the plain layer's similarity."""
    from repguide.similarity import base

    stacks, original = [], base.gram_only_stack
    monkeypatch.setattr(base, "gram_only_stack",
                        lambda x, min_n=2, md=None: stacks.append(x.shape) or original(x, min_n, md))
    torch.manual_seed(0)
    target = nn.Sequential(nn.Linear(8, 30), nn.Tanh(), nn.Linear(30, 30), nn.Tanh(), nn.Linear(30, 30))
    guide = _ThreeHeads().eval()
    guidance = rg.Guidance(target, guide, pairs=[("1", "constant"), ("3", "broken"), ("4", "plain")])
    x = torch.randn(16, 8)
    guidance(x)
    out = guidance(x)
    s = out.similarities
    assert stacks[-1] == (3, 16, 40)
    assert s[("1", "constant")].item() == 0 and torch.isnan(s[("3", "broken")])
    want = rg.cka(target(x).double(), guide.plain(x).double()).item()
    assert abs(s[("4", "plain")].item() - want) <= 1e-6


def test_channels_last_conv_targets_give_what_contiguous_ones_do():
    """Non-contiguous 4-D target layers (channels-last conv maps) flattened by the stack: the same
    similarities and gradients as the same convolutions in the default layout."""
    x = torch.randn(10, 3, 8, 8)
    guide = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 6, 3, padding=1), nn.Tanh()).eval()
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(1)
        target = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        target = target.to(memory_format=layout)
        out = rg.Guidance(target, guide, pairs=[("1", "1"), ("3", "3")])(x.to(memory_format=layout))
        out.loss.backward()
        results.append((out.similarities, target[0].weight.grad))
    (s0, g0), (s1, g1) = results
    assert all(abs(s0[k].item() - s1[k].item()) <= 1e-6 for k in s0)
    torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-6)


def test_nothing_is_held_where_no_stack_can_be_made():
    """On a CPU's tuned path (``Measure.stacks_guides`` False) each layer is prepared as it comes."""
    assert not get_measure("cka").stacks_guides(torch.device("cpu")) and fused.CPU_TUNED
    prepared = []
    stream = _guide_stream.GuideStream({}, lambda name, a: a, lambda names, gs: prepared.append(list(names)) or gs,
                                       lambda features: get_measure("cka").stacks_guides(features.device))
    for i in range(3):
        stream.acts[f"l{i}"] = torch.zeros(4, 10)
        stream.on_layer()
        assert prepared[-1] == [f"l{i}"]  # at once, not at the flush


def test_layers_of_one_n_and_different_widths_are_one_group_and_equal_their_float64_grams(device_path):
    """Widths of which there is one layer each: one group (its Grams rows of one tensor), each
    Gram its float64 reference, a constant layer's zeros and a non-finite layer's NaN kept."""
    torch.manual_seed(0)
    xs = [torch.randn(12, 30) * 1e3 + 5e4, torch.randn(12, 17) * 1e-3, torch.full((12, 13), 2.0),
          torch.randn(12, 21), torch.randn(12, 30) * 1e-2]
    xs[3][4, 2] = float("nan")
    prepared = get_measure("cka").prepare_guides(xs, [[40]] * len(xs))
    units = [p.gram for p in prepared]
    # (12, 30) twice: one stack; the widths 17, 13 and 21: one group
    assert units[0].untyped_storage().data_ptr() == units[4].untyped_storage().data_ptr()
    assert len({u.untyped_storage().data_ptr() for u in units[1:4]}) == 1
    assert units[1].untyped_storage().data_ptr() != units[0].untyped_storage().data_ptr()
    for i in (0, 1, 4):
        assert not bool(prepared[i].constant)
        torch.testing.assert_close(units[i].double(), _centred_unit_gram64(xs[i]), rtol=0, atol=1e-6)
    assert bool(prepared[2].constant) and torch.equal(units[2], torch.zeros(12, 12))
    assert torch.isnan(units[3]).all()
    alone = [fused.unit_centred_gram(x) for x in xs[1:4]]
    for (u, c), p in zip(alone, prepared[1:4]):
        torch.testing.assert_close(p.gram, u, rtol=0, atol=1e-7, equal_nan=True)
        assert bool(c) == bool(p.constant)


def test_a_guided_step_is_the_same_whether_its_guide_layers_of_different_widths_are_grouped_or_not(
        device_path, monkeypatch):
    from repguide.similarity import base

    groups, original = [], base.gram_only_group
    monkeypatch.setattr(base, "gram_only_group",
                        lambda xs, min_n=2, md=None: groups.append(len(xs)) or original(xs, min_n, md))
    x = torch.randn(8, 16)
    results = []
    for hold in (_guide_stream.HOLD_BYTES, 0):
        monkeypatch.setattr(_guide_stream, "HOLD_BYTES", hold)
        torch.manual_seed(0)
        target = nn.Sequential(*[m for _ in range(3) for m in (nn.Linear(16, 16), nn.Tanh())])
        guide = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 32), nn.Tanh(), nn.Linear(32, 20), nn.Tanh())
        out = rg.Guidance(target, guide.eval(), pairs=[("1", "1"), ("3", "3"), ("5", "5")])(x)
        out.loss.backward()
        results.append((out, [p.grad.clone() for p in target.parameters()]))
    assert groups == [3]  # with the default budget; none with 0
    (grouped, grads_g), (alone, grads_a) = results
    for key in grouped.similarities:
        assert abs(grouped.similarities[key].item() - alone.similarities[key].item()) <= 1e-6
    for gg, ga in zip(grads_g, grads_a):
        torch.testing.assert_close(gg, ga, rtol=1e-5, atol=1e-7)
    want = rg.cka(target[:4](x).double(), guide[:4](x).double()).item()
    assert abs(grouped.similarities[("3", "3")].item() - want) <= 1e-6


def test_bf16_products_are_batched_too_and_equal_each_layer_s_own(device_path):
    """With bf16 operands (the guide_precision fast mode) layers are stacked and grouped as well;
    each Gram is what the one-layer path makes with the same rounding."""
    torch.manual_seed(0)
    xs = [torch.randn(12, 30), torch.randn(12, 30) + 3.0, torch.randn(12, 17), torch.randn(12, 21) * 1e-4]
    prepared = get_measure("cka").prepare_guides(xs, [[40]] * len(xs), torch.bfloat16)
    assert len({p.gram.untyped_storage().data_ptr() for p in prepared[2:]}) == 1
    for x, p in zip(xs, prepared):
        unit, constant = fused.unit_centred_gram(x, torch.bfloat16)
        assert p.gram.dtype == torch.float32 and not bool(p.constant) and not bool(constant)
        torch.testing.assert_close(p.gram, unit, rtol=0, atol=1e-6)
        assert (p.gram.double() - _centred_unit_gram64(x)).abs().max() < 2e-2  # bf16's rounding, no more


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def test_a_two_pair_sequence_step_stays_within_30_extra_ops_a_pair(device_path):
    """benchmarks/bench_ops.py's (b) in small: an LSTM LM (batch-first layers, non-contiguous
    outputs) guided at two leaf layers of different widths of a Transformer LM; aten ops of a
    guided step beyond a plain step and the guide's forward, per pair (29.0 on (b), log #58)."""
    from repguide import models

    torch.manual_seed(0)
    target, guide = models.lstm_lm(20, hidden_dim=16, num_layers=2), models.transformer_lm(20, dim=16, depth=4).eval()
    x, y = torch.randint(0, 20, (8, 12)), torch.randint(0, 20, (8, 12))
    guidance = rg.Guidance(target, guide, example_input=x, layers="leaves")
    optimizer = torch.optim.Adam(target.parameters(), lr=1e-3)

    def step(guided):
        out = guidance(x) if guided else None
        logits = out.output if guided else target(x)
        loss = nn.functional.cross_entropy(logits.reshape(-1, 20), y.reshape(-1)) + (out.loss if guided else 0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def ops(fn):
        fn()
        with _Ops() as c:
            fn()
        return c.n

    plain, guided = ops(lambda: step(False)), ops(lambda: step(True))
    with torch.no_grad():
        forward = ops(lambda: guide(x))
    assert [p.guide for p in guidance.pairs] == ["blocks.0.attn.qkv", "blocks.3.mlp.fc2"]  # widths 48 and 16
    assert (guided - plain - forward) / 2 <= 30
