"""A guided step reads no value on the host (issue 14): no ``aten._local_scalar_dense`` (what
``.item()``, ``bool()``, ``float()``, ``int()`` call) and no op whose output size depends on values,
for every measure and fast mode; and the stacked linear CKA equals the per-pair path.

The counts are taken on a CPU as a proxy for an accelerator, so the guide's Grams take the device
path here (``similarity.fused.CPU_TUNED = False``): on a CPU they default to a raw-Gram path
that decides on the host, where reading a value costs nothing (benchmarks/README.md, log #31)."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import repguide as rg
from repguide.similarity import fused, get_measure
from repguide.similarity.fused import linear_cka_stack, unit_centred_gram

aten = torch.ops.aten
_VALUE_SIZED = {aten.nonzero, aten.masked_select, aten._unique, aten._unique2, aten.unique_dim,
                aten.unique_consecutive, aten.equal, aten._local_scalar_dense}


class _Syncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        bool_index = packet in (aten.index, aten.index_put, aten.index_put_) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) or []
        )
        if packet in _VALUE_SIZED or bool_index or (packet is aten.repeat_interleave and "output_size" not in kwargs):
            self.found.append(str(func))
        return func(*args, **kwargs)


def _nets():
    torch.manual_seed(0)
    target = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(),
                           nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    guide = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))
    return target, guide


@pytest.fixture(autouse=True)
def device_path(monkeypatch):
    monkeypatch.setattr(fused, "CPU_TUNED", False)


MODES = {f"exact {m}": dict(measure=m) for m in ["cka", "cka_unbiased", "cka_rbf", "rsa", "procrustes"]} | {
    "bf16 guide Grams": dict(guide_precision="bf16"),
    "sketch": dict(sketch_dim=16),
    "guide cache": dict(guide_cache=True),
    "cache + sketch + bf16": dict(guide_cache=True, sketch_dim=16, guide_precision="bf16"),
    "tokens": dict(reduction="tokens", pairs=[("1", "0")]),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_a_guided_step_makes_no_host_sync(mode):
    options = dict(MODES[mode])
    target, guide = _nets()
    x, y, index = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)), torch.arange(16)
    if options.pop("guide_cache", False):
        options["guide_cache"] = rg.GuideFeatureCache(16)
    if options.get("reduction") == "tokens":
        target, guide = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 10)), nn.Sequential(nn.Linear(8, 5))
        x = torch.randn(16, 7, 8)
    guidance = rg.Guidance(target, guide, example_input=x, **options)
    optimizer = torch.optim.SGD(target.parameters(), lr=1e-3, momentum=0.9)  # CPU Adam reads its step
    kwargs = {"guide_index": index} if guidance.guide_cache is not None else {}

    def step():
        out = guidance(x, **kwargs)
        logits = out.output if out.output.dim() == 2 else out.output.mean(1)
        (nn.functional.cross_entropy(logits, y) + out.loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # fills the cache and the optimiser state, reads the step buffer once
    with _Syncs() as syncs:
        step()
    assert syncs.found == []


def test_on_a_cpu_the_guide_grams_are_checked_on_the_host_by_default(monkeypatch):
    # The CPU default: one host read per guide layer (free there), no pass over x besides its Gram.
    monkeypatch.setattr(fused, "CPU_TUNED", True)
    target, guide = _nets()
    x = torch.randn(16, 1, 8, 8)
    guidance = rg.Guidance(target, guide, pairs=[("1", "0"), ("4", "3")], example_input=x)
    guidance(x)
    with _Syncs() as syncs:
        raw = guidance(x).similarities
    assert syncs.found == ["aten._local_scalar_dense.default"] * 2
    monkeypatch.setattr(fused, "CPU_TUNED", False)
    device = guidance(x).similarities
    for key in raw:
        assert abs(raw[key].item() - device[key].item()) <= 1e-6


@pytest.mark.parametrize("offset", [0.0, 0.5, 3.0, 30.0])  # mean share of the energy: 0, 0.2, 0.9, 0.999
def test_a_cpu_guide_gram_is_made_once_whichever_path_it_takes(monkeypatch, offset):
    # A layer whose mean holds most of its energy takes the centred (device) path; its raw Gram,
    # which the host check would refuse, is not made first (a random deep net's layers: log #65).
    from repguide.similarity.prepared import Prepared

    monkeypatch.setattr(fused, "CPU_TUNED", True)
    torch.manual_seed(0)
    x = torch.randn(256, 600) + offset * torch.rand(600)  # a product large enough to be worth the check

    class Products(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func.overloadpacket in (aten.mm, aten.bmm, aten.addmm, aten.baddbmm)
            return func(*args, **(kwargs or {}))

    with Products() as products:
        gram = Prepared.gram_only(x).gram
    assert products.count == 4  # one Gram, from fused.symmetric_gram's 4 row blocks (either path)
    x64 = x.double() - x.double().mean(0)
    want = x64 @ x64.T / (x64 @ x64.T).norm()
    assert (gram.double() - want).abs().max() <= 2e-6 * want.abs().max()


@pytest.mark.parametrize("offset", [0.0, 50.0])  # offset inputs: the gradient's centring is implicit
def test_the_stacked_linear_cka_equals_the_per_pair_path(offset):
    torch.manual_seed(0)
    xs = [(torch.randn(24, 40) + offset).requires_grad_() for _ in range(3)]
    guides = [torch.randn(24, 9) @ torch.randn(9, 70) + offset for _ in range(3)]
    units = [unit_centred_gram(g)[0] for g in guides]
    stacked = linear_cka_stack(torch.stack(xs), torch.stack(units))
    grads = torch.autograd.grad(stacked.sum(), xs)
    cka = get_measure("cka")
    for x, g, u, s, grad in zip(xs, guides, units, stacked, grads):
        single = linear_cka_stack(x[None], u[None])[0]
        x64 = x.detach().double().requires_grad_()
        want = cka(x64, g.double())
        want_grad, = torch.autograd.grad(want, x64)
        assert torch.allclose(s, single, rtol=1e-6, atol=0)
        assert abs(s.item() - want.item()) <= 1e-6 * want.item()
        assert torch.allclose(grad.double(), want_grad, rtol=1e-4, atol=1e-7)


def test_tokens_similarity_equals_the_loop_over_positions():
    torch.manual_seed(0)
    target, guide = nn.Sequential(nn.Linear(8, 6), nn.Tanh()), nn.Sequential(nn.Linear(8, 5), nn.Tanh())
    x = torch.randn(12, 7, 8)
    out = rg.Guidance(target, guide, pairs=[("1", "1")], reduction="tokens")(x)
    t, g = target(x), guide(x)
    loop = torch.stack([rg.cka(t[:, i].double(), g[:, i].double()) for i in range(7)]).mean()
    assert abs(out.similarities[("1", "1")].item() - loop.item()) <= 1e-6


def test_a_constant_or_non_finite_target_layer_in_the_stack():
    u = unit_centred_gram(torch.randn(10, 30))[0]
    x = torch.randn(3, 10, 20, requires_grad=True)
    with torch.no_grad():
        x[1] = 2.5  # constant: similarity 0, zero gradient
        x[2, 4, 5] = float("nan")  # not finite: stays not finite
    s = linear_cka_stack(x, torch.stack([u, u, u]))
    assert s[1] == 0 and torch.isfinite(s[0]) and torch.isnan(s[2])
    grad, = torch.autograd.grad(s[:2].sum(), x)
    assert torch.equal(grad[1], torch.zeros(10, 20)) and torch.isfinite(grad[:2]).all()


def test_the_guide_grams_of_all_positions_equal_each_positions_own_and_cost_the_same_ops_at_any_length():
    from repguide.similarity.fused import unit_centred_grams

    torch.manual_seed(0)
    g = torch.randn(12, 9, 5) * torch.logspace(-3, 3, 9)[None, :, None] + 7.0  # small and offset positions
    with torch.no_grad():
        g[:, 3] = 1.25  # a constant position: zero Gram
        g[2, 5, 1] = float("inf")  # a non-finite position stays non-finite
    units, constant = unit_centred_grams(g.transpose(0, 1))
    for i in range(9):
        want, want_constant = unit_centred_gram(g[:, i])
        assert bool(constant[i]) == bool(want_constant)
        assert torch.equal(torch.isnan(units[i]), torch.isnan(want))
        finite = ~torch.isnan(want)
        assert torch.allclose(units[i][finite], want[finite], rtol=0, atol=1e-6)
        if i not in (3, 5):  # against float64 centring from the formula
            c = g[:, i].double() - g[:, i].double().mean(0)
            ref = c @ c.T
            assert torch.allclose(units[i].double(), ref / ref.norm(), rtol=0, atol=1e-6)
    assert constant[3] and units[3].abs().sum() == 0 and torch.isnan(units[5]).all()

    def ops_of_a_tokens_step(positions):
        torch.manual_seed(0)
        # widths above the batch size: the Gram form, the linear CKA's fused path
        target, guide = nn.Sequential(nn.Linear(8, 30), nn.Tanh()), nn.Sequential(nn.Linear(8, 40), nn.Tanh())
        x = torch.randn(12, positions, 8)
        guidance = rg.Guidance(target, guide, pairs=[("1", "1")], reduction="tokens", example_input=x)
        guidance(x)

        class Count(TorchDispatchMode):
            n = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                Count.n += 1
                return func(*args, **(kwargs or {}))

        with Count():
            guidance(x).loss.backward()
        return Count.n

    assert ops_of_a_tokens_step(4) == ops_of_a_tokens_step(16)  # no loop over positions on either side


def test_a_step_after_one_in_inference_mode_still_trains():
    # The stack's row weights are made once and kept: one first made under inference_mode must
    # not become an inference tensor that the next training step cannot save for its backward.
    target, guide = _nets()
    x = torch.randn(16, 1, 8, 8)
    guidance = rg.Guidance(target, guide, pairs=[("1", "0"), ("4", "3")], example_input=x)
    with torch.inference_mode():
        guidance(x)
    out = guidance(x)
    out.loss.backward()
    assert target[1].weight.grad is not None and torch.isfinite(target[1].weight.grad).all()


@pytest.mark.parametrize("through", ["loss", "similarities", "both"])
def test_the_stack_s_loss_and_its_gradient_against_float64(through):
    """linear_cka_loss: (Σ w·(1 − sim), sim) in one node, rows from (n, d) and (p, n, d) inputs,
    against float64 CKA of each row and autograd through it."""
    from repguide.similarity.fused import linear_cka_loss

    torch.manual_seed(1)
    xs = [(torch.randn(16, 12) + 3.0).requires_grad_(), torch.randn(3, 16, 12).requires_grad_(),
          (torch.randn(16, 12) * 1e-3).requires_grad_()]
    guides = [torch.randn(16, 7) @ torch.randn(7, 20) + 1.0 for _ in range(5)]
    units = torch.stack([unit_centred_gram(g)[0] for g in guides])
    w = torch.tensor([0.5, 0.1, 0.1, 0.1, 2.0])
    loss, sims = linear_cka_loss(xs, units, w, (-w).view(-1, 1, 1), 2.8)
    rows64 = [xs[0].double(), *xs[1].double().unbind(0), xs[2].double()]
    want = torch.stack([rg.cka(r, g.double()) for r, g in zip(rows64, guides)])
    want_loss = (w.double() * (1 - want)).sum()
    assert torch.allclose(sims.double(), want, rtol=1e-6, atol=0)
    assert abs(loss.item() - want_loss.item()) <= 1e-6 * want_loss.item()
    objective, want_objective = {
        "loss": (loss, want_loss), "similarities": (sims @ torch.arange(5.0), want @ torch.arange(5.0).double()),
        "both": (loss + sims.sum(), want_loss + want.sum()),
    }[through]
    grads = torch.autograd.grad(objective, xs)
    want_grads = torch.autograd.grad(want_objective, xs)
    for grad, want_grad in zip(grads, want_grads):
        assert grad.shape == want_grad.shape
        assert torch.allclose(grad, want_grad, rtol=1e-4, atol=1e-6 * want_grad.abs().max().item())


class _BatchFirstView(nn.Module):
    """Outputs a non-contiguous (n, positions, d) view, as a batch-first RNN does."""

    def __init__(self, contiguous: bool):
        super().__init__()
        self.proj, self.contiguous = nn.Linear(6, 5), contiguous

    def forward(self, x):  # x: (n, positions, 6), run time-major
        out = torch.tanh(self.proj(x.transpose(0, 1))).transpose(0, 1)
        return out.contiguous() if self.contiguous else out


def test_a_non_contiguous_target_layer_is_flattened_by_the_stack_alone():
    """Two non-contiguous target layers: one copy each (the stack's), the similarities and the
    gradients those of the same layers made contiguous."""
    torch.manual_seed(0)
    x = torch.randn(10, 7, 6)
    guide = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
    results = {}
    for contiguous in (False, True):
        torch.manual_seed(2)
        target = nn.Sequential(_BatchFirstView(contiguous), nn.Identity())
        pairs = [("0", "1"), ("1", "3")]
        out = rg.Guidance(target, guide.eval(), pairs=pairs)(x)
        out.loss.backward()
        results[contiguous] = out, target[0].proj.weight.grad.clone()
    (lazy, lazy_grad), (eager, eager_grad) = results[False], results[True]
    assert lazy.similarities.keys() == eager.similarities.keys()
    for key in lazy.similarities:
        assert abs(lazy.similarities[key].item() - eager.similarities[key].item()) <= 1e-6
    assert abs(lazy.loss.item() - eager.loss.item()) <= 1e-6 and torch.allclose(lazy_grad, eager_grad, atol=1e-6)
    g, t = guide[:2](x), target(x)
    want = rg.cka(t.reshape(10, -1).double(), g.reshape(10, -1).double()).item()
    assert abs(lazy.similarities[("0", "1")].item() - want) <= 1e-6
