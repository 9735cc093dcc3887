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


def finished(runs_dir: Path, run: str, values: list[float]) -> None:
    """Finished runs ``run_s0``, ``run_s1``, … whose test accuracy is each value (a fraction)."""
    for seed, v in enumerate(values):
        folder = runs_dir / f"{run}_s{seed}"
        folder.mkdir(parents=True)
        summary = {"status": "finished", "metric": "accuracy", "test_metric": v, "train_metric": v, "seconds": 60.0}
        (folder / "summary.json").write_text(json.dumps(summary))


def test_a_check_with_a_margin_asks_for_the_difference_minus_the_margin_beyond_the_spreads():
    base, guided = rp.Stat([14.0, 14.2, 14.4]), rp.Stat([25.0, 25.2, 25.4])  # spreads 0.2 + 0.2
    assert rp.verdict(guided, base, True, margin=10).startswith("**reproduced** (difference +11.00 − margin 10")
    assert rp.verdict(guided, base, True, margin=10.7).startswith("**not reproduced**: difference +11.00 − margin 10.7 ≤ spread 0.40")
    assert rp.verdict(guided, base, True).startswith("**reproduced** (difference +11.00 > spread 0.40")
    assert "too few to count" in rp.verdict(rp.Stat([25.0]), base, True, margin=10)


def test_only_rewrites_the_chosen_claims_sections_and_keeps_the_others(tmp_path, monkeypatch):
    monkeypatch.setattr(rp, "CLAIMS", load_claims(claims_file(tmp_path, ABLATION)))
    monkeypatch.setattr("repguide.report.plot_claim", lambda claim, stats, path: path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "exploration.md").write_text("## What was run\n\nhand-written log\n")
    report, runs = tmp_path / "R.md", tmp_path / "runs"
    finished(runs, "deep_fcn_baseline", [0.10, 0.12, 0.14])
    finished(runs, "deep_fcn_untrained_resnet18", [0.40, 0.42, 0.44])
    rp.write_report(rp.CLAIMS, "small", 3, runs, report, 0.0)  # every claim
    first = report.read_text()
    c1 = first[first.index("## C1:"):first.index("## C1-weight:")]
    assert "Generated by `repguide reproduce --scale small --seeds 3` (runs in" in c1
    assert "this section's finished runs took 6 min of training" in c1 and "**reproduced**" in c1

    finished(runs, "deep_fcn_resnet18-w0.1", [0.05])  # the ablation's own row, trained later elsewhere
    finished(tmp_path / "other", "deep_fcn_untrained_resnet18", [0.30])
    finished(tmp_path / "other", "deep_fcn_resnet18-w0.1", [0.05])
    rp.write_report(rp.CLAIMS[1:], "tiny", 1, tmp_path / "other", report, 0.0, only=["C1-weight"])
    second = report.read_text()
    assert second[second.index("## C1:"):second.index("## C1-weight:")] == c1  # kept as it was
    ablation = second[second.index("## C1-weight:"):]
    assert "--scale tiny --seeds 1 --only C1-weight` (runs in" in ablation and "30.00 ± 0.00 (n=1)" in ablation
    assert second.count("hand-written log") == 1 and second.endswith("hand-written log\n\n")
    rp.write_report(rp.CLAIMS[1:], "tiny", 1, tmp_path / "other", report, 0.0, only=["C1-weight"])
    assert report.read_text() == second  # rewriting a section twice changes nothing


def test_a_kept_section_whose_runs_now_give_other_numbers_says_so_until_it_is_rewritten(tmp_path, monkeypatch):
    """A run shared by two claims, trained again for one of them (its recipe changed), would show
    two numbers in one report: the kept section gets a note naming the row, both numbers and the
    command that rewrites it; the note is not repeated, and goes when the section is rewritten."""
    monkeypatch.setattr(rp, "CLAIMS", load_claims(claims_file(tmp_path, ABLATION)))
    monkeypatch.setattr("repguide.report.plot_claim", lambda claim, stats, path: path)
    report, runs = tmp_path / "R.md", tmp_path / "runs"
    finished(runs, "deep_fcn_baseline", [0.10, 0.12, 0.14])
    finished(runs, "deep_fcn_untrained_resnet18", [0.40, 0.42, 0.44])
    rp.write_report(rp.CLAIMS, "small", 3, runs, report, 0.0)
    assert "Out of date" not in report.read_text()
    for seed, value in enumerate([0.50, 0.50, 0.53]):  # trained again: other numbers
        (runs / f"deep_fcn_untrained_resnet18_s{seed}" / "summary.json").write_text(json.dumps(
            {"status": "finished", "metric": "accuracy", "test_metric": value, "train_metric": value}))
    for _ in range(2):
        rp.write_report(rp.CLAIMS[1:], "small", 3, runs, report, 0.0, only=["C1-weight"])
        text = report.read_text()
        c1 = text[text.index("## C1:"):text.index("## C1-weight:")]
        assert text.count("Out of date") == 1  # once, in C1's section, however often it is written
        assert "\n\n> **Out of date:** its runs now give other numbers (`deep_fcn_untrained_resnet18` 42.00 ± 2.00 " \
            "(n=3) → 51.00 ± 1.73 (n=3)): `repguide reproduce --scale small --seeds 3 --only C1` rewrites this " \
            "section.\n\nPaper:" in c1
        assert "51.00 ± 1.73 (n=3) |" in text[text.index("## C1-weight:"):]
    rp.write_report(rp.CLAIMS, "small", 3, runs, report, 0.0, only=["C1"])
    text = report.read_text()
    assert "Out of date" not in text
    assert "| untrained ResNet-18 → Deep FCN | `deep_fcn_untrained_resnet18` | — | 51.00" in text


def test_a_kept_section_of_an_older_report_says_the_command_of_that_report(tmp_path, monkeypatch):
    monkeypatch.setattr(rp, "CLAIMS", load_claims(claims_file(tmp_path, ABLATION)))
    monkeypatch.setattr("repguide.report.plot_claim", lambda claim, stats, path: path)
    report = tmp_path / "R.md"
    report.write_text(
        "# Reproduction report\n\nGenerated by `repguide reproduce --scale small --seeds 3` (runs in `runs/x`; "
        "the finished runs took 613 min, this invocation 0 min).\n\n## C1: Deep FCN\n\nPaper: old text\n\n| old table |\n"
    )
    rp.write_report(rp.CLAIMS[1:], "tiny", 1, tmp_path / "runs", report, 0.0, only=["C1-weight"])
    text = report.read_text()
    assert ("## C1: Deep FCN\n\nGenerated by `repguide reproduce --scale small --seeds 3` (runs in `runs/x`; "
            "all claims at once).\n\nPaper: old text\n\n| old table |\n") in text
    assert text.index("## C1:") < text.index("## C1-weight:")


def test_reproduce_skips_a_run_another_process_is_training_and_goes_on(tmp_path, monkeypatch, capsys):
    """Two `repguide reproduce` processes can share one runs folder: a run whose folder another
    process holds is skipped (its lock refuses it), not an error that ends the suite."""
    import repguide.report
    import repguide.train
    from repguide.runs import RunDir

    runs = tmp_path / "runs"
    trained = []

    def fake_train(config, runs_dir, **_):
        run = RunDir(runs_dir, config.name)
        run.open(resume=False, overwrite=True)  # takes the folder's lock, as train does
        run.close()
        trained.append(config.name)

    monkeypatch.setattr(rp, "CLAIMS", load_claims(claims_file(tmp_path, CLAIM)))
    monkeypatch.setattr(repguide.train, "train", fake_train)
    monkeypatch.setattr(repguide.report, "update_plots", lambda path: None)
    holder = RunDir(runs, "deep_fcn_baseline_s0")  # "another process" training the first row
    holder.open(resume=False, overwrite=False)
    try:
        rp.reproduce("tiny", seeds=1, runs_dir=runs, only=["C1"], report=None)
    finally:
        holder.close()
    assert trained == ["deep_fcn_untrained_resnet18_s0"]
    assert "deep_fcn_baseline_s0: skipped, " in capsys.readouterr().out


def test_an_unknown_claim_id_names_the_known_ones_and_the_closest():
    with pytest.raises(ConfigError, match=r"unknown claim in \['C4-officail'\]; known claims: C1, .*\. Did you mean 'C4-official'\?"):
        rp.reproduce("tiny", seeds=1, only=["C4-officail"], report=None)


def test_an_ablation_row_is_described_from_the_first_row_of_its_own_recipe(tmp_path, monkeypatch):
    monkeypatch.setattr("repguide.report.plot_claim", lambda claim, stats, path: path)
    (claim,) = [c for c in rp.CLAIMS if c.id == "C5-official"]
    report = tmp_path / "R.md"
    rp.write_report([claim], "small", 3, tmp_path / "runs", report, 0.0, only=["C5-official"])
    text = report.read_text()
    assert "| off: post-LN (pre-LN), guided | row `c5_official` + `model.kwargs.norm=\"pre\"` |" in text
    assert "| off: post-LN (pre-LN), no guidance | row `c5_official_baseline` + `model.kwargs.norm=\"pre\"` |" in text
    assert "| off: packed guide (runs through the padding) | row `c5_official` + `guidance.guide.kwargs.packed=false` |" in text


def test_a_run_whose_guide_another_process_is_training_is_skipped_not_an_error(tmp_path, monkeypatch, capsys):
    """The guide in training elsewhere has no weights yet: the runs that load it wait for a later
    reproduce (skipped with a message), and the suite goes on with the rest."""
    import repguide.report
    import repguide.train
    from repguide.runs import RunDir

    runs, trained = tmp_path / "runs", []

    def fake_train(config, runs_dir, **_):
        if config.guidance.guide_run:
            assert (runs_dir / config.guidance.guide_run / "final.pt").exists(), "trained before its guide"
        run = RunDir(runs_dir, config.name)
        run.open(resume=False, overwrite=True)
        run.close()
        trained.append(config.name)

    table = CLAIM.replace("      - {recipe: deep_fcn_untrained_resnet18,",
                          "      - {recipe: deep_fcn_resnet18, label: ResNet-18 → Deep FCN}\n"
                          "      - {recipe: deep_fcn_untrained_resnet18,")
    monkeypatch.setattr(rp, "CLAIMS", load_claims(claims_file(tmp_path, table)))
    monkeypatch.setattr(repguide.train, "train", fake_train)
    monkeypatch.setattr(repguide.report, "update_plots", lambda path: None)
    holder = RunDir(runs, "resnet18_fmnist_s0")  # the guide of deep_fcn_resnet18, training elsewhere
    holder.open(resume=False, overwrite=False)
    try:
        rp.reproduce("tiny", seeds=1, runs_dir=runs, only=["C1"], report=None, recipes=["deep_fcn_resnet18",
                                                                                          "deep_fcn_baseline"])
    finally:
        holder.close()
    assert trained == ["deep_fcn_baseline_s0"]
    out = capsys.readouterr().out
    assert "deep_fcn_resnet18_s0: skipped, its guide resnet18_fmnist_s0 is being trained by another process" in out


def test_a_row_can_be_the_trained_guide_of_another_row_on_the_same_altered_data(tmp_path, monkeypatch):
    table = CLAIM + """
  - id: C1-canvas
    ablates: C1
    title: Translated images
    statement: The guide trained on the same altered data as the target.
    paper_metric: "—"
    rows:
      - {recipe: resnet18_fmnist, run: resnet18_canvas, label: guide, overrides: {data.kwargs.canvas: 40}}
      - {recipe: deep_fcn_resnet18, run: deep_fcn_resnet18_canvas, label: guided,
         overrides: {data.kwargs.canvas: 40, guidance.guide_run: resnet18_canvas}}
"""
    monkeypatch.setattr(rp, "CLAIMS", load_claims(claims_file(tmp_path, table)))
    rows = rp.plan(rp._claims(["C1-canvas"]), "tiny", recipes=["deep_fcn_resnet18_canvas"])
    assert [(r.run, r.overrides.get("data.kwargs.canvas")) for r in rows] == [
        ("resnet18_canvas", 40), ("deep_fcn_resnet18_canvas", 40)]  # not the plain recipe's guide
