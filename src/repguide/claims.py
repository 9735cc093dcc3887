"""The paper's claims as data: the runs each claim compares, the paper's numbers and the checks.

The entries live in ``recipes/claims/paper.yaml`` beside the recipes and are validated by the
models below, so a new experiment is a recipe plus an entry. An entry is one table of the
reproduction report: rows (a recipe, optionally with overrides, and the paper's number), checks
(``better`` beats ``worse`` in the claim's direction) and notes. An ablation table is an entry too:
its rows are one recipe with different overrides, each under a run name of its own, and
``ablates`` names the claim it belongs to, so ``--only C4`` trains and reports it with C4.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from repguide._registry import did_you_mean
from repguide.config import SCALES, list_recipes, load_recipe, parse_yaml
from repguide.errors import ConfigError
from repguide.runs import check_run_name

__all__ = ["Check", "Claim", "ConsistencyCheck", "ConsistencyPair", "Row", "load_claims"]


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Row(_Entry):
    """One run of a table: ``<run>_s<seed>`` trained from ``recipe`` with ``overrides``."""

    recipe: str
    label: str
    paper: str = "—"  # the paper's number for this row, as the paper reports it; "—" where it has none
    # Dotted recipe keys set for this row only (an ablation), as ``key=value`` on the command line.
    overrides: dict[str, Any] = Field(default_factory=dict)
    # The run's name before ``_s<seed>``, which checks refer to: the recipe's name unless the row
    # has overrides, when it must be a name of its own (two configs never share a run folder).
    run: str = ""

    @field_validator("recipe")
    @classmethod
    def _shipped(cls, v: str) -> str:
        if v not in list_recipes():
            raise ValueError(f"no shipped recipe {v!r}" + did_you_mean(v, list_recipes(), "; did you mean {}?", show=repr))
        return v

    @model_validator(mode="before")
    @classmethod
    def _run_defaults_to_recipe(cls, data: Any) -> Any:
        if isinstance(data, dict) and "recipe" in data and not data.get("run") and not data.get("overrides"):
            data = {**data, "run": data["recipe"]}
        return data

    @model_validator(mode="after")
    def _run_name(self) -> "Row":
        if not self.run:
            raise ValueError(f"a row with overrides needs a run name of its own (run: {self.recipe}_...)")
        check_run_name(self.run)
        if self.overrides and self.run in list_recipes():
            raise ValueError(f"run {self.run!r} is a recipe's name; a row with overrides needs a name of its own")
        for scale in SCALES:  # an override key or value the recipe does not allow fails here, not mid-suite
            load_recipe(self.recipe, scale, self.overrides)
        return self

    def describe(self) -> str:
        """The recipe, and its overrides as ``key=value`` (YAML values), for the report."""
        sets = [f"`{k}={json.dumps(v)}`" for k, v in self.overrides.items()]
        return " + ".join([f"`{self.recipe}`", *sets])


class Check(_Entry):
    """The paper says run ``better`` beats run ``worse`` (higher or lower, by the claim's metric)."""

    better: str
    worse: str
    # How much ``better`` must beat ``worse`` by (in the metric's units) beyond the two spreads:
    # C4's ablation asks the guided RNN for a third of the paper's effect, not any gain.
    margin: float = Field(default=0.0, ge=0.0)


class ConsistencyPair(_Entry):
    """Two runs whose test-set errors are compared by Cohen's κ (error consistency)."""

    runs: tuple[str, str]
    label: str


class ConsistencyCheck(_Entry):
    """κ between the ``higher`` pair of runs should exceed κ between the ``lower`` pair."""

    higher: tuple[str, str]
    lower: tuple[str, str]


class Claim(_Entry):
    """One claim of the paper (or an ablation table of one), as one section of the report."""

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")  # also the name of its figure
    title: str
    statement: str  # what the paper says, in a sentence or three
    paper_metric: str  # what the paper's numbers measure, e.g. "ImageNet top-5 val acc (%)"
    rows: tuple[Row, ...] = Field(min_length=1)
    # The first check is the failure mode the baseline must show at this scale for the other
    # comparisons to mean anything.
    checks: tuple[Check, ...] = ()
    higher_is_better: bool = True  # accuracy; False for perplexity
    notes: str = ""  # printed under the table: how our setting differs, where the runs ran
    # Error consistency (Cohen's κ between two runs' test-set errors, Geirhos et al. 2020).
    consistency: tuple[ConsistencyPair, ...] = ()
    consistency_checks: tuple[ConsistencyCheck, ...] = ()
    ablates: Optional[str] = None  # the id of the claim this table ablates

    @model_validator(mode="after")
    def _refer_to_rows(self) -> "Claim":
        runs = [row.run for row in self.rows]
        twice = sorted({r for r in runs if runs.count(r) > 1})
        problems = [f"rows: run {r!r} appears twice" for r in twice]
        for i, check in enumerate(self.checks):
            problems += [f"checks.{i}: {r!r} is no row's run" for r in (check.better, check.worse) if r not in runs]
        for i, pair in enumerate(self.consistency):
            problems += [f"consistency.{i}: {r!r} is no row's run" for r in pair.runs if r not in runs]
        pairs = {pair.runs for pair in self.consistency}
        for i, check in enumerate(self.consistency_checks):
            problems += [
                f"consistency_checks.{i}: {list(p)} is not one of the consistency pairs"
                for p in (check.higher, check.lower) if p not in pairs
            ]
        if problems:
            raise ValueError("; ".join(problems))
        return self


_KEYS = sorted({k for m in (Claim, Row, Check, ConsistencyPair, ConsistencyCheck) for k in m.model_fields})


def _default_path() -> Path:
    return Path(str(resources.files("repguide") / "recipes" / "claims" / "paper.yaml"))


def load_claims(path: str | Path | None = None) -> tuple[Claim, ...]:
    """The validated claims of ``path`` (the shipped ``recipes/claims/paper.yaml`` by default), in
    the file's order; a :class:`ConfigError` naming the claim and the key when one is invalid."""
    path = Path(path) if path is not None else _default_path()
    raw = parse_yaml(path.read_text(), f"claims file {path}")
    if set(raw) != {"claims"} or not isinstance(raw["claims"], list):
        raise ConfigError(f"claims file {path} must hold one key, claims: a list of claim entries")
    claims = tuple(_validate(entry, i, path) for i, entry in enumerate(raw["claims"]))
    _check_across(claims, path)
    return claims


def _validate(entry: Any, index: int, path: Path) -> Claim:
    name = entry.get("id", f"#{index + 1}") if isinstance(entry, dict) else f"#{index + 1}"
    try:
        return Claim.model_validate(entry)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"])
            msg = e["msg"].removeprefix("Value error, ").replace("\n", "\n  ")
            if e["type"] == "extra_forbidden":
                hint = did_you_mean(str(e["loc"][-1]), _KEYS, " (did you mean {}?)", show=repr)
                lines.append(f"unknown key {where!r}" + hint)
            elif e["type"] == "missing":
                lines.append(f"{where}: a required key is missing")
            elif where and not isinstance(e.get("input"), dict):
                lines.append(f"{where}: {msg} (got {e.get('input')!r})")
            elif where:  # a rule across a row's or a claim's keys: the message names them
                lines.append(f"{where}: {msg}")
            else:
                lines.append(msg)
        raise ConfigError(f"claims file {path}: claim {name!r}:\n  " + "\n  ".join(lines)) from None


def _check_across(claims: tuple[Claim, ...], path: Path) -> None:
    """Rules between entries: unique ids, ``ablates`` names an earlier claim, and a run name means
    one recipe with one set of overrides wherever it appears."""
    seen: dict[str, Claim] = {}
    runs: dict[str, tuple[str, Row]] = {}
    for claim in claims:
        where = f"claims file {path}: claim {claim.id!r}"
        if claim.id in seen:
            raise ConfigError(f"{where}: id: {claim.id!r} is the id of an earlier claim")
        if claim.ablates is not None and claim.ablates not in seen:
            raise ConfigError(f"{where}: ablates: {claim.ablates!r} is no earlier claim's id")
        seen[claim.id] = claim
        for row in claim.rows:
            other_claim, other = runs.setdefault(row.run, (claim.id, row))
            if (other.recipe, other.overrides) != (row.recipe, row.overrides):
                raise ConfigError(
                    f"{where}: rows: run {row.run!r} is {row.describe()} here but {other.describe()} "
                    f"in claim {other_claim!r}; give one of them another run name"
                )
