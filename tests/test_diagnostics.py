"""Pair diagnostics: what each pair starts from, its shuffled-batch floor, and where a guide layer's
across-example variance sits."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import repguide as rg
from repguide import data, models
from repguide.guidance import variance_shares


def _shares_reference(a: np.ndarray, masks: dict[str, np.ndarray]) -> dict[str, float]:
    """From the definition, with loops: Σ_{(i,t) in group} ‖a[i,t] − mean_i a[:,t]‖² / Σ_{all (i,t)}."""
    n, t, _ = a.shape
    dev = np.zeros((n, t))
    for j in range(t):
        mean = a[:, j].mean(axis=0)
        for i in range(n):
            dev[i, j] = ((a[i, j] - mean) ** 2).sum()
    return {k: float((dev * np.broadcast_to(m, dev.shape)).sum() / dev.sum()) for k, m in masks.items()}


def test_variance_shares_match_a_float64_reference_and_complementary_groups_sum_to_one():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 5, 3, generator=g) * torch.linspace(0.1, 2, 5)[None, :, None]
    per_example = torch.rand(7, 5, generator=g) > 0.5
    fixed = torch.tensor([True, False, False, True, False])
    masks = {"per_example": per_example, "rest": ~per_example, "fixed": fixed}
    ours = variance_shares(a, masks)
    ref = _shares_reference(a.double().numpy(), {k: v.numpy() for k, v in masks.items()})
    for k in masks:
        assert ours[k] == pytest.approx(ref[k], abs=1e-12)
    assert ours["per_example"] + ours["rest"] == pytest.approx(1.0, abs=1e-12)


def test_variance_shares_refuse_a_group_of_the_wrong_shape():
    with pytest.raises(rg.errors.GuidanceError, match="position group 'copy' has shape"):
        variance_shares(torch.randn(4, 6, 2), {"copy": torch.ones(5, dtype=torch.bool)})


def _copy_batch(n: int = 128):
    splits = data.create("copy_paste", min_len=20, max_len=20, train_size=n, val_size=4, test_size=4)
    x, y = splits.train.tensors[0][:n], splits.train.tensors[1][:n]
    return x, {"copy": y != data.IGNORE_INDEX}


@pytest.mark.parametrize("layers", ["blocks", "leaves"])
def test_our_untrained_copy_transformer_carries_no_variance_at_the_copy_positions(layers):
    x, positions = _copy_batch()
    torch.manual_seed(0)
    guide = models.copy_transformer()
    guidance = rg.Guidance(models.copy_rnn(num_layers=2), guide, layers=layers)
    for d in guidance.diagnose(x, positions=positions):
        assert d.shares["all"] == 1.0 and d.shares["copy"] < 1e-3, d


def test_an_untrained_guide_built_like_the_official_one_carries_variance_at_the_copy_positions():
    x, positions = _copy_batch()
    torch.manual_seed(0)
    guide = models.copy_transformer(norm="post", scale_embeddings=True, init="torch", memory="causal")
    guidance = rg.Guidance(models.copy_rnn(num_layers=2), guide)
    found = {d.guide: d for d in guidance.diagnose(x, positions=positions)}
    assert list(found) == ["blocks.0", "blocks.3"]
    assert found["blocks.3"].shares["copy"] > 0.2
    assert all(d.floor < d.similarity for d in found.values())


def test_a_pair_that_starts_at_one_is_flagged_and_the_networks_are_left_as_they_were():
    torch.manual_seed(0)
    target = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    guide = copy.deepcopy(target)
    before = {k: v.clone() for k, v in guide.state_dict().items()}
    guidance = rg.Guidance(target, guide, layers="leaves", pairs=[("0", "0"), ("3", "3")])
    target.train()
    result = guidance.diagnose(torch.randn(32, 6))
    assert [d.similarity for d in result] == pytest.approx([1.0, 1.0], abs=1e-5)
    assert all(d.warning and "within 0.02 of 1" in d.warning for d in result)
    assert all(d.floor < 0.9 for d in result)
    assert target.training and not guide.training
    assert all(torch.equal(before[k], v) for k, v in guide.state_dict().items())


def test_a_stored_config_with_the_old_layer_types_key_keeps_its_leaf_pairs():
    from repguide.config import load_recipe, upgrade

    recipe = load_recipe("copy_rnn_untrained_transformer", "tiny").model_dump(mode="json")
    assert recipe["guidance"]["layers"] == "leaves"  # shipped recipes state their rule
    stored = {**recipe, "guidance": {k: v for k, v in recipe["guidance"].items() if k != "layers"}}
    stored["guidance"]["layer_types"] = "default"  # how runs made before `layers` stored it
    assert upgrade(stored) == recipe
    stored["guidance"]["layer_types"] = "all"
    assert upgrade(stored)["guidance"]["layers"] == "all"


def test_every_guided_recipe_states_its_layer_rule():
    from repguide.config import _raw_recipe, list_recipes, load_recipe

    for name in list_recipes():
        config = load_recipe(name, "tiny")
        if config.guidance.mode != "none":
            assert "layers" in _raw_recipe(name).get("guidance", {}), name


def test_layers_command_feeds_a_sequence_model_token_ids(capsys):
    from repguide.cli import main

    assert main(["layers", "copy_transformer", "dim=16", "depth=2", "heads=2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "# copy_transformer: blocks layers, on an example of copy_paste"
    assert [line.split()[0] for line in out[1:]] == ["blocks.0", "blocks.1"]
    assert main(["layers", "copy_transformer", "--layers", "leaves"]) == 0
    assert "blocks.0.attn.qkv" in capsys.readouterr().out


def test_layers_command_on_data_the_model_cannot_take_says_to_give_data(tmp_path, capsys):
    from repguide.cli import main

    assert main(["layers", "deep_fcn", "--data", "copy_paste", "--data-kwargs", "train_size=16", "val_size=4", "test_size=4"]) == 2
    err = capsys.readouterr().err
    assert "model 'deep_fcn' cannot run on an example of data set 'copy_paste'" in err and "--data" in err


@pytest.mark.parametrize("model", ["gru_lm", "lstm_lm"])
def test_layers_command_feeds_token_ids_to_a_token_model_no_recipe_uses(model, capsys):
    from repguide.cli import main

    assert main(["layers", model, "hidden_dim=16"]) == 0  # was a TypeError posing as a repguide bug
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"# {model}: blocks layers, on an example of ") and "fashion_mnist" not in out[0]
    assert [line.split()[0] for line in out[1:]] == ["layers.0", "layers.1", "head"] and "(output head)" in out[-1]


def test_a_token_model_on_images_is_an_error_naming_the_knob_the_data_does_not_give(capsys):
    from repguide.build import build_model
    from repguide.cli import main
    from repguide.config import ModelConfig
    from repguide.errors import ModelError

    assert main(["layers", "gru_lm", "--data", "fashion_mnist"]) == 2
    assert "model 'gru_lm' needs 'vocab_size', which this data set does not give" in capsys.readouterr().err
    images = SimpleNamespace(num_classes=10, input_shape=(1, 28, 28), vocab_size=None)
    with pytest.raises(ModelError, match=r"model 'lstm_lm' needs 'vocab_size', .* or set it in guidance.guide.kwargs"):
        build_model(ModelConfig(name="lstm_lm"), images, 0, recipe_key="guidance.guide")


def test_pairs_command_prints_each_pair_with_its_floor_and_shares(capsys):
    from repguide.cli import main

    assert main(["pairs", "copy_rnn_untrained_transformer", "--scale", "tiny", "guidance.layers=blocks"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["target", "guide", "similarity", "floor", "share", "copy", "share", "source"]
    assert [line.split()[:2] for line in out[2:]] == [["layers.0", "blocks.0"], ["layers.1", "blocks.1"]]
    assert main(["pairs", "copy_rnn_baseline", "--scale", "tiny"]) == 2
    assert "guidance.mode='none' has no pairs" in capsys.readouterr().err


def test_a_guided_run_writes_its_pair_diagnostics(tmp_path):
    import json

    from repguide.config import load_recipe
    from repguide.train import train

    config = load_recipe("copy_rnn_untrained_transformer", "tiny", {"train.max_steps": 1})
    train(config, tmp_path, quiet=True)
    report = json.loads((tmp_path / config.name / "pairs.json").read_text())
    assert [(d["target"], d["guide"]) for d in report] == [("layers.0", "blocks.0.attn.qkv"), ("layers.1", "blocks.1.mlp.fc2")]
    assert set(report[0]) == {"target", "guide", "similarity", "floor", "shares", "warning"}
    assert set(report[0]["shares"]) == {"all", "source", "copy"}
