"""docs/architecture.md's examples are true: its Python blocks run (each in a fresh namespace, its
registrations removed afterwards) and its YAML blocks load through the real loaders."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from repguide import data, models, similarity
from repguide.claims import load_claims
from repguide.config import load_recipe

DOC = Path(__file__).parents[1] / "docs" / "architecture.md"
SHIPPED_CLAIMS = Path(similarity.__file__).parents[1] / "recipes" / "claims" / "paper.yaml"


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)


def registered() -> tuple[list[str], ...]:
    return similarity.list_measures(), models.list_models(), data.list_datasets()


@pytest.fixture
def clean_registries():
    """Remove whatever a block registers from the measure, model and data set registries."""
    before = registered()
    yield
    for name in set(similarity.list_measures()) - set(before[0]):
        similarity.MEASURES.unregister(name)
    for name in set(models.list_models()) - set(before[1]):
        models.MODELS.unregister(name)
    for name in set(data.list_datasets()) - set(before[2]):
        data.DATASETS.unregister(name)
    assert registered() == before


def test_the_page_has_the_examples_it_promises():
    assert len(blocks("python")) == 3  # a measure, a model, a data set
    assert len(blocks("yaml")) == 2  # a recipe, a claim entry


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_each_python_example_runs(index, clean_registries):
    exec(compile(blocks("python")[index], f"{DOC.name} python block {index}", "exec"), {"__name__": "doc"})


def test_the_recipe_example_loads_and_validates_at_every_scale(tmp_path):
    (recipe,) = [b for b in blocks("yaml") if not b.startswith("# recipes/claims/")]
    path = tmp_path / f"{Path(recipe.splitlines()[0].removeprefix('# ')).stem}.yaml"
    path.write_text(recipe)
    for scale in ("tiny", "small", "paper"):
        config = load_recipe(str(path), scale)
        assert config.guidance.weight == 0.5 and config.model.name == "wide_fcn"
    assert load_recipe(str(path), "tiny").train.epochs == 1


def test_the_claim_example_loads_as_one_more_entry_of_the_shipped_claims(tmp_path):
    (entry,) = [b for b in blocks("yaml") if b.startswith("# recipes/claims/")]
    shipped = yaml.safe_load(SHIPPED_CLAIMS.read_text())
    path = tmp_path / "paper.yaml"
    path.write_text(yaml.safe_dump({"claims": shipped["claims"] + yaml.safe_load(entry)["claims"]}, allow_unicode=True))
    added = load_claims(path)[-1]
    assert added.ablates == "C1" and added.rows[-1].overrides == {"guidance.weight": 0.1}
