"""The recipe rules that tie keys to each other and to the registries (models, data sets, measures).

:class:`repguide.config.RunConfig` applies them when a recipe loads, so a recipe that training would
refuse fails before any process starts. Each broken rule is one line naming the keys and their values.
"""

from __future__ import annotations

import inspect
import typing
from typing import TYPE_CHECKING, Any

from pydantic import PydanticSchemaGenerationError, TypeAdapter, ValidationError

from repguide import data, models, similarity
from repguide._registry import Registry, did_you_mean

if TYPE_CHECKING:
    from repguide.config import DataConfig, ModelConfig, RunConfig


def problems(config: RunConfig) -> list[str]:
    """Every rule ``config`` breaks; the rules across keys only once its names and options are known."""
    known = [
        *_builder_problems("model", config.model, models.MODELS),
        *(_builder_problems("guidance.guide", config.guidance.guide, models.MODELS) if config.guidance.guide else []),
        *_builder_problems("data", config.data, data.DATASETS),
    ]
    return known or [*_data_problems(config), *_guidance_problems(config)]


# Data set keyword arguments that count something (examples, tokens, symbols): positive where given.
_DATA_COUNTS = ("train_size", "val_size", "test_size", "min_len", "max_len", "num_symbols", "context", "max_vocab", "canvas")


def _builder_problems(key: str, spec: ModelConfig | DataConfig, registry: Registry) -> list[str]:
    """Unknown names, unknown options and options of the wrong type for a registry entry."""
    try:
        entry = registry.get(spec.name)
    except ValueError as err:
        return [f"{key}.name: {err}"]
    accepted = entry.accepted_kwargs()
    unknown = sorted(set(spec.kwargs) - accepted)
    if unknown:
        hint = did_you_mean(unknown, accepted)
        return [
            f"{key}.kwargs: {registry.kind} {spec.name!r} has no option {', '.join(map(repr, unknown))}; it accepts "
            f"{', '.join(sorted(accepted))}.{hint}"
        ]
    hints = _type_hints(entry.builder)
    wrong = []
    for name, value in spec.kwargs.items():
        try:
            adapter = TypeAdapter(hints[name]) if name in hints else None
        except PydanticSchemaGenerationError:  # a type pydantic cannot check: the builder will
            adapter = None
        try:
            if adapter is not None:
                adapter.validate_python(value, strict=True)
        except ValidationError as err:
            wrong.append(f"{key}.kwargs.{name}: {err.errors()[0]['msg']} (got {value!r})")
    return wrong


def _type_hints(builder: Any) -> dict[str, Any]:
    """The annotations of a builder's arguments; none where they cannot be resolved."""
    try:
        return typing.get_type_hints(builder.__init__ if isinstance(builder, type) else builder)
    except (NameError, TypeError):
        return {}


def _data_problems(config: RunConfig) -> list[str]:
    kwargs, batch = config.data.kwargs, config.train.batch_size
    problems = [
        f"data.kwargs.{name}: must be an integer >= 1 (got {kwargs[name]!r})"
        for name in _DATA_COUNTS
        if isinstance(kwargs.get(name), int) and kwargs[name] < 1
    ]
    world = config.train.world_size()
    if world is not None and batch % world:
        problems.append(
            f"train.batch_size={batch} must be divisible by the {world} processes "
            f"(train.devices={config.train.devices} x train.num_nodes={config.train.num_nodes})"
        )
    train_size = _data_kwargs(config.data).get("train_size")
    if not problems and isinstance(train_size, int) and train_size < batch:
        problems.append(
            f"the training set has {train_size} examples (data.kwargs.train_size), fewer than one batch of "
            f"train.batch_size={batch}; lower the batch size"
        )
    return problems


def _guidance_problems(config: RunConfig) -> list[str]:
    gc, tc = config.guidance, config.train
    if gc.mode == "none":
        return []
    if gc.guide is None:
        return [f"guidance.mode={gc.mode!r} needs guidance.guide (a model name and kwargs)"]
    if gc.mode != "guide":
        return []
    try:
        measure = similarity.get_measure(gc.measure)
    except ValueError as err:
        return [f"guidance.measure: {err}"]
    problems = []
    aligned = tc.batch_size if tc.alignment == "global" else tc.batch_size // (tc.world_size() or 1)
    if aligned < measure.min_n:
        problems.append(
            f"guidance.measure={gc.measure!r} needs at least {measure.min_n} examples per "
            f"batch, but train.batch_size={tc.batch_size} aligns {aligned} at a time; raise "
            "train.batch_size (or use guidance.measure=cka)"
        )
    if gc.init_steps and gc.off_after:
        problems.append(
            f"guidance.init_steps={gc.init_steps} and guidance.off_after={gc.off_after} cannot both be set: "
            "the initialisation already turns guidance off after its steps; unset one"
        )
    if gc.cache and (gc.guide_input != "same" or (gc.init_steps and gc.init_input == "noise")):
        problems.append(
            "guidance.cache=true stores the guide's features of each training example, but the guide "
            "sees noise here (guidance.guide_input=noise or guidance.init_input=noise); turn one of them off"
        )
    if gc.cache and gc.guide_mode == "train":
        problems.append(
            "guidance.cache=true stores the guide's features of each training example once, but "
            "guidance.guide_mode=train gives new ones at every step (dropout); use guide_mode=eval or turn the cache off"
        )
    augment = _data_kwargs(config.data).get("augment", "none")
    if gc.cache and augment != "none":
        problems.append(
            f"guidance.cache=true needs the guide to see the same input for an example every epoch, but "
            f"data.kwargs.augment={augment!r} augments its examples at random; turn the augmentation off or the cache off"
        )
    if gc.cache and _data_kwargs(config.data).get("resample") is True:
        problems.append(
            "guidance.cache=true stores the guide's features of each training example by its position, but "
            "data.kwargs.resample=true draws new examples at every position each epoch; turn the resampling off or the cache off"
        )
    packed = [f"{key}.kwargs.packed=true" for key, spec in (("model", config.model), ("guidance.guide", gc.guide))
              if spec is not None and spec.kwargs.get("packed") is True]
    if packed and (gc.cache or gc.reduction == "tokens"):
        # A PackedSequence is captured at the batch's longest length, which varies between batches.
        what = "guidance.cache=true stores" if gc.cache else "guidance.reduction=tokens compares"
        problems.append(
            f"{what} features of a fixed number of positions, but {packed[0]} gives its layers' outputs "
            "at each batch's longest string only; turn packing off, or use guidance.reduction=flatten without the cache"
        )
    return problems


def _data_kwargs(spec: DataConfig) -> dict[str, Any]:
    """The keyword arguments the data set's factory will see, its defaults included."""
    entry = data.DATASETS.get(spec.name)
    params = inspect.signature(entry.builder).parameters.values()
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    return {**defaults, **entry.defaults, **spec.kwargs}
