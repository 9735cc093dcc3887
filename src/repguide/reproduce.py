"""`repguide reproduce`: train every run the paper's claims need, then write REPRODUCTION.md.

The claims and their rows are data (:mod:`repguide.claims`). A row's runs are named
``<run>_s<seed>`` (its recipe's name unless the row sets overrides); a trained guide is the same
seed's run of its recipe, so guides are trained first. Finished runs are skipped and interrupted
ones resumed, so an interrupted suite continues where it stopped. A claim counts as reproduced only
with >= 3 seeds and a mean difference in the paper's direction larger than the two standard
deviations added together.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from repguide._registry import did_you_mean
from repguide.claims import Claim, Row, load_claims
from repguide.config import load_recipe
from repguide.errors import ConfigError, RunInUseError
from repguide.ledger import Ledger, jobs
from repguide.runs import RunDir, is_main_process

__all__ = ["CLAIMS", "Claim", "reproduce", "write_report"]


CLAIMS: tuple[Claim, ...] = load_claims()  # recipes/claims/paper.yaml


def _claims(only: list[str] | None) -> list[Claim]:
    """The claims whose ids are in ``only`` (all when None), each with the ablation tables of it."""
    unknown = sorted(set(only or ()) - {c.id for c in CLAIMS})
    if unknown:
        known = ", ".join(c.id for c in CLAIMS)
        hint = did_you_mean(unknown, [c.id for c in CLAIMS], " Did you mean {}?", show=repr)
        raise ConfigError(f"unknown claim in {only}; known claims: {known}.{hint}")
    return [c for c in CLAIMS if only is None or c.id in only or c.ablates in only]


def plan(claims: list[Claim], scale: str, recipes: list[str] | None = None) -> list[Row]:
    """The rows to train, in an order where every trained guide comes before the runs that load it
    (only the rows of ``recipes``, by recipe or run name, and the guides they need, when given).
    A trained guide is a recipe's run, or a row of the chosen claims named by its run (a guide
    trained with that row's overrides, e.g. on the same altered data)."""
    ordered: dict[str, Row] = {}
    by_run = {row.run: row for claim in claims for row in claim.rows}

    def visit(row: Row) -> None:
        guide = load_recipe(row.recipe, scale, row.overrides).guidance.guide_run
        if guide:
            visit(by_run.get(guide) or Row(recipe=guide, label=guide))
        ordered.setdefault(row.run, row)

    for claim in claims:
        for row in claim.rows:
            if recipes is None or row.recipe in recipes or row.run in recipes:  # --recipes none: only the report
                visit(row)
    return list(ordered.values())


def reproduce(
    scale: str = "small",
    seeds: int = 3,
    runs_dir: str | Path = "runs/reproduce",
    only: list[str] | None = None,
    report: str | Path | None = "REPRODUCTION.md",
    quiet: bool = True,
    overrides: dict | None = None,
    recipes: list[str] | None = None,
) -> Path | None:
    """Train what the chosen claims need for ``seeds`` seeds (skipping finished runs), then report."""
    from repguide.report import update_plots
    from repguide.train import train

    claims = _claims(only)
    started = time.time()
    ledger = Ledger.beside(report, runs_dir) if report is not None else None
    for seed in range(seeds):
        todo = jobs(plan(claims, scale, recipes), seed, scale, runs_dir, ledger, overrides)
        recorded = [job.run.name for job in todo if not job.train and not job.run.path.exists()]
        if recorded:
            print(f"[reproduce] {len(recorded)} run(s) of seed {seed} are finished in the record "
                  f"{ledger.folder}, not in {runs_dir}: {', '.join(recorded)}", flush=True)
        busy: set[str] = set()  # runs another process is training
        for job in todo:
            run, name = job.run, job.run.name
            if job.config.guidance.guide_run in busy:  # its weights are not there yet
                print(f"[reproduce] {name}: skipped, its guide {job.config.guidance.guide_run} is being "
                      "trained by another process", flush=True)
                continue
            if job.changed:  # the recipe changed since this run: its results no longer belong to it
                print(f"[reproduce] {name}: the recipe changed ({', '.join(job.changed)}); training again", flush=True)
            elif not job.train or run.is_finished():  # (another process may have finished it since)
                continue
            resume = not job.changed and (run.path / "last.ckpt").exists()
            print(f"[reproduce] {name}: {'resuming' if resume else 'training'}", flush=True)
            try:
                train(job.config, runs_dir, resume=resume, overwrite=not resume, quiet=quiet)
            except FloatingPointError as err:  # a diverged run is a result too; it is reported
                print(f"[reproduce] {name} stopped: {err}", flush=True)
                continue
            except RunInUseError as err:  # another reproduce is training it: two can share a suite
                print(f"[reproduce] {name}: skipped, {err}", flush=True)
                busy.add(name)
                continue
            if is_main_process():
                update_plots(run.path)
                if ledger is not None:
                    ledger.record(run)
    if report is None:
        return None
    return write_report(claims, scale, seeds, runs_dir, report, time.time() - started, only)


# --------------------------------------------------------------------------------------------
# The report


@dataclass
class Stat:
    values: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)  # train metric − test metric

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0


def _summary(name: str, runs_dir: Path, ledger: Ledger | None) -> dict | None:
    """Run ``name``'s summary: from its folder in ``runs_dir``, else from ``ledger``'s record."""
    path = runs_dir / name / "summary.json"
    if path.exists():
        return json.loads(path.read_text())
    return ledger.summary(name) if ledger is not None else None


def collect(run: str, seeds: int, runs_dir: Path, ledger: Ledger | None = None) -> Stat:
    """The test metric of runs ``<run>_s0`` … ``<run>_s<seeds-1>`` that finished (accuracy in %)."""
    stat = Stat()
    for seed in range(seeds):
        s = _summary(f"{run}_s{seed}", runs_dir, ledger)
        if s is not None and s.get("status") == "finished":
            scale = 100.0 if s["metric"] == "accuracy" else 1.0
            stat.values.append(scale * s["test_metric"])
            stat.gaps.append(scale * (s["train_metric"] - s["test_metric"]))
    return stat


def verdict(better: Stat, worse: Stat, higher_is_better: bool, margin: float = 0.0) -> str:
    """Whether ``better`` beats ``worse`` by more than ``margin`` plus the two spreads."""
    if not better.values or not worse.values:
        return "not run"
    diff = (better.mean - worse.mean) * (1 if higher_is_better else -1)
    spread = better.std + worse.std
    seeds = min(len(better.values), len(worse.values))
    if seeds < 3:
        direction = "as claimed" if diff > 0 else "opposite" if diff < 0 else "no difference"
        return f"direction {direction} ({diff:+.2f}; {seeds} seed(s): too few to count)"
    if margin:
        if diff - margin > spread:
            return f"**reproduced** (difference {diff:+.2f} − margin {margin:g} > spread {spread:.2f})"
        return f"**not reproduced**: difference {diff:+.2f} − margin {margin:g} ≤ spread {spread:.2f}"
    if diff > spread:
        return f"**reproduced** (difference {diff:+.2f} > spread {spread:.2f})"
    if diff > 0:
        return f"not reproduced: right direction but within the spread ({diff:+.2f} ≤ {spread:.2f})"
    return f"**not reproduced**: opposite direction ({diff:+.2f})"


def _fmt(stat: Stat) -> str:
    if not stat.values:
        return "not run"
    return f"{stat.mean:.2f} ± {stat.std:.2f} (n={len(stat.values)})"


def consistency(a: str, b: str, seeds: int, runs_dir: Path, hits: dict | None = None) -> Stat:
    """κ between the test-set errors of runs ``a_s<k>`` and ``b_s<k>``, one value per seed both
    finished. ``hits``: a dict that keeps each run's per-example correctness for the next call."""
    from repguide import data
    from repguide.analysis import correct, error_consistency, ordered_batches
    from repguide.build import load_model

    stat = Stat()
    for seed in range(seeds):
        runs = [RunDir(runs_dir, f"{recipe}_s{seed}") for recipe in (a, b)]
        if not all(run.is_finished() for run in runs):
            continue
        spec = runs[0].read_config()["data"]  # both runs see the same test set (one data recipe)
        splits = data.create(spec["name"], **spec["kwargs"])
        hits = {} if hits is None else hits
        for run in runs:
            if run.path not in hits:
                hits[run.path] = correct(load_model(run.path, splits), ordered_batches(splits.test, 1024))
        stat.values.append(error_consistency(hits[runs[0].path], hits[runs[1].path]).kappa)
    return stat


def _consistency_section(claim: Claim, seeds: int, runs_dir: Path) -> list[str]:
    kappas: dict[tuple[str, str], Stat] = {}
    hits: dict = {}
    lines = ["| pair of classifiers | runs | κ (mean ± std over seeds) |", "|---|---|---|"]
    for pair in claim.consistency:
        (a, b), label = pair.runs, pair.label
        kappas[a, b] = stat = consistency(a, b, seeds, runs_dir, hits)
        fmt = f"{stat.mean:.3f} ± {stat.std:.3f} (n={len(stat.values)})" if stat.values else "not run"
        lines.append(f"| {label} | `{a}` vs `{b}` | {fmt} |")
    lines += ["", "| check | verdict (κ difference) |", "|---|---|"]
    for check in claim.consistency_checks:
        first, second = check.higher, check.lower
        lines.append(
            f"| κ(`{first[0]}`, `{first[1]}`) > κ(`{second[0]}`, `{second[1]}`) | "
            f"{verdict(kappas[first], kappas[second], True)} |"
        )
    return lines + [""]


def _describe(row: Row, reference: Row | None) -> str:
    """``row``'s recipe and overrides; in an ablation table, a row that sets the keys of the
    reference row (the first row of the same recipe with overrides) is written as that row with
    what differs (the reference row spells out the rest)."""
    if reference is None or row is reference or row.recipe != reference.recipe:
        return row.describe()
    if set(row.overrides) != set(reference.overrides):
        return row.describe()
    changed = {k: v for k, v in row.overrides.items() if reference.overrides[k] != v}
    sets = [f"`{k}={json.dumps(v)}`" for k, v in changed.items()]
    return " + ".join([f"row `{reference.run}`", *sets])


def _claim_section(claim: Claim, seeds: int, runs_dir: Path, figures: Path, root: Path, ledger: Ledger) -> list[str]:
    """The report's section of one claim: its rows, its checks, its figure, κ tables and notes."""
    from repguide.report import plot_claim

    stats = {row.run: collect(row.run, seeds, runs_dir, ledger) for row in claim.rows}
    unit = "test accuracy (%)" if claim.higher_is_better else "test perplexity"
    lines = [
        f"## {claim.id}: {claim.title}", "", f"Paper: {claim.statement}", "",
        f"| run | recipe | paper ({claim.paper_metric}) | ours: {unit} | train − test gap |",
        "|---|---|---|---|---|",
    ]
    references: dict[str, Row] = {}  # per recipe, the first row with overrides spells them out
    for row in claim.rows if claim.ablates else ():
        if row.overrides:
            references.setdefault(row.recipe, row)
    for row in claim.rows:
        s = stats[row.run]
        gap = f"{statistics.fmean(s.gaps):.2f}" if s.gaps else "—"
        lines.append(f"| {row.label} | {_describe(row, references.get(row.recipe))} | {row.paper} | {_fmt(s)} | {gap} |")
    if claim.checks:
        lines += ["", "| check (paper's direction) | verdict |", "|---|---|"]
    op = ">" if claim.higher_is_better else "<"
    for check in claim.checks:
        better, worse = stats[check.better], stats[check.worse]
        by = f" + {check.margin:g}" if check.margin else ""
        result = verdict(better, worse, claim.higher_is_better, check.margin)
        lines.append(f"| `{check.better}` {op} `{check.worse}`{by} | {result} |")
    png = plot_claim(claim, stats, figures / f"{claim.id}.png")
    lines += ["", f"![{claim.id}]({png.relative_to(root).as_posix()})", ""]
    if claim.consistency:
        lines += _consistency_section(claim, seeds, runs_dir)
    if claim.notes:
        lines += [claim.notes, ""]
    return lines


_GENERATED = "Generated by `repguide reproduce"


def _section_line(claim: Claim, scale: str, seeds: int, runs_dir: Path, only: list[str] | None, ledger: Ledger) -> str:
    """The line under a section's heading that says which command wrote it, and what its runs cost."""
    minutes = 0.0
    for run in dict.fromkeys(row.run for row in claim.rows):
        for seed in range(seeds):
            summary = _summary(f"{run}_s{seed}", runs_dir, ledger)
            if summary is not None:
                minutes += summary.get("seconds", 0.0) / 60
    flags = f" --only {','.join(only)}" if only else ""
    return (f"{_GENERATED} --scale {scale} --seeds {seeds}{flags}` (runs in `{runs_dir}`; this "
            f"section's finished runs took {minutes:.0f} min of training, wherever they ran).")


_EXPLORATION = "<!-- docs/exploration.md, copied here by repguide reproduce -->"


def _old_sections(report: Path, exploration: list[str]) -> dict[str, list[str]]:
    """The claim sections of an earlier ``report`` by claim id, each with a line saying which
    command wrote it (the earlier report's header line where the section has none of its own).
    They end where the copy of ``exploration`` (its lines) begins."""
    if not report.exists():
        return {}
    first = next((line for line in exploration if line.strip()), None)
    ids = {c.id for c in CLAIMS}
    sections: dict[str, list[str]] = {}
    header_line, current = None, None
    for line in report.read_text().splitlines():
        heading = line.startswith("## ") and line[3:].split(":", 1)[0]
        if heading in ids:
            current = sections.setdefault(heading, [])
        elif sections and line in (_EXPLORATION, first):  # the exploration log follows the claims
            break
        if current is not None:
            current.append(line)
        elif header_line is None and line.startswith(_GENERATED):  # an older report's one header
            header_line = re.sub(r"^(.*?\(runs in `[^`]*`).*$", r"\1; all claims at once).", line)
    for lines in sections.values():
        while lines and not lines[-1]:
            lines.pop()
        if header_line and not any(line.startswith(_GENERATED) for line in lines):
            lines[1:1] = ["", header_line]
        lines.append("")
    return sections


_STALE = "> **Out of date:**"


def _stale_note(claim: Claim, section: list[str], runs_dir: Path, ledger: Ledger) -> list[str]:
    """A note for a kept ``section`` whose rows show numbers that every one of their seeds' runs,
    here or in the record, no longer gives (a recipe changed and its runs were trained again for
    another claim's section); ``[]`` where none does or where the runs are not all at hand."""
    moved = []
    for row in claim.rows:
        cells = next((x for x in section if x.startswith(f"| {row.label} | ")), "").strip("| ").split(" | ")
        shown = re.fullmatch(r".*\(n=(\d+)\)", cells[-2]) if len(cells) == 5 else None
        stat = collect(row.run, int(shown[1]), runs_dir, ledger) if shown else Stat()
        if shown and len(stat.values) == int(shown[1]) and _fmt(stat) != shown[0]:
            moved.append(f"`{row.run}` {shown[0]} → {_fmt(stat)}")
    if not moved:
        return []
    command = re.search(r"--scale \S+ --seeds \d+", next((x for x in section if x.startswith(_GENERATED)), ""))
    return [f"{_STALE} its runs now give other numbers ({'; '.join(moved)}): `repguide reproduce "
            f"{command[0] if command else ''} --only {claim.id}` rewrites this section.", ""]


def write_report(claims, scale, seeds, runs_dir, report, seconds, only: list[str] | None = None) -> Path:
    """Write ``report`` (REPRODUCTION.md) from the finished runs of ``claims`` in ``runs_dir``, its
    figures under ``docs/reproduction`` beside it; ``seconds``: how long this invocation took.

    The sections of the other claims an earlier ``report`` holds are kept as they were, each with
    the line saying which command wrote it, so ``--only C4`` rewrites C4's sections alone; so is
    the section of a chosen claim none of whose runs is here or recorded (a fresh checkout)."""
    runs_dir, report = Path(runs_dir), Path(report)
    figures = report.parent / "docs" / "reproduction"
    figures.mkdir(parents=True, exist_ok=True)
    exploration = report.parent / "docs" / "exploration.md"
    log = exploration.read_text() if exploration.exists() else ""
    kept = _old_sections(report, log.splitlines())
    lines = [
        "# Reproduction report",
        "",
        "Every section below says the `repguide reproduce` command that wrote it and where its runs "
        "are; finished runs are skipped, so a rerun only adds what is missing, and `--only` rewrites "
        f"the chosen claims' sections and keeps the others (this invocation took {seconds / 60:.0f} min).",
        "",
        "Our numbers are test-set means ± standard deviations over seeds (accuracy in %, or perplexity), "
        "on Fashion-MNIST / synthetic tasks / Shakespeare, next to the paper's "
        "(ImageNet / WikiText-103, as the paper reports them). Only the "
        "*direction* of each claim is comparable. A claim is **reproduced** only with ≥ 3 seeds and a "
        "difference in the paper's direction larger than the two standard deviations added. The first "
        "check of every claim is the failure mode the baseline must show for the rest to mean anything.",
        "",
    ]
    written = {claim.id for claim in claims}
    ledger = Ledger.beside(report, runs_dir)
    for name in dict.fromkeys(f"{row.run}_s{seed}" for claim in claims for row in claim.rows for seed in range(seeds)):
        ledger.record(RunDir(runs_dir, name))  # what this report shows stays in git, the runs do not
    # Each ablation table right after the claim it ablates.
    order = [c for main in CLAIMS if main.ablates is None for c in CLAIMS if main.id in (c.id, c.ablates)]
    for claim in order:
        runs = [f"{row.run}_s{seed}" for row in claim.rows for seed in range(seeds)]
        if claim.id in written and claim.id in kept and not any(_summary(r, runs_dir, ledger) for r in runs):
            print(f"[reproduce] {claim.id}: no run of it in {runs_dir} nor in its record "
                  f"{ledger.folder}; its section is kept as it was", flush=True)
            lines += kept[claim.id]
        elif claim.id in written:
            section = _claim_section(claim, seeds, runs_dir, figures, report.parent, ledger)
            lines += [*section[:2], _section_line(claim, scale, seeds, runs_dir, only, ledger), "", *section[2:]]
        elif only and claim.id in kept:
            section = list(kept[claim.id])
            old = [i for i, line in enumerate(section) if line.startswith(_STALE)]  # an earlier report's note
            if old:
                del section[old[0]:old[0] + 2]
            at = next((i + 2 for i, line in enumerate(section) if line.startswith(_GENERATED)), 2)
            note = _stale_note(claim, section, runs_dir, ledger)
            lines += [*section[:at], *note, *section[at:]]
    if log:  # the hand-written log of settings tried where a claim did not show
        lines += [_EXPLORATION, "", log]
    report.write_text("\n".join(lines) + "\n")
    return report
