"""Plots and tables from finished runs."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from repguide.runs import read_metrics  # noqa: E402

__all__ = ["plot_claim", "plot_run"]


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write ``curves.png`` (train vs validation loss and metric) and, for guided runs,
    ``similarity.png`` (every pair's similarity over training) into ``run_dir``."""
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
    return written


def plot_claim(claim, stats: dict, path: str | Path) -> Path:
    """Bar chart of one claim's rows: mean ± std over seeds, each seed as a dot."""
    path = Path(path)
    labels = [row.label for row in claim.rows]
    fig, ax = plt.subplots(figsize=(1.6 * len(labels) + 2, 4))
    for i, row in enumerate(claim.rows):
        s = stats[row.recipe]
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
