"""Target layers of one batch whose widths differ compared in one node
(repguide.similarity.fused_group): against float64 CKA written from the formula, against the
one-node-per-width path it replaces, and with a constant and a non-finite layer among them."""

import pytest
import torch
from torch import nn

import repguide as rg
from repguide.guidance import _compute
from repguide.similarity import fused
from repguide.similarity.fused import unit_centred_gram
from repguide.similarity.fused_group import linear_cka_group_loss


def _cka64(x, y):
    """Biased linear CKA from the formula, float64: <HKH, HLH> / (|HKH| |HLH|)."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l = h @ x @ x.T @ h, h @ y @ y.T @ h
    return (k * l).sum() / (k.norm() * l.norm())


@pytest.fixture(params=["cpu path", "device path"])
def path(request, monkeypatch):
    monkeypatch.setattr(fused, "CPU_TUNED", request.param == "cpu path")
    return request.param


def _layers_and_guides(seed=1, n=16):
    torch.manual_seed(seed)
    blocks = [[(torch.randn(n, 12) + 3.0).requires_grad_()],
              [torch.randn(n, 7).requires_grad_(), (torch.randn(n, 7) * 1e-3).requires_grad_()],
              [(torch.randn(n, 20) * 50).requires_grad_()]]
    guides = [torch.randn(n, 5) @ torch.randn(5, 9) + 1.0 for _ in range(4)]
    return blocks, guides


@pytest.mark.parametrize("through", ["loss", "similarities"])
def test_the_group_s_loss_similarities_and_gradients_against_float64(path, through):
    blocks, guides = _layers_and_guides()
    units = torch.stack([unit_centred_gram(g)[0] for g in guides])
    w = torch.tensor([0.5, 0.1, 2.0, 1.0])
    loss, sims = linear_cka_group_loss(blocks, units, w, (-w).view(-1, 1, 1), 3.6)
    layers = [x for b in blocks for x in b]
    want = torch.stack([_cka64(x, g) for x, g in zip(layers, guides)])
    want_loss = (w.double() * (1 - want)).sum()
    assert torch.allclose(sims.double(), want, rtol=1e-6, atol=0)
    assert abs(loss.item() - want_loss.item()) <= 1e-6 * want_loss.item()
    objective, want_objective = (loss, want_loss) if through == "loss" else (
        sims @ torch.arange(4.0), want @ torch.arange(4.0).double())
    for grad, want_grad in zip(torch.autograd.grad(objective, layers), torch.autograd.grad(want_objective, layers)):
        assert grad.shape == want_grad.shape
        assert torch.allclose(grad.double(), want_grad.double(), rtol=1e-4, atol=1e-6 * want_grad.abs().max().item())


def test_a_constant_layer_gives_0_and_a_non_finite_one_stays_non_finite(path):
    blocks, guides = _layers_and_guides()
    blocks[0][0] = torch.full((16, 12), 7.0, requires_grad=True)
    nan_layer = torch.randn(16, 7)
    nan_layer[3, 2] = float("nan")
    blocks[1][0] = nan_layer.requires_grad_()
    units = torch.stack([unit_centred_gram(g)[0] for g in guides])
    w = torch.ones(4)
    loss, sims = linear_cka_group_loss(blocks, units, w, (-w).view(-1, 1, 1), 4.0)
    assert sims[0].item() == 0.0
    assert torch.isnan(sims[1])
    assert torch.isfinite(sims[2:]).all()
    assert torch.isnan(loss)
    (grad,) = torch.autograd.grad(sims[0] + sims[2] + sims[3], [blocks[0][0]])
    assert torch.equal(grad, torch.zeros_like(grad))


class _CNN(nn.Module):  # paired layers of three widths, the second width twice
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.c3, self.c4 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        for conv in (self.c1, self.c2, self.c3, self.c4):
            x = torch.relu(conv(x))
        return self.fc(x.mean((2, 3)))


def _guided_step(group: bool):
    with pytest.MonkeyPatch.context() as patch:
        if not group:  # the path before: one node per width
            patch.setattr(_compute, "_by_width", lambda groups, compiled: list(groups.values()))
        return _step()


def _step():
    torch.manual_seed(0)
    target = _CNN()
    guide = nn.Sequential(nn.Flatten(), nn.Linear(192, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(),
                          nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 5))
    x = torch.randn(10, 3, 8, 8)
    guidance = rg.Guidance(target, guide, example_input=x,
                           pairs=[("c1", "2"), ("c2", "4"), ("c3", "6"), ("c4", "8")])
    out = guidance(x)
    out.loss.backward()
    return out, [p.grad.clone() for p in target.parameters() if p.grad is not None]


def test_a_guided_step_is_the_one_node_per_width_path_s(path, monkeypatch):
    (grouped, grads), (alone, grads_alone) = _guided_step(True), _guided_step(False)
    assert grouped.similarities.keys() == alone.similarities.keys()
    for key in alone.similarities:
        assert abs(grouped.similarities[key].item() - alone.similarities[key].item()) <= 1e-6
    assert abs(grouped.loss.item() - alone.loss.item()) <= 1e-6
    scale = max(a.abs().max().item() for a in grads_alone)  # rounding differs: bmm of one row against mm
    assert len(grads) == len(grads_alone) == 8
    for g, a in zip(grads, grads_alone):
        assert (g - a).abs().max().item() <= 1e-5 * scale


def test_layers_of_several_widths_make_one_node(monkeypatch):
    calls = []
    original = _compute.linear_cka_group_loss
    monkeypatch.setattr(_compute, "linear_cka_group_loss", lambda *a: calls.append(a) or original(*a))
    stacks = []
    monkeypatch.setattr(_compute, "linear_cka_loss", lambda xs, *a: stacks.append(xs) or fused.linear_cka_loss(xs, *a))
    out, _ = _guided_step(True)
    assert len(calls) == 1 and not stacks
    assert [len(b) for b in calls[0][0]] == [1, 2, 1]  # c1 (4 wide maps), c2 and c3 (8), c4 (16)
    assert len(out.similarities) == 4
