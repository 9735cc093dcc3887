"""Guidance(compile=True): linear CKA's stacked similarity through torch.compile (inductor, static
shapes) gives the uncompiled loss and target gradients to float rounding, in one graph each way."""

import copy

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import repguide as rg
from repguide.errors import GuidanceError, LayerError

from _nets import cnn, mlp


def _alignment(target, guide, x, compile, **options):
    """The alignment loss of one guided step and the gradient it gives each target parameter."""
    guidance = rg.Guidance(copy.deepcopy(target), copy.deepcopy(guide), example_input=x, compile=compile, **options)
    out = guidance(x)
    out.loss.backward()
    grads = {name: p.grad for name, p in guidance.target.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


def _assert_same(target, guide, x, **options):
    torch._dynamo.reset()
    counters.clear()
    loss, grads = _alignment(target, guide, x, False, **options)
    compiled_loss, compiled_grads = _alignment(target, guide, x, True, **options)
    assert counters["stats"]["unique_graphs"] >= 1  # the stack did go through the compiler
    assert dict(counters["graph_break"]) == {}  # linear_cka_stack's autograd.Function is traced whole
    assert abs(compiled_loss.item() - loss.item()) <= 1e-5 * abs(loss.item())
    assert grads.keys() == compiled_grads.keys() and grads
    flat = torch.cat([g.flatten() for g in grads.values()])
    compiled = torch.cat([compiled_grads[name].flatten() for name in grads])
    # Relative to the largest gradient: some entries are 0 but for rounding (a bias before BatchNorm).
    torch.testing.assert_close(compiled, flat, rtol=1e-5, atol=1e-5 * flat.abs().max().item())


@pytest.mark.slow  # compiles take 15-27 s for this file on a loaded 2-core machine (cold cache)
def test_compiled_fcn_against_cnn_equals_the_uncompiled_step():
    torch.manual_seed(0)
    x = torch.randn(16, 1, 8, 8)
    _assert_same(mlp(), cnn(8), x)  # stretch: 4 pairs, equal-width target layers in one stack


@pytest.mark.slow
def test_compiled_tokens_pair_equals_the_uncompiled_step():
    torch.manual_seed(0)
    target = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 10))
    guide = nn.Sequential(nn.Linear(8, 24), nn.Tanh())
    x = torch.randn(16, 7, 8)  # 7 positions wider than 16 examples: one Gram-form stack of 7 rows
    _assert_same(target, guide, x, reduction="tokens", pairs=[("1", "1")])


def test_compile_must_be_a_bool():
    with pytest.raises(GuidanceError, match="compile must be True or False"):
        rg.Guidance(mlp(), cnn(), compile="yes")


def test_a_compiled_target_is_probed_eagerly_under_its_original_layer_names():
    """A target wrapped by ``torch.compile``: discovery runs the original module (no graph is
    compiled for its probing hooks, which used to recompile once per layer up to dynamo's limit),
    its layers go by the original names, a prefixed name given by hand means the same layer, and a
    guided step gives the uncompiled loss and gradients."""
    torch.manual_seed(0)
    target, guide, x = mlp(), cnn(), torch.randn(8, 1, 8, 8)
    eager_loss, eager_grads = _alignment(target, guide, x, False)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(copy.deepcopy(target), backend="eager")
    assert rg.layers(compiled, x) == rg.layers(target, x)
    assert counters["stats"]["unique_graphs"] == 0
    guidance = rg.Guidance(compiled, copy.deepcopy(guide))
    out = guidance(x)
    out.loss.backward()
    assert [p.target for p in guidance.pairs] == [p.target for p in rg.Guidance(target, guide, example_input=x).pairs]
    assert counters["stats"]["unique_graphs"] >= 1  # the step itself went through dynamo
    torch.testing.assert_close(out.loss.detach(), eager_loss)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled.get_submodule("_orig_mod").get_parameter(name).grad, grad)
    first = guidance.pairs[0].target
    by_hand = rg.Guidance(compiled, copy.deepcopy(guide), pairs=[(f"_orig_mod.{first}", guidance.pairs[0].guide)])
    by_hand(x)
    assert by_hand.pairs[0].target == first


def test_a_compiled_target_sharing_a_module_with_the_guide_is_named_as_the_original():
    shared = nn.Linear(10, 8)
    target = torch.compile(nn.Sequential(shared, nn.ReLU(), nn.Linear(8, 3)), backend="eager")
    guide = nn.Sequential(shared, nn.ReLU(), nn.Linear(8, 5))
    with pytest.raises(GuidanceError, match=r"the guide shares the target's module '0' \(the guide's '0'\)"):
        rg.Guidance(target, torch.compile(guide, backend="eager"))
    with pytest.raises(LayerError, match=r"the target has no layer named 'nope'.* Its modules: 0, 1, 2 "):
        rg.Guidance(target, nn.Sequential(nn.Linear(10, 8), nn.ReLU()), pairs=[("nope", "0")])
