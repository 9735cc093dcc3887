"""Which runs of a reproduction suite are done: its runs folder, and its results record in git.

``runs/`` stays out of git (checkpoints, metrics), so a fresh checkout holds none of an earlier
session's runs. For every finished run it reports, ``repguide reproduce`` writes one small JSON file
-- the run's ``summary.json`` and the config it was trained with -- under
``docs/reproduction/results/<runs folder name>/`` beside the report. A run recorded there with the
config its recipe gives today counts as finished, and the report reads its numbers from the record
where the runs folder lacks the run. What needs a run's weights still needs the run itself: a
trained guide is trained again where a run that loads it has to train, and the error-consistency
tables read the runs' models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from repguide.config import diff_keys, load_recipe, upgrade
from repguide.errors import RunDirError
from repguide.runs import RunDir, atomic_write_text, check_run_name

__all__ = ["Ledger", "jobs"]

_LABELS = ("description", "claim")  # words about a run, not what it trains with


class Ledger:
    """The recorded runs of one runs folder: ``folder/<run>.json`` each."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    @classmethod
    def beside(cls, report: str | Path, runs_dir: str | Path) -> Ledger:
        """The record that belongs to ``report`` (REPRODUCTION.md) and the runs in ``runs_dir``."""
        return cls(Path(report).parent / "docs" / "reproduction" / "results" / Path(runs_dir).name)

    def _path(self, name: str) -> Path:
        return self.folder / f"{check_run_name(name)}.json"

    def _entry(self, name: str) -> dict | None:
        path = self._path(name)
        if not path.exists():
            return None
        try:
            entry = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise RunDirError(f"{path}: not a results record, its JSON does not parse ({err}); "
                              "restore it from git or delete it to train the run again") from None
        if not (isinstance(entry, dict) and all(isinstance(entry.get(k), dict) for k in ("config", "summary"))):
            raise RunDirError(f"{path}: not a results record (expected an object with the objects 'config' and "
                              "'summary'); restore it from git or delete it to train the run again")
        return entry

    def summary(self, name: str) -> dict | None:
        """The summary recorded for run ``name``, or None."""
        entry = self._entry(name)
        return entry["summary"] if entry else None

    def changed_keys(self, name: str, config: dict) -> list[str] | None:
        """The keys whose values differ between the config run ``name`` was recorded with (filled
        in with the defaults of keys added since, as a run folder's is) and ``config`` (a JSON
        dump); None when the run is not recorded."""
        entry = self._entry(name)
        return None if entry is None else _diff(entry["config"], config)

    def record(self, run: RunDir) -> bool:
        """Record ``run`` if it finished (its summary and the config it was trained with); whether it did."""
        config = run.read_config()
        if not run.is_finished() or config is None:
            return False
        summary = json.loads((run.path / "summary.json").read_text())
        entry = {"name": run.name, "config": config, "summary": summary}
        text = json.dumps(entry, indent=1, sort_keys=True) + "\n"
        path = self._path(run.name)
        if path.exists() and path.read_text() == text:
            return True
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
        return True


def _without_labels(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in _LABELS}


def _newer(a: Path, b: Path) -> bool:
    """Whether both files exist and ``a`` was written after ``b``."""
    return a.exists() and b.exists() and a.stat().st_mtime_ns > b.stat().st_mtime_ns


def _changed_keys(run: RunDir, config) -> list[str]:
    """Keys whose values differ between the config ``run`` was trained with and ``config``
    (the run's schedule length included; empty when the run has no config yet)."""
    stored = run.read_config()
    return [] if stored is None else _diff(stored, config.model_dump(mode="json"))


def _diff(stored: dict, config: dict) -> list[str]:
    """The keys that differ between a stored config (upgraded to today's schema) and ``config``."""
    previous = upgrade(stored)
    if previous is None:
        return ["(unreadable config)"]
    return diff_keys(_without_labels(previous), _without_labels(config))


@dataclass
class _Job:
    run: RunDir
    config: object  # RunConfig
    changed: list[str]  # keys of the run's stored config that its recipe no longer gives
    train: bool = True


def jobs(rows: list, seed: int, scale: str, runs_dir, ledger: Ledger | None, overrides) -> list[_Job]:
    """The runs of ``rows`` for one seed, each saying whether it has to train: not when it finished
    in ``runs_dir`` with today's recipe, nor when ``ledger`` records it so -- unless a run that
    trains loads it as its guide (the record holds no weights)."""
    out = []
    for row in rows:
        name = f"{row.run}_s{seed}"
        run = RunDir(runs_dir, name)
        extra = {"name": name, "train.seed": seed, **row.overrides, **(overrides or {})}
        config = load_recipe(row.recipe, scale, extra)
        if config.guidance.guide_run:
            guide_run = {"guidance.guide_run": f"{config.guidance.guide_run}_s{seed}"}
            config = load_recipe(row.recipe, scale, {**extra, **guide_run})
        changed = _changed_keys(run, config)
        guide = RunDir(runs_dir, config.guidance.guide_run) if config.guidance.guide_run else None
        if guide is not None and _newer(guide.path / "final.pt", run.path / "summary.json"):
            changed.append(f"its guide {guide.name} was trained again")
        out.append(_Job(run, config, changed))
    needed: set[str] = set()  # guides that a run which trains loads
    for job in reversed(out):  # a guide comes before the runs that load it
        name, recorded = job.run.name, False
        if ledger is not None and not job.run.path.exists():
            keys = ledger.changed_keys(name, job.config.model_dump(mode="json"))
            recorded = keys == []
            job.changed = keys or job.changed  # recorded with another config: trained again, saying why
        job.train = bool(job.changed) or not job.run.is_finished() and (not recorded or name in needed)
        if job.train and job.config.guidance.guide_run:
            needed.add(job.config.guidance.guide_run)
    changed_guides = {job.run.name for job in out if job.changed}
    for job in out:  # a recorded run whose guide trains again for a changed recipe goes with it
        guide = job.config.guidance.guide_run
        if guide in changed_guides and not job.run.path.exists() and not job.changed:
            job.changed, job.train = [f"its guide {guide} is trained again"], True
            changed_guides.add(job.run.name)
    return out
