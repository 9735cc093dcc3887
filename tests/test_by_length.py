"""Accuracy per example length: the final evaluation of a run whose examples have lengths (parity,
copy-paste) writes val and test accuracy and counts at each length into summary.json, in the same
pass as the overall metric; `length_accuracy.png` draws them; runs without lengths are unchanged."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import pytest
import torch

import repguide.data as data
from repguide.build import load_model
from repguide.config import load_recipe
from repguide.data.images import DEFAULT_ROOT, ENV_VAR, INSTALL_COMMAND
from repguide.errors import ArgumentError
from repguide.report import mean_accuracy_by_length, update_plots
from repguide.runs import OWN_FILES
from repguide.steps import evaluate
from repguide.train import train

PNG = b"\x89PNG\r\n\x1a\n"
HAVE_FMNIST = (Path(os.environ.get(ENV_VAR) or DEFAULT_ROOT) / "t10k-labels-idx1-ubyte.gz").is_file()
# The summary of a run whose examples have no length, key for key, as it was before lengths existed.
PLAIN_KEYS = {
    "name", "status", "scale", "steps", "init_steps", "metric", "train_loss", "train_metric",
    "val_loss", "val_metric", "test_loss", "test_metric", "best_val_metric", "seconds",
}


@pytest.fixture(scope="module")
def parity_run(tmp_path_factory) -> tuple[Path, dict]:
    runs = tmp_path_factory.mktemp("runs")
    config = load_recipe("parity_transformer_baseline", "tiny", {"name": "parity_s0"})
    summary = train(config, runs, quiet=True)
    update_plots(runs / "parity_s0")
    return runs / "parity_s0", summary


def test_a_parity_summary_has_per_length_metrics_whose_counts_sum_to_each_split(parity_run):
    run, summary = parity_run
    config = load_recipe("parity_transformer_baseline", "tiny")
    kwargs = config.data.kwargs
    assert summary == json.loads((run / "summary.json").read_text())  # returned as written: keys are strings
    for split in ("val", "test"):
        metrics, counts = summary[f"{split}_metric_by_length"], summary[f"{split}_count_by_length"]
        assert metrics.keys() == counts.keys()
        assert all(kwargs["min_len"] <= int(k) <= kwargs["max_len"] for k in counts)
        assert [int(k) for k in counts] == sorted(int(k) for k in counts)
        assert sum(counts.values()) == kwargs[f"{split}_size"]
        # The count-weighted mean of the per-length accuracies is the overall accuracy.
        weighted = sum(metrics[k] * counts[k] for k in counts) / sum(counts.values())
        assert weighted == pytest.approx(summary[f"{split}_metric"], abs=1e-9)
    assert set(summary) == PLAIN_KEYS | {f"{s}_{m}_by_length" for s in ("val", "test") for m in ("metric", "count")}


def test_per_length_accuracy_agrees_with_the_saved_model_scored_by_hand(parity_run):
    run, summary = parity_run
    config = load_recipe("parity_transformer_baseline", "tiny")
    splits = data.create(config.data.name, **config.data.kwargs)
    model = load_model(run, splits).eval()
    x, lengths, y = splits.test.batch(torch.arange(len(splits.test)))
    with torch.no_grad():
        predicted = model(x, lengths).argmax(-1)
    hits, counts = defaultdict(int), defaultdict(int)
    for length, right in zip(lengths.tolist(), (predicted == y).tolist()):
        hits[length] += right
        counts[length] += 1
    assert summary["test_count_by_length"] == {str(k): counts[k] for k in sorted(counts)}
    assert summary["test_metric_by_length"] == pytest.approx({str(k): hits[k] / counts[k] for k in counts}, abs=1e-12)


def test_the_length_plot_is_drawn_with_the_other_plots(parity_run):
    run, _ = parity_run
    png = (run / "length_accuracy.png").read_bytes()
    assert png.startswith(PNG) and len(png) > 1000
    assert update_plots(run) == []  # up to date with the summary: not drawn again
    assert {f.name for f in run.iterdir()} <= OWN_FILES  # --overwrite removes the plot with the rest


def test_mean_accuracy_by_length_averages_runs_each_counting_once(tmp_path, parity_run):
    run, summary = parity_run
    assert mean_accuracy_by_length([run]) == {int(k): v for k, v in summary["test_metric_by_length"].items()}
    for name, by_length in (("a", {"2": 1.0, "3": 0.5}), ("b", {"3": 0.7, "2": 0.5, "4": 0.25})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps({"test_metric_by_length": by_length}))
    means = mean_accuracy_by_length([tmp_path / "a", str(tmp_path / "b")])
    assert list(means) == [2, 3, 4] and means == pytest.approx({2: 0.75, 3: 0.6, 4: 0.25})
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "summary.json").write_text(json.dumps({"test_metric": 0.5}))
    with pytest.raises(ArgumentError, match="plain has no test_metric_by_length"):
        mean_accuracy_by_length([tmp_path / "a", tmp_path / "plain"])
    with pytest.raises(ArgumentError, match="val_metric_by_length"):
        mean_accuracy_by_length([tmp_path / "a"], split="val")


class _Guess(torch.nn.Module):
    """Fixed random logits per (token, position): some copies right, some wrong, without training."""

    def __init__(self, vocab: int, length: int):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, length, vocab, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return self.table[x, torch.arange(x.shape[1])]


def test_copy_paste_scores_each_length_over_its_copied_tokens():
    splits = data.copy_paste(num_symbols=3, min_len=2, max_len=5, train_size=8, val_size=300, test_size=8)
    x, y = splits.val.batch(torch.arange(len(splits.val)))
    model = _Guess(splits.vocab_size, x.shape[1])
    by = evaluate(model, splits.val, 64, "cpu", by_length=True)
    plain = evaluate(model, splits.val, 64, "cpu")
    assert plain.by_length is None and (plain.loss, plain.metric) == (by.loss, by.metric)
    keep = y != data.IGNORE_INDEX
    hits = ((model(x).argmax(-1) == y) & keep).sum(1)
    expected = {}
    for length in range(2, 6):
        rows = splits.val.lengths == length
        expected[length] = (hits[rows].sum().item() / keep[rows].sum().item(), int(rows.sum()) * (length + 1))
    assert by.by_length.keys() == expected.keys()
    for length, (metric, count) in by.by_length.items():
        assert count == expected[length][1] and metric == pytest.approx(expected[length][0], abs=1e-12)
    assert sum(m * n for m, n in by.by_length.values()) / sum(n for _, n in by.by_length.values()) == pytest.approx(by.metric, abs=1e-12)
    assert 0 < by.metric < 1


@pytest.mark.skipif(not HAVE_FMNIST, reason=f"Fashion-MNIST not installed (as root: {INSTALL_COMMAND})")
def test_a_run_without_lengths_gets_no_per_length_metrics_and_no_length_plot(tmp_path):
    summary = train(load_recipe("deep_fcn_baseline", "tiny", {"name": "fcn_s0"}), tmp_path, quiet=True)
    written = update_plots(tmp_path / "fcn_s0")
    assert set(summary) == PLAIN_KEYS
    assert set(json.loads((tmp_path / "fcn_s0" / "summary.json").read_text())) == PLAIN_KEYS
    assert not (tmp_path / "fcn_s0" / "length_accuracy.png").exists()
    assert tmp_path / "fcn_s0" / "curves.png" in written
