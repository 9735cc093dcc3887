"""Specification of the training loop and the recipes: every shipped recipe runs end to end at
the tiny scale (trained guides first, as `repguide reproduce` orders them), and each guidance mode
does what it says in the metrics it logs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import os

import pytest
import yaml

from repguide.config import list_recipes, load_recipe
from repguide.data.images import DEFAULT_ROOT, ENV_VAR, INSTALL_COMMAND
from repguide.reproduce import CLAIMS, plan, reproduce
from repguide.runs import RunDir
from repguide.train import train

GUIDED = "deep_fcn_untrained_resnet18"

# Most recipes train on Fashion-MNIST; `make test` installs it when run as root.
pytestmark = pytest.mark.skipif(
    not (Path(os.environ.get(ENV_VAR) or DEFAULT_ROOT) / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not installed (as root: {INSTALL_COMMAND})",
)


def rows(run: Path, split: str = "train") -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r["split"] == split]


def value(row: dict[str, str], key: str) -> float | None:
    return float(row[key]) if row[key] not in ("", None) else None


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory) -> Path:
    """Every recipe trained at the tiny scale for one seed, in `reproduce`'s order."""
    runs = tmp_path_factory.mktemp("runs")
    reproduce("tiny", seeds=1, runs_dir=runs, report=runs / "REPRODUCTION.md")
    for recipe in sorted(set(list_recipes()) - {row.recipe for row in plan(CLAIMS, "tiny")}):  # rows of no claim
        train(load_recipe(recipe, "tiny", {"name": f"{recipe}_s0"}), runs, quiet=True)
    return runs


def test_every_recipe_runs_at_the_tiny_scale_and_writes_its_results(tiny_runs):
    for recipe in list_recipes():
        run = RunDir(tiny_runs, f"{recipe}_s0")
        assert run.is_finished(), f"{recipe} did not finish at the tiny scale"
        for name in ("config.yaml", "metrics.csv", "summary.json", "final.pt"):
            assert (run.path / name).exists(), f"{recipe}: no {name}"
        assert rows(run.path), f"{recipe}: no training rows in metrics.csv"
    report = (tiny_runs / "REPRODUCTION.md").read_text()
    assert all(f"## {claim.id}:" in report for claim in CLAIMS)
    # The error-consistency analysis computed κ for every pair of its finished runs.
    kappa_rows = [line for line in report.splitlines() if "` vs `" in line]
    assert kappa_rows and all("(n=1)" in line for line in kappa_rows)


def test_the_baseline_logs_no_alignment_and_a_guided_run_logs_every_pair(tiny_runs):
    base = rows(tiny_runs / "deep_fcn_baseline_s0")
    assert all(value(r, "align_loss") is None for r in base)
    assert not any(k.startswith("sim:") for k in base[0])
    guided = rows(tiny_runs / f"{GUIDED}_s0")
    sims = [k for k in guided[0] if k.startswith("sim:")]
    assert sims
    for r in guided:
        # Alignment loss = weight × Σ over pairs of (1 − similarity); the loss adds the task loss.
        expected = sum(1 - value(r, k) for k in sims)
        assert value(r, "align_loss") == pytest.approx(expected, rel=1e-5)
        assert value(r, "loss") == pytest.approx(value(r, "task_loss") + value(r, "align_loss"), rel=1e-5)


def test_guidance_driven_initialisation_aligns_only_then_trains_plainly(tiny_runs):
    config = load_recipe("deep_fcn_init", "tiny")
    n = config.guidance.init_steps
    logged = rows(tiny_runs / "deep_fcn_init_s0")
    assert 0 < n < len(logged)
    for r in logged:
        if int(r["step"]) <= n:  # the loss is the alignment alone
            assert value(r, "loss") == pytest.approx(value(r, "align_loss"), rel=1e-6)
        else:  # guidance is off: no alignment term at all
            assert value(r, "align_loss") is None
            assert value(r, "loss") == pytest.approx(value(r, "task_loss"), rel=1e-6)
    # The init phase comes before the schedule: as many task steps as the baseline, evaluated as often.
    base = tiny_runs / "deep_fcn_baseline_s0"
    assert len(logged) - n == len(rows(base))
    assert len(rows(tiny_runs / "deep_fcn_init_s0", "val")) == len(rows(base, "val"))
    summary = json.loads((tiny_runs / "deep_fcn_init_s0" / "summary.json").read_text())
    assert summary["steps"] == json.loads((base / "summary.json").read_text())["steps"] + n
    assert summary["init_steps"] == n


def test_distillation_adds_a_term_to_the_task_loss(tiny_runs):
    for r in rows(tiny_runs / "deep_fcn_distill_s0"):
        align = value(r, "align_loss")
        assert align is not None and align >= 0 and math.isfinite(align)
        assert value(r, "loss") == pytest.approx(value(r, "task_loss") + align, rel=1e-5)


def test_guidance_switched_off_after_n_steps_leaves_no_alignment_term(tmp_path):
    config = load_recipe(GUIDED, "tiny", {"guidance.off_after": 2, "train.max_steps": 4, "train.epochs": 2})
    train(config, tmp_path, quiet=True)
    logged = rows(tmp_path / config.name)
    assert [int(r["step"]) for r in logged] == [1, 2, 3, 4]
    assert all(value(r, "align_loss") is not None for r in logged[:2])
    assert all(value(r, "align_loss") is None for r in logged[2:])


def test_the_guide_feature_cache_gives_the_same_run_as_the_guide_forward(tmp_path):
    """Epoch 2 reads every guide feature from the cache; the logged numbers must not change."""
    common = {"train.max_steps": None, "train.epochs": 2, "data.kwargs.train_size": 128}
    exact = load_recipe(GUIDED, "tiny", {**common, "name": "exact"})
    cached = load_recipe(GUIDED, "tiny", {**common, "name": "cached", "guidance.cache": True})
    train(exact, tmp_path, quiet=True)
    train(cached, tmp_path, quiet=True)
    a, b = rows(tmp_path / "exact"), rows(tmp_path / "cached")
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b):
        for key in ra:
            if key not in ("step_time", "split") and ra[key]:
                assert float(rb[key]) == pytest.approx(float(ra[key]), rel=1e-5, abs=1e-6), key


def test_the_guide_feature_cache_refuses_a_guide_that_sees_noise_when_the_recipe_loads():
    with pytest.raises(ValueError, match="guidance.cache=true .* sees noise"):
        load_recipe(GUIDED, "tiny", {"guidance.cache": True, "guidance.guide_input": "noise"})


def test_fast_mode_keys_reach_guidance(tmp_path):
    config = load_recipe(GUIDED, "tiny", {"guidance.sketch_dim": 8, "guidance.guide_precision": "bf16"})
    summary = train(config, tmp_path, quiet=True)
    assert math.isfinite(summary["val_loss"])
    exact = load_recipe(GUIDED, "tiny", {"name": "exact"})
    train(exact, tmp_path, quiet=True)
    sketched, plain = rows(tmp_path / config.name), rows(tmp_path / "exact")
    # The first step's alignment is taken before any update: the sketch must have changed it.
    assert value(sketched[0], "align_loss") != pytest.approx(value(plain[0], "align_loss"), rel=1e-4)


def test_resuming_a_finished_run_changes_nothing(tmp_path):
    config = load_recipe("deep_fcn_baseline", "tiny")
    train(config, tmp_path, quiet=True)
    run = tmp_path / config.name
    before = {f: (run / f).read_bytes() for f in ("summary.json", "metrics.csv", "final.pt")}
    train(config, tmp_path, resume=True, quiet=True)
    assert {f: (run / f).read_bytes() for f in before} == before


def test_a_checkpoint_that_is_not_a_training_checkpoint_is_a_clear_error(tmp_path):
    from repguide.runs import CheckpointError, atomic_save

    config = load_recipe("deep_fcn_baseline", "tiny")
    (tmp_path / config.name).mkdir()
    (tmp_path / config.name / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    atomic_save({"weights": 1}, tmp_path / config.name / "last.ckpt")
    with pytest.raises(CheckpointError, match="not a repguide training checkpoint .*--overwrite"):
        train(config, tmp_path, resume=True, quiet=True)


def test_reproduce_skips_finished_runs_and_retrains_those_whose_recipe_changed(tmp_path, capsys):
    args = dict(scale="tiny", seeds=1, runs_dir=tmp_path, report=None, only=["C1"], recipes=["deep_fcn_baseline"])
    reproduce(**args)
    metrics = tmp_path / "deep_fcn_baseline_s0" / "metrics.csv"
    first = metrics.read_bytes(), metrics.stat().st_mtime_ns
    capsys.readouterr()
    reproduce(**args)  # nothing to do
    assert (metrics.read_bytes(), metrics.stat().st_mtime_ns) == first
    assert "training" not in capsys.readouterr().out
    reproduce(**args, overrides={"optim.lr": 0.01})
    assert "deep_fcn_baseline_s0: the recipe changed (optim.lr); training again" in capsys.readouterr().out
    assert RunDir(tmp_path, "deep_fcn_baseline_s0").read_config()["optim"]["lr"] == 0.01


def test_reproduce_retrains_a_run_whose_trained_guide_was_trained_again(tmp_path, capsys):
    args = dict(scale="tiny", seeds=1, runs_dir=tmp_path, report=None, only=["C1"], recipes=["deep_fcn_resnet18"])
    reproduce(**args)
    reproduce(**{**args, "recipes": ["resnet18_fmnist"]}, overrides={"optim.lr": 0.01})  # a new guide
    capsys.readouterr()
    reproduce(**args)
    out = capsys.readouterr().out
    assert "deep_fcn_resnet18_s0: the recipe changed (its guide resnet18_fmnist_s0 was trained again)" in out


def test_a_language_model_reports_perplexity_on_every_split(tiny_runs):
    import json

    summary = json.loads((tiny_runs / "lm_rnn_baseline_s0" / "summary.json").read_text())
    assert summary["metric"] == "ppl_char"
    for split in ("train", "val", "test"):  # a perplexity, never an accuracy in [0, 1]
        assert summary[f"{split}_metric"] > 1.5, split
        assert summary[f"{split}_metric"] == pytest.approx(math.exp(summary[f"{split}_loss"]), rel=0.05)
