"""A layer is its module's output as the module returned it, even where a later op of the forward
changes that tensor in place (``nn.ReLU(inplace=True)`` after a convolution, torchvision's
``out += identity`` after a norm): the target's, the guide's and ``compare``'s layers alike.

Every check compares with a twin of the model whose ops are out of place (the same weights), whose
recorded outputs nothing changes later, and with linear CKA written out in float64."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repguide as rg
from repguide.capture import Capture


def cka64(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().flatten(1), b.detach().double().flatten(1)
    a, b = a - a.mean(0), b - b.mean(0)
    k, l_ = a @ a.T, b @ b.T
    return float((k * l_).sum() / (k.norm() * l_.norm()))


class MLP(nn.Module):
    """Written the way torchvision writes its classifiers: one shared in-place ReLU."""

    def __init__(self, inplace: bool = True, width: int = 32, depth: int = 4):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(48 if i == 0 else width, width) for i in range(depth)])
        self.act = nn.ReLU(inplace=inplace)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        x = x.flatten(1)
        for layer in self.layers:
            x = self.act(layer(x))
        return self.head(x)


class BasicBlock(nn.Module):
    """torchvision's ResNet block: the residual added into bn2's output, then an in-place ReLU."""

    def __init__(self, width: int, inplace: bool = True):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=inplace)
        self.inplace = inplace

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.inplace:
            out += x
        else:
            out = out + x
        return self.relu(out)


class SmallResNet(nn.Module):
    def __init__(self, inplace: bool = True, width: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.Sequential(BasicBlock(width, inplace), BasicBlock(width, inplace))
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def out_of_place(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
        if isinstance(module, BasicBlock):
            module.inplace = False
    return twin


def outputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each named module's output, copied as it is returned."""
    got = {}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: got.__setitem__(n, o.detach().clone())) for n in names]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return got


X = torch.randn(24, 3, 4, 4)
Y = torch.randint(0, 10, (24,))


@pytest.fixture(params=["cpu path", "device path"])
def guide_path(request, monkeypatch):
    """The CPU's tuned path prepares each guide layer as it runs; the device path (any
    accelerator) holds small ones to prepare them together after later layers ran."""
    from repguide.similarity import fused

    monkeypatch.setattr(fused, "CPU_TUNED", request.param == "cpu path")
    return request.param


@pytest.mark.parametrize("step", [0, 1, 2])
def test_a_target_layer_followed_by_an_in_place_relu_is_the_layer_s_own_output(step, guide_path):
    torch.manual_seed(0)
    target, guide = MLP(), SmallResNet(inplace=False).eval()
    guidance = rg.Guidance(target, guide, layers="leaves")
    for _ in range(step):  # the first forward is verified (every layer copied); later ones are not
        guidance(X)
    out = guidance(X)
    t_names = [p.target for p in guidance.pairs]
    want_t = outputs(out_of_place(target), t_names, X)
    want_g = outputs(guide, [p.guide for p in guidance.pairs], X)
    for (t, g), sim in out.similarities.items():
        assert float(sim) == pytest.approx(cka64(want_t[t], want_g[g]), abs=1e-5), (t, g)
    # and the post-ReLU values are measurably different, so the test can fail
    post = {t: v.relu() for t, v in want_t.items()}
    assert any(abs(cka64(post[t], want_g[g]) - float(s)) > 1e-3 for (t, g), s in out.similarities.items())


def test_a_guided_step_with_in_place_ops_equals_the_same_step_without_them(guide_path):
    torch.manual_seed(1)
    target, guide = SmallResNet(), MLP(width=16)
    twin_t, twin_g = out_of_place(target), out_of_place(guide)
    # bn2's output is the norm's, before `out += x` and the ReLU
    pairs = [("blocks.0.bn2", "layers.0"), ("blocks.1.conv1", "layers.1"), ("blocks.1.bn2", "layers.3")]
    a = rg.Guidance(target, guide, pairs=pairs)
    b = rg.Guidance(twin_t, twin_g, pairs=pairs)
    for step in range(3):
        oa, ob = a(X), b(X)
        assert [p for p in a.pairs] == [p for p in b.pairs]
        la = F.cross_entropy(oa.output, Y) + oa.loss
        lb = F.cross_entropy(ob.output, Y) + ob.loss
        assert float(la) == pytest.approx(float(lb), rel=1e-6, abs=1e-6), step
        target.zero_grad(), twin_t.zero_grad()
        la.backward(), lb.backward()
        for (name, p), q in zip(target.named_parameters(), twin_t.parameters()):
            scale = float(q.grad.abs().max()) + 1e-12
            assert float((p.grad - q.grad).abs().max()) <= 1e-5 * scale, (step, name)
        with torch.no_grad():  # keep both on the same weights
            for p, q in zip(target.parameters(), twin_t.parameters()):
                p.sub_(0.1 * p.grad), q.sub_(0.1 * q.grad)


def test_guide_layers_changed_in_place_later_are_the_layer_s_own_output(guide_path):
    torch.manual_seed(2)
    target, guide = MLP(inplace=False, width=24), MLP(width=16)
    guidance = rg.Guidance(target, guide, layers="leaves")
    twin = rg.Guidance(target, out_of_place(guide), layers="leaves")
    for _ in range(3):
        got, want = guidance(X).similarities, twin(X).similarities
        for key in want:
            assert float(got[key]) == pytest.approx(float(want[key]), abs=1e-6), key


def test_compare_sees_each_layer_before_a_later_in_place_op():
    torch.manual_seed(3)
    model = SmallResNet()
    batches = [(X[:12], Y[:12]), (X[12:], Y[12:])]
    other = MLP(width=16)
    names = ["blocks.0.bn1", "blocks.0.bn2", "blocks.1.conv2", "blocks.1.bn2"]
    got = rg.compare(model, other, batches, layers_a=names, layers="leaves")
    want = rg.compare(out_of_place(model), out_of_place(other), batches, layers_a=names, layers="leaves")
    assert got.layers_a == want.layers_a == names and got.layers_b == want.layers_b
    assert torch.allclose(got.matrix, want.matrix, atol=1e-9)


def test_a_layer_no_op_changes_later_is_kept_without_a_copy_after_the_first_forward():
    model = MLP(inplace=False)
    capture = Capture(model, ["layers.0", "layers.1"])
    seen = {}
    handle = model.layers[0].register_forward_hook(lambda m, a, o: seen.__setitem__("out", o))
    for forward in range(2):
        with capture.record(len(X)) as acts:
            model(X)
        kept = acts["layers.0"]
        shares = kept.untyped_storage().data_ptr() == seen["out"].untyped_storage().data_ptr()
        assert shares == (forward == 1)  # copied while verified, then kept as it is
    handle.remove()


def test_an_output_that_starts_to_be_changed_in_place_is_copied_from_then_on_with_a_warning():
    class Sometimes(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.calls = nn.Linear(48, 16), 0

        def forward(self, x):
            h = self.fc(x.flatten(1))
            self.calls += 1
            return h.relu_() if self.calls > 1 else h.relu()

    model = Sometimes()
    capture = Capture(model, ["fc"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with capture.record(len(X)) as acts:
            model(X)
    with pytest.warns(RuntimeWarning, match="'fc'.*changed its output in place") as seen:
        with capture.record(len(X)) as acts:
            model(X)
    assert [w.filename for w in seen] == [__file__]  # the user's `with` line, not repguide's
    with capture.record(len(X)) as acts:
        model(X)
    want = model.fc(X.flatten(1)).detach()
    assert torch.equal(acts["fc"].detach(), want)  # the pre-ReLU output
    assert (want < 0).any()

    # Through a guided step the warning points at the user's call too, not at repguide's forward.
    model.calls = -4  # its first forwards (the probes, the first steps) leave the output as it is
    guidance = rg.Guidance(model, nn.Sequential(nn.Flatten(), nn.Linear(48, 8)), pairs=[("fc", "1")])
    with pytest.warns(RuntimeWarning, match="'fc'.*changed its output in place") as seen:
        for _ in range(6):
            guidance(X)
    assert [w.filename for w in seen] == [__file__]


def test_recording_under_inference_mode_works():
    model = MLP()
    capture = Capture(model, ["layers.0"])
    with torch.inference_mode():
        for _ in range(2):
            with capture.record(len(X)) as acts:
                model(X)
            assert acts["layers.0"].shape == (len(X), 32)


def test_discovery_says_which_outputs_a_later_op_overwrites():
    infos = {i.name: i.overwritten for i in rg.capture.discover(SmallResNet(), X, layers="all")}
    assert infos["blocks.0.bn1"] and infos["blocks.0.bn2"] and infos["blocks.1.bn2"]  # ReLU_, `+=`
    assert not infos["blocks.0.conv1"] and not infos["stem"] and not infos["fc"]
    assert not any(i.overwritten for i in rg.capture.discover(out_of_place(SmallResNet()), X, layers="all"))


def test_guidance_s_first_step_copies_only_what_discovery_saw_overwritten():
    # The probe at set-up already ran the forward: the first step holds no more than later ones.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Clones(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Clones.count += func is torch.ops.aten.clone.default
            return func(*args, **(kwargs or {}))

    torch.manual_seed(4)
    counts = {}
    for inplace in (False, True):
        guidance = rg.Guidance(MLP(inplace=inplace), MLP(inplace=False, width=16), layers="leaves", example_input=X)
        counts[inplace] = []
        for _ in range(2):
            Clones.count = 0
            with Clones():
                guidance(X)
            counts[inplace].append(Clones.count)
    pairs = len(guidance.pairs)  # every paired Linear output is ReLU'd in place
    assert counts[True] == [counts[False][0] + pairs] * 2 and counts[False][0] == counts[False][1]
