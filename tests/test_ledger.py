"""The results record (docs/reproduction/results/<runs folder>/): a suite spread over fresh checkouts
goes on from what earlier sessions recorded, and the report shows recorded runs the runs folder lacks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import repguide.reproduce as rp
from repguide.claims import load_claims
from repguide.errors import RunDirError
from repguide.ledger import Ledger
from repguide.runs import RunDir

CLAIM = """
claims:
  - id: C1
    title: Deep FCN
    statement: A trained ResNet guide makes a deep FCN train.
    paper_metric: top-5 (%)
    rows:
      - {recipe: deep_fcn_baseline, label: Deep FCN}
      - {recipe: deep_fcn_resnet18, label: ResNet-18 → Deep FCN}
    checks:
      - {better: deep_fcn_resnet18, worse: deep_fcn_baseline}
"""


@pytest.fixture
def suite(tmp_path, monkeypatch):
    """A one-claim suite whose `train` writes a finished run (config and summary, accuracy 0.25)
    and lists what it trained; the report's plots are skipped."""
    import repguide.report
    import repguide.train

    trained: list[str] = []

    def fake_train(config, runs_dir, **_):
        run = RunDir(runs_dir, config.name)
        run.path.mkdir(parents=True, exist_ok=True)
        run.write_config(config.model_dump(mode="json"))
        summary = {"status": "finished", "metric": "accuracy", "test_metric": 0.25, "train_metric": 0.5, "seconds": 60.0}
        (run.path / "summary.json").write_text(json.dumps(summary))
        trained.append(config.name)

    (tmp_path / "claims.yaml").write_text(CLAIM)
    monkeypatch.setattr(rp, "CLAIMS", load_claims(tmp_path / "claims.yaml"))
    monkeypatch.setattr(repguide.train, "train", fake_train)
    monkeypatch.setattr(repguide.report, "update_plots", lambda path: None)
    monkeypatch.setattr(repguide.report, "plot_claim", lambda claim, stats, path: path)
    return trained


def reproduce(tmp_path: Path, **kwargs) -> str:
    report = rp.reproduce("tiny", seeds=1, runs_dir=tmp_path / "runs", only=["C1"], report=tmp_path / "R.md", **kwargs)
    return report.read_text()


def test_a_fresh_checkout_trains_nothing_that_is_recorded_and_reports_it(tmp_path, suite, capsys):
    first = reproduce(tmp_path)
    assert suite == ["deep_fcn_baseline_s0", "resnet18_fmnist_s0", "deep_fcn_resnet18_s0"]
    folder = tmp_path / "docs" / "reproduction" / "results" / "runs"
    assert sorted(p.name for p in folder.iterdir()) == [
        "deep_fcn_baseline_s0.json", "deep_fcn_resnet18_s0.json", "resnet18_fmnist_s0.json"]
    entry = json.loads((folder / "deep_fcn_baseline_s0.json").read_text())
    stored = RunDir(tmp_path / "runs", "deep_fcn_baseline_s0").read_config()
    assert entry["summary"]["test_metric"] == 0.25 and entry["config"] == stored

    shutil.rmtree(tmp_path / "runs")  # a new checkout: the record is in git, the runs are not
    suite.clear()
    capsys.readouterr()
    assert reproduce(tmp_path) == first and suite == []
    assert "3 run(s) of seed 0 are finished in the record" in capsys.readouterr().out
    assert "25.00 ± 0.00 (n=1)" in first and "this section's finished runs took 2 min" in first


def test_a_recorded_run_whose_recipe_changed_trains_again_saying_why(tmp_path, suite, capsys):
    reproduce(tmp_path)
    shutil.rmtree(tmp_path / "runs")
    suite.clear()
    reproduce(tmp_path, overrides={"train.batch_size": 16})  # every row's config differs from its record
    assert suite == ["deep_fcn_baseline_s0", "resnet18_fmnist_s0", "deep_fcn_resnet18_s0"]
    assert "deep_fcn_baseline_s0: the recipe changed (train.batch_size); training again" in capsys.readouterr().out


def test_a_record_made_before_a_config_key_was_added_still_counts(tmp_path, suite):
    """A key added to the schema since a run was recorded takes its default, as for a run folder."""
    reproduce(tmp_path)
    shutil.rmtree(tmp_path / "runs")
    path = tmp_path / "docs" / "reproduction" / "results" / "runs" / "deep_fcn_baseline_s0.json"
    entry = json.loads(path.read_text())
    del entry["config"]["train"]["nonfinite"]  # written by an older repguide
    path.write_text(json.dumps(entry))
    suite.clear()
    reproduce(tmp_path)
    assert suite == []


def test_a_recorded_guide_trains_again_only_where_a_run_that_loads_it_trains(tmp_path, suite):
    reproduce(tmp_path)
    shutil.rmtree(tmp_path / "runs")
    (tmp_path / "docs" / "reproduction" / "results" / "runs" / "deep_fcn_resnet18_s0.json").unlink()
    suite.clear()
    reproduce(tmp_path)  # the guided run has to train, and the record holds no guide weights
    assert suite == ["resnet18_fmnist_s0", "deep_fcn_resnet18_s0"]


def test_a_run_in_the_runs_folder_wins_over_its_record(tmp_path, suite):
    reproduce(tmp_path)
    summary = tmp_path / "runs" / "deep_fcn_baseline_s0" / "summary.json"
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "test_metric": 0.75}))
    text = reproduce(tmp_path)
    assert "| Deep FCN | `deep_fcn_baseline` | — | 75.00 ± 0.00 (n=1) |" in text
    record = Ledger(tmp_path / "docs" / "reproduction" / "results" / "runs").summary("deep_fcn_baseline_s0")
    assert record["test_metric"] == 0.75  # the report re-records what it shows


def test_an_unfinished_run_is_not_recorded_and_a_broken_record_names_its_file(tmp_path):
    runs, ledger = tmp_path / "runs", Ledger(tmp_path / "results")
    run = RunDir(runs, "x_s0")
    run.path.mkdir(parents=True)
    (run.path / "summary.json").write_text(json.dumps({"status": "failed"}))
    assert not ledger.record(run) and ledger.summary("x_s0") is None
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "y_s0.json").write_text("[1, 2]")
    with pytest.raises(RunDirError, match=r"y_s0\.json: not a results record \(expected an object"):
        ledger.summary("y_s0")
    (tmp_path / "results" / "z_s0.json").write_text('{"config": ')
    with pytest.raises(RunDirError, match=r"z_s0\.json: not a results record, its JSON does not parse"):
        ledger.summary("z_s0")


def test_a_chosen_claim_with_no_run_here_nor_recorded_keeps_its_section(tmp_path, suite, capsys):
    first = reproduce(tmp_path)
    shutil.rmtree(tmp_path / "runs")
    shutil.rmtree(tmp_path / "docs" / "reproduction" / "results")  # an older checkout, before the record
    rp.write_report(rp.CLAIMS, "tiny", 1, tmp_path / "runs", tmp_path / "R.md", 0.0, only=["C1"])
    assert "25.00 ± 0.00 (n=1)" in (tmp_path / "R.md").read_text() and "not run" not in first
    assert "C1: no run of it in" in capsys.readouterr().out


def test_a_recorded_run_trains_again_when_its_guide_does_for_a_changed_recipe(tmp_path, suite, capsys):
    reproduce(tmp_path)
    shutil.rmtree(tmp_path / "runs")
    path = tmp_path / "docs" / "reproduction" / "results" / "runs" / "resnet18_fmnist_s0.json"
    entry = json.loads(path.read_text())
    entry["config"]["train"]["batch_size"] += 1  # the guide's recipe has changed since it was recorded
    path.write_text(json.dumps(entry))
    suite.clear()
    reproduce(tmp_path)
    assert suite == ["resnet18_fmnist_s0", "deep_fcn_resnet18_s0"]
    assert "deep_fcn_resnet18_s0: the recipe changed (its guide resnet18_fmnist_s0 is trained again)" in capsys.readouterr().out
