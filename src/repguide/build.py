"""Building models and guides from recipes, and loading them from run folders and weights files.

A model is built from the registry sized to its data (classes, vocabulary, image shape) and from
its own seed, so a run's initial weights can be rebuilt from its config alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from repguide import data as datasets
from repguide import models
from repguide._registry import did_you_mean
from repguide.config import DataConfig, ModelConfig, RunConfig, parse_yaml, validate
from repguide.errors import (
    ArgumentError, ConfigError, DataError, DatasetIntegrityError, DatasetNotFoundError, ModelError,
)
from repguide.runs import CheckpointError, RunDirError, load_weights

__all__ = ["build_model", "first_mismatch", "load_guide", "load_model", "run_config", "weights_hash"]


def build_data(spec: DataConfig) -> datasets.Splits:
    """The data set of a recipe's ``data`` section; a value its factory refuses names its key."""
    try:
        return datasets.create(spec.name, **spec.kwargs)
    except (DatasetNotFoundError, DatasetIntegrityError):  # the files, not the options
        raise
    except DataError as err:
        raise DataError(f"data.kwargs of {spec.name!r}: {err}") from None


_KNOB_SOURCES = "token data give vocab_size, image data input_shape, in_channels and image_size"


def build_model(
    spec: ModelConfig, splits: datasets.Splits, seed: int, recipe_key: str | None = "model"
) -> nn.Module:
    """A model from the registry, sized to the data (classes, vocabulary, image shape).
    ``recipe_key``: the recipe key ``spec`` came from (``"model"``, ``"guidance.guide"``), named in
    a builder's error."""
    kwargs = dict(spec.kwargs)
    defaults = {"num_classes": splits.num_classes}
    if splits.input_shape is not None:
        defaults["input_shape"] = splits.input_shape
        defaults["in_channels"] = splits.input_shape[0]
        defaults["image_size"] = splits.input_shape[-1]
    if splits.vocab_size is not None:
        defaults["vocab_size"] = splits.vocab_size
    accepted = models.accepted_kwargs(spec.name)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        hint = did_you_mean(unknown, accepted)
        raise ModelError(
            f"model {spec.name!r} has no option {', '.join(map(repr, unknown))}; it accepts "
            f"{', '.join(sorted(accepted))}.{hint}"
        )
    for key, value in defaults.items():
        if key in accepted and key not in kwargs:
            kwargs[key] = value
    missing = sorted(models.required_kwargs(spec.name) - set(kwargs))
    if missing:  # a knob the data fills in, from data that has none (a token model on images)
        where = f"{recipe_key}.kwargs" if recipe_key else "the model's keyword arguments"
        raise ModelError(
            f"model {spec.name!r} needs {', '.join(map(repr, missing))}, which this data set does not give "
            f"({_KNOB_SOURCES}); choose a data set that gives it or set it in {where}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return models.create(spec.name, **kwargs)
        except ModelError as err:  # a knob's value the builder refuses: say which recipe key holds it
            if recipe_key is None:
                raise
            raise ModelError(f"{recipe_key}.kwargs of {spec.name!r}: {err}") from None


def weights_hash(module: nn.Module, buffers: bool = True) -> str:
    """SHA-256 of every tensor of ``module``'s state dict, in name order (to show a guide stayed
    frozen); of its parameters only with ``buffers=False`` (a guide run in train mode updates its
    BatchNorm statistics)."""
    h = hashlib.sha256()
    params = dict(module.named_parameters())
    for name, tensor in sorted(module.state_dict().items()):
        if not buffers and name not in params:
            continue
        h.update(name.encode())
        h.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_guide(config: RunConfig, splits: datasets.Splits, runs_dir: Path) -> nn.Module:
    """The guide of ``config``: built from ``guidance.guide_seed``, with the weights of
    ``guidance.guide_run`` (a run in ``runs_dir``, a run folder or a weights file) when given."""
    gc = config.guidance
    if gc.guide is None:
        raise ConfigError(f"guidance.mode={gc.mode!r} needs guidance.guide (a model name and kwargs)")
    guide = build_model(gc.guide, splits, gc.guide_seed, recipe_key="guidance.guide")
    if gc.guide_run is not None:
        path = Path(gc.guide_run)
        folder = path if path.is_dir() else runs_dir / gc.guide_run
        weights = path if path.suffix in (".pt", ".ckpt") else folder / "final.pt"
        if not weights.is_file():
            raise CheckpointError(
                f"trained guide {gc.guide_run!r}: no weights at {weights}; train it first "
                f"(repguide run {gc.guide_run} --scale {config.scale}) or point guidance.guide_run at a final.pt"
            )
        try:
            guide.load_state_dict(load_weights(weights))
        except RuntimeError as err:
            raise CheckpointError(
                f"{weights} does not fit the guide {gc.guide.name} {gc.guide.kwargs} ({first_mismatch(err)}); "
                "point guidance.guide_run at weights of this guide, or set guidance.guide to the model that wrote them"
            ) from None
    return guide


def first_mismatch(err: RuntimeError) -> str:
    """The first specific line of a load_state_dict error (its first line only names the class)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    line = lines[1] if len(lines) > 1 else (lines or [""])[0]
    return line if len(line) <= 300 else line[:297] + "..."


def load_model(
    ref: str | Path,
    splits: datasets.Splits,
    *,
    seed: int = 0,
    kwargs: Mapping[str, Any] | None = None,
    weights: str = "final",
) -> nn.Module:
    """The model ``ref`` names, sized to ``splits``:

    * a registry name (``"resnet18"``): untrained, from ``seed``, with the size knobs ``kwargs``;
    * ``"NAME:PATH"``: that model with the weights at PATH (a state dict or a run checkpoint);
    * a run folder (``runs/<name>``): its config's model with its ``final.pt``, or with
      ``weights="init"`` its initial weights (rebuilt from the run's seed);
    * a ``final.pt`` / ``.ckpt`` file in a run folder: that run's model with those weights.
    """
    if weights not in ("final", "init"):
        raise ArgumentError(f"weights must be 'final' or 'init', got {weights!r}")
    path = Path(ref)
    if path.is_dir() or path.is_file():
        run_dir = path if path.is_dir() else path.parent
        config = run_config(run_dir)
        model = build_model(config.model, splits, config.train.seed)
        if weights == "init":
            return model
        file = path / "final.pt" if path.is_dir() else path
        if not file.is_file():
            raise CheckpointError(f"{run_dir} has no final.pt: the run has not finished (or give a .ckpt)")
    else:
        check_model_ref(ref)
        name, _, file = str(ref).partition(":")
        model = build_model(ModelConfig(name=name, kwargs=dict(kwargs or {})), splits, seed)
        if not file:
            return model
    state = load_weights(file)
    if "target" in state and "optimizer" in state:  # a training checkpoint, not a bare state dict
        state = state["target"]
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{file} does not fit {ref}: {str(err).splitlines()[0]}") from None
    return model


def check_model_ref(ref: str | Path) -> None:
    """Refuse a ``ref`` that :func:`load_model` cannot resolve, before anything is built."""
    if Path(ref).exists() or str(ref).partition(":")[0] in models.list_models():
        return
    raise ArgumentError(
        f"{str(ref)!r} is neither a run folder, a weights file, nor a model name "
        f"({', '.join(models.list_models())}), optionally as NAME:PATH-TO-WEIGHTS"
    )


def run_config(run_dir: str | Path) -> RunConfig:
    """The validated :class:`repguide.config.RunConfig` a run folder was trained with."""
    file = Path(run_dir) / "config.yaml"
    if not file.is_file():
        raise RunDirError(f"{run_dir} is not a run folder: it has no config.yaml")
    return validate(parse_yaml(file.read_text(), f"run config {file}"))
