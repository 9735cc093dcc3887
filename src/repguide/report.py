"""Plots and tables from finished runs."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import matplotlib
from repguide.errors import ArgumentError
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from repguide.analysis import SimilarityMatrix  # noqa: E402
from repguide.runs import read_metrics  # noqa: E402

__all__ = [
    "mean_accuracy_by_length", "plot_alignment", "plot_claim", "plot_length_accuracy", "plot_run",
    "plot_similarity_matrix", "report_run",
]

BY_LENGTH = ("val_metric_by_length", "test_metric_by_length")  # summary.json's per-length entries


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write ``curves.png`` (train vs validation loss and metric), for guided runs
    ``similarity.png`` (every pair's similarity over training), and for runs whose examples have
    lengths ``length_accuracy.png`` (:func:`plot_length_accuracy`) into ``run_dir``."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.csv")
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    written = []
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot([r["step"] for r in train], [r["task_loss"] for r in train], label="train (task loss)", lw=1)
    ax_loss.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="validation")
    ax_loss.set(xlabel="step", ylabel="cross-entropy", title="loss")
    ax_loss.legend()
    ax_metric.plot([r["step"] for r in val], [r["metric"] for r in val], "o-", color="C1")
    ax_metric.set(xlabel="step", ylabel="metric", title="validation metric")
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=100)
    plt.close(fig)
    written.append(run_dir / "curves.png")
    pair_columns = [c for c in (rows[0] if rows else {}) if c.startswith("sim:")]
    if pair_columns and train:
        fig, ax = plt.subplots(figsize=(7, 4))
        for column in pair_columns:
            points = [(r["step"], r[column]) for r in train if r[column] is not None]
            if points:
                ax.plot(*zip(*points), lw=1, label=column[4:].replace("|", " ← "))
        ax.set(xlabel="step", ylabel="similarity", title=f"{run_dir.name}: similarity per pair")
        if len(pair_columns) <= 12:
            ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(run_dir / "similarity.png", dpi=100)
        plt.close(fig)
        written.append(run_dir / "similarity.png")
    if _by_length(run_dir):
        written.append(plot_length_accuracy(run_dir))
    return written


def _by_length(run_dir: Path) -> dict | None:
    """The run's summary.json where it has per-length metrics, else None."""
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {}
    return summary if any(k in summary for k in BY_LENGTH) else None


def plot_length_accuracy(run_dir: str | Path) -> Path:
    """``length_accuracy.png``: the final model's val and test metric at each example length (from
    summary.json), with the chance level of a 2-class task (parity) drawn at 0.5."""
    from repguide import data as datasets
    from repguide.build import run_config

    run_dir = Path(run_dir)
    summary = _by_length(run_dir)
    if summary is None:
        raise ArgumentError(f"{run_dir}/summary.json has no per-length metrics (the data's examples have no length)")
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in zip(BY_LENGTH, ("o-", "s--")):
        points = sorted((int(k), v) for k, v in summary.get(key, {}).items())
        if points:
            ax.plot(*zip(*points), style, ms=3, label=key.split("_")[0])
    config = run_config(run_dir)
    if summary["metric"] == "accuracy" and datasets.create(config.data.name, **config.data.kwargs).num_classes == 2:
        ax.axhline(0.5, color="grey", ls=":", label="chance (2 classes)")
    ax.set(xlabel="length", ylabel=summary["metric"], title=f"{run_dir.name}: final {summary['metric']} by length",
           ylim=(-0.02, 1.02) if summary["metric"] == "accuracy" else None)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "length_accuracy.png", dpi=100)
    plt.close(fig)
    return run_dir / "length_accuracy.png"


def mean_accuracy_by_length(run_dirs: Iterable[str | Path], split: str = "test") -> dict[int, float]:
    """Length → the mean over ``run_dirs`` (e.g. one recipe's seeds) of each run's final ``split``
    metric at that length (summary.json's ``{split}_metric_by_length``), each run counting once;
    a length only some runs scored is averaged over those. Sorted by length."""
    key, scores = f"{split}_metric_by_length", {}
    for run_dir in map(Path, run_dirs):
        path = run_dir / "summary.json"
        summary = json.loads(path.read_text()) if path.is_file() else {}
        if key not in summary:
            raise ArgumentError(f"{run_dir} has no {key} in summary.json (not finished, or its examples have no length)")
        for length, value in summary[key].items():
            scores.setdefault(int(length), []).append(value)
    return {length: sum(v) / len(v) for length, v in sorted(scores.items())}


def update_plots(run_dir: str | Path) -> list[Path]:
    """:func:`plot_run` after training, unless each of the run's plots is there and no older than its
    ``summary.json``: draws a new run's plots, redraws those of a run trained further, and draws
    what a run killed while plotting left out; a finished run resumed again keeps its plots."""
    run_dir = Path(run_dir)
    plots = [run_dir / "curves.png"] + ([run_dir / "similarity.png"] if _guided_pairs(run_dir) else [])
    plots += [run_dir / "length_accuracy.png"] if _by_length(run_dir) else []
    finished = (run_dir / "summary.json").stat().st_mtime_ns
    if all(p.is_file() and p.stat().st_mtime_ns >= finished for p in plots):
        return []
    return plot_run(run_dir)


def plot_claim(claim, stats: dict, path: str | Path) -> Path:
    """Bar chart of one claim's rows: mean ± std over seeds, each seed as a dot."""
    path = Path(path)
    labels = [row.label for row in claim.rows]
    fig, ax = plt.subplots(figsize=(1.6 * len(labels) + 2, 4))
    for i, row in enumerate(claim.rows):
        s = stats[row.run]
        if s.values:
            ax.bar(i, s.mean, yerr=s.std, color=f"C{i}", alpha=0.7, capsize=4)
            ax.plot([i] * len(s.values), s.values, "k.", ms=4)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (%)" if claim.higher_is_better else "test perplexity")
    ax.set_title(f"{claim.id}: {claim.title}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# Layer×layer similarity heatmaps


def _heatmap(fig, ax, result: SimilarityMatrix, title: str, labels: tuple[str, str], marked=()) -> None:
    """Rows: ``result.layers_a`` top to bottom; columns: ``result.layers_b``; ``marked``:
    (layer of A, layer of B) cells to outline, e.g. the pairs guidance aligned."""
    rows, cols = len(result.layers_a), len(result.layers_b)
    image = ax.imshow(result.matrix.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto",
                      interpolation="nearest")
    size = max(3.0, min(8.0, 360 / max(rows, cols)))
    ax.set_xticks(range(cols), result.layers_b, rotation=90, fontsize=size)
    ax.set_yticks(range(rows), result.layers_a, fontsize=size)
    ax.set(xlabel=labels[1], ylabel=labels[0], title=title)
    for a, b in marked:
        if a in result.layers_a and b in result.layers_b:
            i, j = result.layers_a.index(a), result.layers_b.index(b)
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.2))
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label="CKA")


def _figure_size(result: SimilarityMatrix, panels: int = 1) -> tuple[float, float]:
    width = 3.5 + 0.17 * len(result.layers_b)
    height = 3.5 + 0.17 * len(result.layers_a)
    return min(panels * width, 40.0), min(height, 24.0)


def plot_similarity_matrix(
    result: SimilarityMatrix,
    path: str | Path,
    title: str | None = None,
    labels: tuple[str, str] = ("model A", "model B"),
    marked=(),
) -> Path:
    """A heatmap of ``result`` (from :func:`repguide.analysis.compare`) with every layer named."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=_figure_size(result), layout="constrained")
    title = title or f"layer×layer similarity over {result.examples} examples"
    _heatmap(fig, ax, result, title, labels, marked)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _guided_pairs(run_dir: Path) -> list[tuple[str, str]]:
    """The (target, guide) pairs a run logged, from its metrics.csv header."""
    with (run_dir / "metrics.csv").open() as f:
        header = f.readline().strip().split(",")
    return [tuple(c[4:].split("|", 1)) for c in header if c.startswith("sim:")]


def plot_alignment(
    run_dir: str | Path,
    split: str = "val",
    examples: int | None = 2048,
    batch_size: int = 256,
    reduction: str | None = None,
) -> list[Path]:
    """For a guided run: the target-vs-guide layer×layer similarity with the target's initial
    weights (rebuilt from the run's seed) and with its final ones, on ``examples`` examples of
    ``split``. Writes ``alignment_start.csv``, ``alignment_end.csv`` and ``alignment.png`` (both
    heatmaps; the guided pairs outlined in red). ``reduction``: default the run's own."""
    from repguide import data as datasets
    from repguide.analysis import compare, ordered_batches
    from repguide.build import load_guide, load_model, run_config
    from repguide.capture import layers

    run_dir = Path(run_dir)
    config = run_config(run_dir)
    if config.guidance.mode != "guide":
        raise ArgumentError(f"{run_dir} is not a guided run (guidance.mode={config.guidance.mode!r})")
    reduction = reduction or config.guidance.reduction
    if reduction == "tokens":
        raise ArgumentError("the run aligned per token; give reduction 'flatten' or 'mean' for the heatmaps")
    splits = datasets.create(config.data.name, **config.data.kwargs)
    dataset = getattr(splits, split)
    guide = load_guide(config, splits, run_dir.parent)
    start, end = load_model(run_dir, splits, weights="init"), load_model(run_dir, splits)
    pairs = _guided_pairs(run_dir)
    *example, _ = dataset.batch(torch.arange(min(8, len(dataset))))
    # The candidate layers, plus any paired layer that is not one (patterns may name any module).
    target_layers = layers(start, *example, layers=config.guidance.layers) + [t for t, _ in pairs]
    guide_layers = layers(guide, *example, layers=config.guidance.layers) + [g for _, g in pairs]
    written, results = [], []
    for label, target in (("start", start), ("end", end)):
        result = compare(target, guide, ordered_batches(dataset, batch_size, examples),
                         target_layers, guide_layers, reduction=reduction)
        written.append(result.to_csv(run_dir / f"alignment_{label}.csv"))
        results.append(result)
    fig, axes = plt.subplots(1, 2, figsize=_figure_size(results[0], panels=2), layout="constrained")
    for ax, label, result in zip(axes, ("initial target", "final target"), results):
        _heatmap(fig, ax, result, f"{label} vs guide", ("target", "guide"), pairs)
    fig.suptitle(f"{run_dir.name}: minibatch linear CKA over {results[0].examples} {split} examples")
    fig.savefig(run_dir / "alignment.png", dpi=120)
    plt.close(fig)
    return written + [run_dir / "alignment.png"]


def report_run(run_dir: str | Path, **alignment) -> list[Path]:
    """Every plot of a finished run: :func:`plot_run`'s curves and per-pair similarity over
    training, and for a guided run :func:`plot_alignment`'s start and end heatmaps."""
    from repguide.build import run_config

    written = plot_run(run_dir)
    if run_config(run_dir).guidance.mode == "guide":
        written += plot_alignment(run_dir, **alignment)
    return written
