"""The paper's claims as data (recipes/claims/paper.yaml): every entry validates against the recipes,
a bad entry fails at load time naming the claim and the key, and an ablation table (rows = a recipe
plus overrides) is trained and reported like any claim."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import repguide.reproduce as rp
from repguide.claims import load_claims
from repguide.config import list_recipes
from repguide.errors import ConfigError

CLAIM = """
claims:
  - id: C1
    title: Deep FCN
    statement: A deep FCN barely trains; an untrained ResNet guide makes it train.
    paper_metric: top-5 (%)
    rows:
      - {recipe: deep_fcn_baseline, label: Deep FCN, paper: "1.65"}
      - {recipe: deep_fcn_untrained_resnet18, label: untrained ResNet-18 → Deep FCN}
    checks:
      - {better: deep_fcn_untrained_resnet18, worse: deep_fcn_baseline}
"""

ABLATION = CLAIM + """
  - id: C1-weight
    ablates: C1
    title: The alignment weight
    statement: Each row changes one setting of the guided recipe.
    paper_metric: "—"
    rows:
      - {recipe: deep_fcn_untrained_resnet18, label: weight 1 (the recipe)}
      - {recipe: deep_fcn_resnet18, run: deep_fcn_resnet18-w0.1, label: "trained guide, weight 0.1",
         overrides: {guidance.weight: 0.1}}
    checks:
      - {better: deep_fcn_untrained_resnet18, worse: deep_fcn_resnet18-w0.1}
"""


def claims_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "claims.yaml"
    path.write_text(text)
    return path


def test_the_shipped_claims_validate_and_every_row_is_a_shipped_recipe():
    claims = load_claims()
    assert [c.id for c in claims][:6] == ["C1", "C2", "C3", "C4", "C5", "C6"]
    assert {row.recipe for c in claims for row in c.rows} <= set(list_recipes())
    assert rp.CLAIMS == claims


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("paper_metric:", "paper_metrc:", r"claim 'C1':\n  paper_metric: a required key is missing\n  unknown key 'paper_metrc' \(did you mean 'paper_metric'\?\)"),
        ("{recipe: deep_fcn_baseline,", "{recipe: deep_fcn_baselin,",
         r"claim 'C1':\n  rows.0.recipe: no shipped recipe 'deep_fcn_baselin'; did you mean 'deep_fcn_baseline'"),
        ("worse: deep_fcn_baseline}", "worse: deep_fcn}", r"claim 'C1':\n  checks.0: 'deep_fcn' is no row's run"),
        ("paper: \"1.65\"}", "overrides: {optim.lr: 0.1}}", r"rows.0: a row with overrides needs a run name of its own"),
        ("paper: \"1.65\"}", "run: x, overrides: {optim.lrr: 0.1}}", r"rows.0: invalid run config:\s+unknown key 'optim.lrr' \(did you mean 'optim.lr'\?\)"),
        ("id: C1", "id: C 1", r"claim 'C 1':\n  id: String should match pattern"),
    ],
)
def test_an_invalid_claim_fails_at_load_time_naming_the_claim_and_the_key(tmp_path, old, new, message):
    with pytest.raises(ConfigError, match=message):
        load_claims(claims_file(tmp_path, CLAIM.replace(old, new, 1)))


@pytest.mark.parametrize(
    "text, message",
    [
        ("claims: [", r"claims file .*claims\.yaml is not valid YAML at line 1, column 10: expected"),
        ("- id: C1\n", r"claims file .*claims\.yaml must be a mapping of keys to values .*, got a list"),
        ("", r"claims file .*claims\.yaml must hold one key, claims: a list of claim entries"),
        ("claims: {id: C1}", r"claims file .*claims\.yaml must hold one key, claims: a list of claim entries"),
    ],
)
def test_a_claims_file_that_is_not_a_list_of_claims_fails_naming_the_file(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_claims(claims_file(tmp_path, text))


def test_a_run_name_means_one_recipe_with_one_set_of_overrides_across_claims(tmp_path):
    other = '      - {recipe: deep_fcn_resnet18, run: deep_fcn_resnet18-w0.1, label: w, overrides: {guidance.weight: 0.5}}'
    text = ABLATION.replace('paper: "1.65"}', 'paper: "1.65"}\n' + other, 1)
    with pytest.raises(ConfigError, match=r"claim 'C1-weight': rows: run 'deep_fcn_resnet18-w0.1' is .*0.1.* but .*0.5"):
        load_claims(claims_file(tmp_path, text))


def test_an_ablation_table_must_name_an_earlier_claim(tmp_path):
    with pytest.raises(ConfigError, match=r"claim 'C1-weight': ablates: 'C9' is no earlier claim's id"):
        load_claims(claims_file(tmp_path, ABLATION.replace("ablates: C1", "ablates: C9")))


def test_an_ablation_table_is_trained_and_reported_like_a_claim(tmp_path, monkeypatch, capsys):
    import repguide.report
    import repguide.train

    trained = []

    def fake_train(config, runs_dir, **_):  # a finished run whose accuracy is its alignment weight
        trained.append(config)
        (Path(runs_dir) / config.name).mkdir(parents=True)
        summary = {"status": "finished", "metric": "accuracy", "test_metric": config.guidance.weight / 2,
                   "train_metric": config.guidance.weight / 2, "seconds": 1.0}
        (Path(runs_dir) / config.name / "summary.json").write_text(json.dumps(summary))

    monkeypatch.setattr(rp, "CLAIMS", load_claims(claims_file(tmp_path, ABLATION)))
    monkeypatch.setattr(repguide.train, "train", fake_train)
    monkeypatch.setattr(repguide.report, "update_plots", lambda path: None)
    report = rp.reproduce("tiny", seeds=1, runs_dir=tmp_path / "runs", only=["C1"], report=tmp_path / "R.md")

    names = [c.name for c in trained]  # the trained guide first, every run once
    assert names == ["deep_fcn_baseline_s0", "deep_fcn_untrained_resnet18_s0", "resnet18_fmnist_s0",
                     "deep_fcn_resnet18-w0.1_s0"]
    assert trained[-1].guidance.weight == 0.1 and trained[-1].guidance.guide_run == "resnet18_fmnist_s0"
    text = report.read_text()
    assert "## C1-weight: The alignment weight" in text
    assert "| trained guide, weight 0.1 | `deep_fcn_resnet18` + `guidance.weight=0.1` | — | 5.00 ± 0.00 (n=1) |" in text
    assert "| `deep_fcn_untrained_resnet18` > `deep_fcn_resnet18-w0.1` | direction as claimed" in text
