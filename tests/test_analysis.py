"""Specifications of repguide.analysis (minibatch CKA, compare, error consistency, models by
reference) and of the compare / consistency / report commands."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from repguide.analysis import (
    MinibatchCKA,
    SimilarityMatrix,
    compare,
    correct,
    error_consistency,
    ordered_batches,
)
from repguide.build import load_model
from repguide.cli import main
from repguide.similarity import get_measure

# --------------------------------------------------------------------------------------------
# An independent float64 reference: HSIC₁ as the U-statistic it is (Song et al. 2012), means over
# tuples of distinct examples of uncentred linear kernels, no closed form, no centring.


def hsic1_reference(x: np.ndarray, y: np.ndarray) -> float:
    k, l = x @ x.T, y @ y.T
    n = len(k)
    pairs = list(itertools.permutations(range(n), 2))
    triples = list(itertools.permutations(range(n), 3))
    quads = list(itertools.permutations(range(n), 4))
    same = np.mean([k[i, j] * l[i, j] for i, j in pairs])
    shared = np.mean([k[i, j] * l[i, q] for i, j, q in triples])
    apart = np.mean([k[i, j] * l[q, r] for i, j, q, r in quads])
    return same + apart - 2 * shared


def minibatch_cka_reference(batches_x, batches_y) -> float:
    """Nguyen et al. 2021: average each HSIC₁ over the batches, then take the CKA ratio."""
    xy = np.mean([hsic1_reference(x, y) for x, y in zip(batches_x, batches_y)])
    xx = np.mean([hsic1_reference(x, x) for x in batches_x])
    yy = np.mean([hsic1_reference(y, y) for y in batches_y])
    return xy / np.sqrt(xx * yy)


def random_batches(sizes, width, seed, scales=None):
    g = np.random.default_rng(seed)
    scales = scales or [1.0] * len(sizes)
    return [s * g.standard_normal((n, width)) + g.standard_normal(width) for n, s in zip(sizes, scales)]


def test_minibatch_cka_equals_a_float64_reference_that_averages_hsic_over_batches():
    sizes = [7, 8, 6]
    # Batches of very different scales: a per-batch normalisation would change the result.
    xs = [random_batches(sizes, 5, 0, [1.0, 1e3, 0.1]), random_batches(sizes, 9, 1)]
    shared = random_batches(sizes, 3, 2)
    ys = [[np.hstack([s, 0.3 * x[:, :2]]) for s, x in zip(shared, xs[0])], shared]
    acc = MinibatchCKA(2, 2)
    for b in range(len(sizes)):
        acc.update([torch.from_numpy(x[b]) for x in xs], [torch.from_numpy(y[b]) for y in ys])
    expected = [[minibatch_cka_reference(x, y) for y in ys] for x in xs]
    assert acc.batches == 3 and acc.examples == sum(sizes)
    torch.testing.assert_close(acc.compute(), torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-12)


def deep_fcn_activations(batches: int, n: int) -> list[list[torch.Tensor]]:
    """Per batch, float32 outputs of layers 1, 6 and 12 of a 12-layer ReLU FCN at PyTorch's default
    init (the deep ones small in magnitude and nearly constant across examples), and a layer far
    from zero with small deviations (1000 + 0.01·noise)."""
    torch.manual_seed(0)
    fcn = nn.Sequential(*[m for i in range(12) for m in (nn.Linear(32 if i == 0 else 128, 128), nn.ReLU())])
    out = []
    for _ in range(batches):
        h, acts = torch.randn(n, 32), []
        for i, layer in enumerate(fcn):
            h = layer(h).detach()
            if i in (1, 11, 23):
                acts.append(h)
        acts.append(1000 + 0.01 * torch.randn(n, 64))
        out.append(acts)
    return out


def test_float32_activations_are_within_1e_6_of_a_float64_reference_on_deep_and_offset_layers():
    batches = deep_fcn_activations(4, 64)
    assert batches[0][2].abs().mean() < 0.05 and batches[0][2].std(0).mean() < 0.1 * batches[0][2].abs().mean()
    per_layer = [[b[i].double().numpy() for b in batches] for i in range(4)]

    def hsic1(x, y):  # Song et al. (2012) eq. 5 (the U-statistic above is O(n⁴) at n = 64), on
        # float64-centred features, or on uncentred float32 ones for the last check below
        k, l = [((f - f.mean(0)) if f.dtype == np.float64 else f) for f in (x, y)]
        k, l = (k @ k.T).astype(np.float64), (l @ l.T).astype(np.float64)
        np.fill_diagonal(k, 0), np.fill_diagonal(l, 0)
        n = len(k)
        return ((k * l).sum() + k.sum() * l.sum() / ((n - 1) * (n - 2)) - 2 / (n - 2) * (k @ l).sum()) / (n * (n - 3))

    def reference(xs, ys):
        xy, xx, yy = (np.mean([hsic1(a, b) for a, b in zip(u, v)]) for u, v in ((xs, ys), (xs, xs), (ys, ys)))
        return xy / np.sqrt(xx * yy)

    expected = torch.tensor([[reference(x, y) for y in per_layer] for x in per_layer])
    default, all64 = MinibatchCKA(4, 4), MinibatchCKA(4, 4, gram_dtype=torch.float64)
    for acts in batches:
        default.update(acts, acts)
        all64.update(acts, acts)
    # The default: the Gram products in float32 (the activations' precision), the HSIC sums in float64.
    assert default.compute().dtype == torch.float64
    assert (default.compute() - expected).abs().max() < 1e-6
    assert (all64.compute() - expected).abs().max() < 1e-12
    # These layers are hard: float32 Grams of the uncentred features are far off on them.
    raw = [[b[i].numpy() for b in batches] for i in range(4)]
    uncentred = torch.tensor([[reference(x, y) for y in raw] for x in raw])  # float32 Grams, no centring
    assert (uncentred - expected).abs().max() > 1e-3


def test_minibatch_cka_of_one_batch_equals_cka_unbiased():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 30, generator=g, dtype=torch.float64)
    ys = [x @ torch.randn(30, 8, generator=g, dtype=torch.float64),
          torch.randn(40, 100, generator=g, dtype=torch.float64)]
    acc = MinibatchCKA(1, 2)
    acc.update([x], ys)
    expected = torch.stack([get_measure("cka_unbiased")(x, y) for y in ys])
    torch.testing.assert_close(acc.compute()[0], expected, rtol=1e-12, atol=1e-12)


def test_minibatch_cka_accepts_float32_features_and_computes_in_float64():
    x = torch.randn(16, 10)
    acc = MinibatchCKA(1, 1)
    acc.update([x], [x])
    assert acc.compute().dtype == torch.float64
    assert acc.compute().item() == pytest.approx(1.0, abs=1e-12)


def test_a_constant_layer_scores_zero_against_everything():
    x, constant = torch.randn(10, 4), torch.full((10, 3), 2.5)
    acc = MinibatchCKA(2, 2)
    acc.update([x, constant], [x, constant])
    acc.update([x, constant], [x, constant])
    result = acc.compute()
    assert torch.isfinite(result).all()
    assert result[1].tolist() == [0.0, 0.0] and result[:, 1].tolist() == [0.0, 0.0]


def test_minibatch_cka_rejects_a_batch_of_fewer_than_four_examples():
    with pytest.raises(ValueError, match="at least 4"):
        MinibatchCKA(1, 1).update([torch.randn(3, 2)], [torch.randn(3, 2)])


def test_minibatch_cka_rejects_layers_over_different_examples():
    with pytest.raises(ValueError, match="same examples"):
        MinibatchCKA(1, 1).update([torch.randn(8, 2)], [torch.randn(9, 2)])


# --------------------------------------------------------------------------------------------
# compare


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))


def cnn():
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(), nn.Flatten(), nn.Linear(256, 3),
    )


def images(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_compare_returns_every_candidate_layer_of_each_model_in_execution_order():
    x, y = images()
    result = compare(mlp(), cnn(), [(x, y)])
    # No blocks, so the leaf layers: the CNN's BatchNorm is one, under the default rule only.
    assert result.layers_a == ["1", "3", "5"] and result.layers_b == ["0", "1", "3", "6"]
    assert result.matrix.shape == (3, 4) and result.matrix.dtype == torch.float64
    assert compare(mlp(), cnn(), [(x, y)], layers="leaves").layers_b == ["0", "3", "6"]
    assert result.examples == 24


def test_compare_with_one_batch_equals_cka_unbiased_of_each_layer_pair():
    x, _ = images()
    a, b = mlp(), cnn()
    result = compare(a, b, [x], layers="leaves")  # the layers hooked below
    acts = {}
    hooks = [m.register_forward_hook(lambda m, i, o, k=k: acts.__setitem__(k, o.flatten(1)))
             for k, m in [("a1", a[1]), ("a5", a[5]), ("b0", b[0]), ("b3", b[3])]]
    with torch.no_grad():
        a.eval()(x), b.eval()(x)
    for h in hooks:
        h.remove()
    measure = get_measure("cka_unbiased")
    for (i, ka), (j, kb) in itertools.product([(0, "a1"), (2, "a5")], [(0, "b0"), (1, "b3")]):
        expected = measure(acts[ka].double(), acts[kb].double())
        assert result.matrix[i, j].item() == pytest.approx(expected.item(), abs=1e-6)


def test_comparing_a_model_with_itself_gives_a_symmetric_matrix_with_unit_diagonal():
    x, y = images(32)
    model = cnn()
    result = compare(model, model, [(x[:16], y[:16]), (x[16:], y[16:])])
    torch.testing.assert_close(result.matrix.diagonal(), torch.ones(len(result.layers_a), dtype=torch.float64))
    torch.testing.assert_close(result.matrix, result.matrix.T)


def test_compare_of_one_model_with_two_layer_lists_uses_both():
    x, _ = images()
    model = mlp()
    result = compare(model, model, [x], layers_a=["1"], layers_b=["3", "5"])
    assert (result.layers_a, result.layers_b) == (["1"], ["3", "5"])


def test_compare_reads_a_dataloader_and_leaves_out_a_last_batch_too_small_for_the_unbiased_hsic():
    x, y = images(19)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)  # 8, 8, 3
    assert compare(mlp(), cnn(), loader).examples == 16


def test_compare_stops_after_max_examples():
    x, y = images(24)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    result = compare(mlp(), cnn(), loader, max_examples=13)
    full = compare(mlp(), cnn(), [(x[:8], y[:8]), (x[8:13], y[8:13])])
    assert result.examples == 13
    torch.testing.assert_close(result.matrix, full.matrix)


def test_compare_selects_layers_by_name_pattern_in_execution_order():
    x, _ = images()
    result = compare(mlp(), cnn(), [x], layers_a=["5", "[13]"], layers_b="*")
    assert result.layers_a == ["1", "3", "5"]
    assert "1" in result.layers_b and "5" in result.layers_b  # every module, not only candidates
    with pytest.raises(ValueError, match="no model A layer matches 'conv9'"):
        compare(mlp(), cnn(), [x], layers_a="conv9")


def test_compare_restores_training_modes_and_leaves_no_hooks():
    x, _ = images()
    a, b = mlp().train(), cnn().eval()
    compare(a, b, [x])
    assert a.training and not b.training
    assert all(not m._forward_hooks for m in itertools.chain(a.modules(), b.modules()))


def test_compare_finds_the_batch_axis_when_the_batch_size_equals_a_layer_width():
    class TokenMLP(nn.Module):  # (n, T, 16) outputs from Linear layers with no batch_first flag
        def __init__(self):
            super().__init__()
            self.embed, self.fc = nn.Embedding(10, 16), nn.Linear(16, 16)

        def forward(self, x):
            return self.fc(self.embed(x))

    tokens = torch.randint(0, 10, (16, 5))
    result = compare(TokenMLP(), TokenMLP(), [tokens])
    assert result.layers_a == ["fc"] and torch.isfinite(result.matrix).all()


def test_similarity_matrix_round_trips_through_csv(tmp_path):
    result = SimilarityMatrix(torch.rand(2, 3, dtype=torch.float64), ["a.0", "a.1"], ["b.0", "b.1", "b.2"], 10)
    back = SimilarityMatrix.read_csv(result.to_csv(tmp_path / "m.csv"))
    assert (back.layers_a, back.layers_b) == (result.layers_a, result.layers_b)
    assert torch.equal(back.matrix, result.matrix)
    assert back["a.1", "b.2"] == result.matrix[1, 2].item()


# --------------------------------------------------------------------------------------------
# Error consistency


def test_error_consistency_matches_a_hand_computed_example():
    a = torch.tensor([1, 1, 1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    b = torch.tensor([1, 1, 1, 1, 0, 0, 1, 1, 0, 0], dtype=torch.bool)
    # both right on 4, both wrong on 2: c_obs = 0.6; p_a = p_b = 0.6, so
    # c_exp = 0.6·0.6 + 0.4·0.4 = 0.52 and κ = (0.6 − 0.52) / (1 − 0.52) = 1/6.
    result = error_consistency(a, b)
    assert result.observed == pytest.approx(0.6)
    assert result.expected == pytest.approx(0.52)
    assert result.kappa == pytest.approx(1 / 6)
    assert (result.accuracy_a, result.accuracy_b, result.examples) == (pytest.approx(0.6), pytest.approx(0.6), 10)


def test_error_consistency_is_one_for_identical_errors_and_zero_for_independent_ones():
    a = torch.tensor([1, 0, 1, 1, 0], dtype=torch.bool)
    assert error_consistency(a, a).kappa == pytest.approx(1.0)
    x = torch.tensor([1, 1, 0, 0], dtype=torch.bool)
    y = torch.tensor([1, 0, 1, 0], dtype=torch.bool)
    assert error_consistency(x, y).kappa == pytest.approx(0.0)


def test_error_consistency_is_undefined_when_both_classifiers_are_always_right():
    ones = torch.ones(5, dtype=torch.bool)
    assert np.isnan(error_consistency(ones, ones).kappa)


def test_error_consistency_rejects_vectors_over_different_examples():
    with pytest.raises(ValueError, match="same examples"):
        error_consistency(torch.ones(4, dtype=torch.bool), torch.ones(5, dtype=torch.bool))


def test_correct_scores_each_token_and_skips_ignored_targets():
    class Fixed(nn.Module):
        def forward(self, x):
            return nn.functional.one_hot(x, 4).float()  # predicts its input token

    x = torch.tensor([[0, 1, 2], [3, 3, 1]])
    y = torch.tensor([[0, 2, -100], [3, -100, 1]])
    assert correct(Fixed(), [(x, y)]).tolist() == [True, False, True, True]


# --------------------------------------------------------------------------------------------
# Models by reference, and the commands


@pytest.fixture(scope="module")
def guided_run(tmp_path_factory):
    """A finished 3-step run: a copy-paste RNN guided by an untrained Transformer."""
    from repguide.config import load_recipe
    from repguide.train import train

    runs = tmp_path_factory.mktemp("runs")
    config = load_recipe("copy_rnn_untrained_transformer", "tiny")
    train(config, runs, quiet=True)
    return runs / config.name


COPY = ["--data", "copy_paste", "--data-kwargs", "min_len=4", "max_len=4", "train_size=64", "val_size=64",
        "test_size=64"]


def copy_splits():
    from repguide import data

    return data.create("copy_paste", min_len=4, max_len=4, train_size=64, val_size=64, test_size=64)


def test_load_model_builds_a_registry_name_from_its_seed():
    splits = copy_splits()
    a, b = (load_model("copy_rnn", splits, seed=3, kwargs={"hidden_dim": 8}) for _ in range(2))
    c = load_model("copy_rnn", splits, seed=4, kwargs={"hidden_dim": 8})
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_a_run_folder_whose_config_is_not_yaml_is_a_config_error_naming_the_file(tmp_path):
    from repguide.build import run_config
    from repguide.errors import ConfigError

    (tmp_path / "config.yaml").write_text("model: [")
    with pytest.raises(ConfigError, match=r"^run config .*config\.yaml is not valid YAML at line 1, column 9: "):
        run_config(tmp_path)


def test_load_model_reads_a_run_folder_its_checkpoints_and_its_initial_weights(guided_run):
    from repguide.build import build_model, run_config
    from repguide.runs import load_weights

    splits = copy_splits()
    config = run_config(guided_run)
    final = load_weights(guided_run / "final.pt")
    for ref in (guided_run, guided_run / "final.pt", guided_run / "last.ckpt",
                f"{config.model.name}:{guided_run / 'final.pt'}"):
        kwargs = config.model.kwargs if ":" in str(ref) and not Path(ref).exists() else None
        state = load_model(ref, splits, kwargs=kwargs).state_dict()
        assert all(torch.equal(state[k], v) for k, v in final.items()), ref
    init = load_model(guided_run, splits, weights="init").state_dict()
    rebuilt = build_model(config.model, splits, config.train.seed).state_dict()
    assert all(torch.equal(init[k], v) for k, v in rebuilt.items())
    assert not all(torch.equal(init[k], v) for k, v in final.items())


def test_load_model_names_the_accepted_references():
    with pytest.raises(ValueError, match="neither a run folder"):
        load_model("no_such_model", copy_splits())


def test_compare_command_writes_a_csv_and_a_heatmap(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "copy_rnn", "copy_transformer", *COPY, "--examples", "48", "--batch-size", "16",
            "--a-kwargs", "hidden_dim=12", "--b-kwargs", "dim=8", "depth=2", "heads=2", "--out", str(out)]
    assert main(argv) == 0
    result = SimilarityMatrix.read_csv(f"{out}.csv")
    assert result.layers_a == ["layers.0", "layers.1", "head"]
    assert result.layers_b == ["blocks.0", "blocks.1"]  # blocks: the output head is none of them
    assert Path(f"{out}.png").stat().st_size > 0
    assert "wrote" in capsys.readouterr().out


def test_consistency_command_prints_kappa_as_json(capsys):
    argv = ["consistency", "copy_rnn", "copy_rnn", *COPY, "--seed-b", "1", "--a-kwargs", "hidden_dim=8",
            "--b-kwargs", "hidden_dim=8"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 64 * 5  # every predicted token: 4 symbols and the end token
    assert -1 <= result["kappa"] <= 1


def test_report_command_writes_start_and_end_heatmaps_of_a_guided_run(guided_run, capsys):
    assert main(["report", str(guided_run), "--examples", "32", "--batch-size", "16"]) == 0
    start = SimilarityMatrix.read_csv(guided_run / "alignment_start.csv")
    end = SimilarityMatrix.read_csv(guided_run / "alignment_end.csv")
    with (guided_run / "metrics.csv").open() as f:
        pairs = [c[4:].split("|") for c in f.readline().strip().split(",") if c.startswith("sim:")]
    for target, guide in pairs:  # every guided pair is in the heatmaps
        assert target in start.layers_a and guide in start.layers_b
    assert start.layers_a == end.layers_a and not torch.equal(start.matrix, end.matrix)
    for name in ("alignment.png", "similarity.png", "curves.png"):
        assert (guided_run / name).stat().st_size > 0


FMNIST = Path(os.environ.get("REPGUIDE_FASHION_MNIST") or "/usr/share/datasets/fashion-mnist")


@pytest.mark.fmnist
@pytest.mark.skipif(not (FMNIST / "t10k-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST not installed")
def test_compare_command_on_fashion_mnist_images(tmp_path):
    out = tmp_path / "cmp"
    argv = ["compare", "resnet18", "deep_fcn", "--data", "fashion_mnist", "--examples", "64",
            "--a-kwargs", "width=4", "--b-kwargs", "depth=3", "width=16", "--out", str(out)]
    assert main(argv) == 0
    result = SimilarityMatrix.read_csv(f"{out}.csv")
    assert result.layers_a[0] == "layer1.0"  # blocks: not the stem
    assert result.layers_b == ["blocks.0", "blocks.1", "blocks.2"]


@pytest.mark.parametrize("a, b", [("resnet81", "deep_fcn"), ("resnet18", "runs/no_such_run")])
def test_compare_command_names_a_model_it_cannot_resolve_before_asking_for_data(a, b, capsys):
    assert main(["compare", a, b]) == 2
    err = capsys.readouterr().err
    wrong = a if a == "resnet81" else b
    assert f"'{wrong}' is neither a run folder, a weights file, nor a model name" in err and "--data" not in err


def test_ordered_batches_cover_the_first_examples_in_order():
    x = torch.arange(10)
    from repguide.data import TensorExamples

    batches = list(ordered_batches(TensorExamples(x, x), 4, max_examples=9))
    assert [b[0].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]

