"""Run configuration: YAML recipes validated by pydantic, with scales and ``key=value`` overrides.

A recipe file holds one run's settings, optionally ``base: <recipe>`` or ``base: [<recipe>, ...]``
to start from other recipes (later ones win; files named ``_*.yaml`` are shared parts, not runs), and ``scales: {tiny: {...}, small: {...}, paper: {...}}`` whose dotted-key overrides are
applied for the chosen scale. Unknown keys and wrong types are errors that name the key.
"""

from __future__ import annotations

import copy
import math
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import torch
import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from repguide._registry import did_you_mean
from repguide.config import rules as _rules
from repguide.errors import ConfigError
from repguide.runs import check_run_name

__all__ = [
    "ConfigError",
    "diff_keys",
    "resume_essentials",
    "DataConfig",
    "GuidanceConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "list_recipes",
    "load_recipe",
    "parse_overrides",
    "parse_yaml",
]

SCALES = ("tiny", "small", "paper")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _at_least(low: float, *, above: bool = False, null: str = "") -> AfterValidator:
    """Check that a number is finite and >= ``low`` (> with ``above``); ``null`` says what None means."""

    def check(v: Optional[float]) -> Optional[float]:
        if v is None or (math.isfinite(v) and (v > low if above else v >= low)):
            return v
        kind = "an integer" if isinstance(v, int) else "a finite number"
        raise ValueError(f"must be {kind} {'>' if above else '>='} {low}{f', or null {null}' if null else ''}")

    return AfterValidator(check)


_Count = Annotated[int, _at_least(1)]
_NonNegative = Annotated[float, _at_least(0)]
_Positive = Annotated[float, _at_least(0, above=True)]
# The accelerators and precisions lightning_fabric.Fabric accepts.
_Accelerator = Literal["auto", "cpu", "cuda", "gpu", "mps", "tpu"]
_Precision = Literal[
    "32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16", "16-true", "bf16-true", "64-true", "64",
    "transformer-engine", "transformer-engine-float16",
]


class ModelConfig(_Strict):
    name: str  # a name from repguide.models.list_models()
    kwargs: dict[str, Any] = Field(default_factory=dict)  # size knobs for its factory


class DataConfig(_Strict):
    name: str  # a name from repguide.data.list_datasets()
    kwargs: dict[str, Any] = Field(default_factory=dict)
    # Perplexity unit for language modelling: "token", "char" or "word".
    perplexity_unit: Literal["token", "char", "word"] = "token"


class GuidanceConfig(_Strict):
    # none: baseline. guide: task + alignment. distill: task + KL to the guide's outputs
    # (knowledge distillation, the paper's comparison).
    mode: Literal["none", "guide", "distill"] = "none"
    guide: Optional[ModelConfig] = None
    # A finished run (name under the runs folder, or a path) whose final weights are the guide;
    # None: an untrained guide initialised from guide_seed.
    guide_run: Optional[str] = None
    guide_seed: int = 0
    pairs: Union[Literal["stretch", "official"], list[list], dict[str, Union[str, list[str]]]] = "stretch"
    measure: str = "cka"
    weight: _NonNegative = 1.0
    reduction: Literal["flatten", "mean", "tokens"] = "flatten"
    guide_input: Literal["same", "noise"] = "same"
    # The candidate layers "stretch" pairs (repguide.capture.LAYER_RULES): "blocks", the outputs of a
    # model's repeated blocks (transformer.h.N, blocks.N, a ResNet stage's blocks, each layer of a
    # stacked RNN); "leaves", Linear/conv/recurrent/attention modules (the rule before blocks);
    # "all", every module. A stored config's old key `layer_types: default|all` reads as
    # `layers: leaves|all`, so a run made before blocks existed keeps its pairs when resumed.
    # "official", the paper's research code's rule (exact classes, LayerNorm included, the last
    # recorded layer dropped), goes with `pairs: official` (several guide layers on one target
    # layer: the last wins).
    layers: Literal["blocks", "leaves", "all", "official"] = "blocks"
    # Switch guidance off after this many steps (paper: 300).
    off_after: Annotated[Optional[int], _at_least(1, null="to keep guidance on")] = None
    # Guidance-driven initialisation: this many alignment-only steps (no task loss) before plain
    # training; guidance is then off. They come on top of train.epochs / train.max_steps, which
    # count task-training steps, so an init run trains on its task as long as its baseline.
    init_steps: Annotated[int, _at_least(0)] = 0
    init_input: Literal["noise", "data"] = "noise"
    temperature: _Positive = 4.0  # distillation temperature
    # The guide's mode at every forward: eval (no dropout, BatchNorm statistics never change) or
    # train (dropout on and BatchNorm statistics updated, as the official code runs the guide).
    guide_mode: Literal["eval", "train"] = "eval"
    # Fast modes (benchmarks/README.md gives each one's speed and error); the defaults are exact.
    guide_precision: Literal["fp32", "bf16"] = "fp32"  # bf16 operands for the guide's Grams
    sketch_dim: Annotated[Optional[int], _at_least(1, null="for no sketch")] = None  # CountSketch activations wider than this before the Gram
    # Keep the guide's (reduced, sketched) features of every training example after its first
    # visit and read them back instead of running the guide; needs guide_input=same, no random
    # augmentation and no data.kwargs.resample. Memory: training examples × Σ compared guide widths × 4 bytes.
    cache: bool = False
    compile: bool = False  # torch.compile linear CKA's stacked similarity (Guidance(compile=True)); same results

    @model_validator(mode="before")
    @classmethod
    def _old_layer_types(cls, raw: Any) -> Any:
        """``layer_types: default|all`` (the key before ``layers``) → ``layers: leaves|all``."""
        if isinstance(raw, dict) and "layer_types" in raw:
            raw = dict(raw)
            old = raw.pop("layer_types")
            new = {"default": "leaves", "all": "all"}.get(old)
            if new is None:
                raise ValueError(f"layer_types={old!r} is the old key: use layers=blocks|leaves|all")
            if raw.setdefault("layers", new) != new:
                raise ValueError(f"layer_types={old!r} (old key, means layers={new}) contradicts layers={raw['layers']!r}")
        return raw


class OptimConfig(_Strict):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: _Positive = 1e-3
    weight_decay: _NonNegative = 0.0
    momentum: _NonNegative = 0.9  # sgd only
    schedule: Literal["constant", "cosine", "step"] = "constant"
    step_epochs: _Count = 30  # "step": multiply lr by gamma every step_epochs epochs (the official code)
    gamma: _NonNegative = 0.1
    # Clip the gradient norm to this value (a negative one would reverse the gradient).
    grad_clip: Annotated[Optional[float], _at_least(0, above=True, null="for no clipping")] = None


class TrainConfig(_Strict):
    epochs: _Count = 10
    batch_size: _Count = 256  # the paper's; CKA's value depends on it
    # Stop early after this many optimiser steps.
    max_steps: Annotated[Optional[int], _at_least(1, null="for the whole schedule")] = None
    seed: int = 0
    eval_batch_size: _Count = 512
    log_every: _Count = 10  # steps between metric rows
    checkpoint_every: _Count = 200  # steps between checkpoints (and one at every epoch end)
    nonfinite: Literal["stop", "skip"] = "stop"  # on a NaN/Inf loss or gradient
    accelerator: _Accelerator = "auto"
    devices: Union[int, str] = 1  # a count, "auto", or device indices such as "0,1"
    num_nodes: _Count = 1
    strategy: str = "auto"
    precision: _Precision = "32-true"
    # local: each rank aligns its own shard of the batch (the paper's minibatch CKA);
    # global: activations are gathered across ranks and aligned on the whole batch.
    alignment: Literal["local", "global"] = "local"

    @field_validator("devices")
    @classmethod
    def _devices(cls, v: Union[int, str]) -> Union[int, str]:
        if isinstance(v, int) and v < 1 or isinstance(v, str) and not re.fullmatch(r"auto|-1|\d+(,\d+)*,?", v):
            raise ValueError("must be an integer >= 1, 'auto', or device indices such as '0,1'")
        return v

    def world_size(self) -> Optional[int]:
        """The number of training processes, when the recipe fixes it (an integer count of devices)."""
        if isinstance(self.devices, int) and self.strategy != "dp":
            return self.devices * self.num_nodes
        return None


class RunConfig(_Strict):
    name: str
    description: str = ""
    scale: Literal["tiny", "small", "paper"] = "small"
    model: ModelConfig
    data: DataConfig
    guidance: GuidanceConfig = Field(default_factory=GuidanceConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    # The paper's claim this run belongs to, for the reproduction report.
    claim: Optional[str] = None

    @field_validator("name")
    @classmethod
    def _one_folder(cls, v: str) -> str:
        return check_run_name(v)

    @model_validator(mode="after")
    def _consistent(self) -> "RunConfig":
        """The rules that tie keys to each other and to the registries, one line per broken rule."""
        problems = _rules.problems(self)
        if problems:
            raise ValueError("\n  ".join(problems))
        return self


# --------------------------------------------------------------------------------------------


def _recipe_dir():
    return resources.files("repguide") / "recipes"


def list_recipes() -> list[str]:
    """Names of the recipes shipped with repguide."""
    return sorted(
        p.name[:-5] for p in _recipe_dir().iterdir() if p.name.endswith(".yaml") and not p.name.startswith("_")
    )


def parse_yaml(text: str, where: str) -> dict:
    """The mapping a YAML document holds (an empty one: {}); a one-line :class:`ConfigError` naming
    ``where`` (e.g. ``"recipe mine.yaml"``) and the line when it is not YAML or not a mapping."""
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{where} is not valid YAML{at}: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values (key: value lines), got a {type(raw).__name__}")
    return raw


def _read_recipe(ref: str) -> tuple[dict, str]:
    path = Path(ref)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return parse_yaml(path.read_text(), f"recipe {path}"), path.stem
    shipped = _recipe_dir() / f"{ref}.yaml"
    if not shipped.is_file():
        hint = did_you_mean(ref, list_recipes(), n=3)
        raise ConfigError(
            f"no recipe {ref!r}: give a YAML file path or one of the shipped recipes "
            f"(repguide recipes).{hint}"
        )
    return parse_yaml(shipped.read_text(), f"recipe {ref}"), ref


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _raw_recipe(ref: str, seen: tuple[str, ...] = ()) -> dict:
    raw, name = _read_recipe(ref)
    if name in seen:
        raise ConfigError(f"recipe {name!r} is its own base (cycle {' -> '.join(seen + (name,))})")
    raw.setdefault("name", name)
    if "base" in raw:
        bases = raw.pop("base")
        merged: dict = {}
        for ref_ in [bases] if isinstance(bases, str) else bases:
            merged = _merge(merged, _raw_recipe(ref_, seen + (name,)))
        for key in ("name", "description", "claim"):
            merged.pop(key, None)
        scales = _merge(merged.pop("scales", {}), raw.pop("scales", {}))
        raw = _merge(merged, raw)
        raw["scales"] = scales
    return raw


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        if not isinstance(node.get(key, {}), dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
        node = node.setdefault(key, {})
    node[keys[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.epochs=3", "guidance.weight=0.1"]`` → ``{"train.epochs": 3, ...}`` (YAML values)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. train.epochs=3")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({getattr(err, 'problem', None) or err})") from None
    return out


def load_recipe(ref: str, scale: str = "small", overrides: dict[str, Any] | None = None) -> RunConfig:
    """The validated config of recipe ``ref`` (shipped name or YAML path) at ``scale``."""
    if scale not in SCALES:
        raise ConfigError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
    raw = _raw_recipe(ref)
    scales = raw.pop("scales", {}) or {}
    for key, value in (scales.get(scale) or {}).items():
        _set_dotted(raw, key, value)
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    raw["scale"] = scale
    config = validate(raw)
    _check_machine(config.train.accelerator)
    return config


def _check_machine(accelerator: str) -> None:
    """A recipe loaded to run asks for an accelerator this machine has (stored configs are not checked)."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    missing = {"cuda": not cuda, "gpu": not (cuda or mps), "mps": not mps}.get(accelerator, False)
    if missing:
        raise ConfigError(
            f"train.accelerator={accelerator!r}, but torch finds no such device on this machine; "
            "use train.accelerator=auto (a GPU if there is one, else the CPU) or train.accelerator=cpu"
        )


def validate(raw: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"])
            if e["type"] == "extra_forbidden":
                lines.append(f"unknown key {where!r}{_key_hint(where)}")
            elif not where:  # a rule across keys: its message names them and their values
                lines.append(e["msg"].removeprefix("Value error, "))
            else:
                msg = e["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError
                lines.append(f"{where}: {msg} (got {e.get('input')!r})")
        raise ConfigError("invalid run config:\n  " + "\n  ".join(lines)) from None


def _key_hint(where: str) -> str:
    parts = where.split(".")
    model: Any = RunConfig
    for part in parts[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return ""
        model = field.annotation
    fields = list(getattr(model, "model_fields", {}))
    prefix = "".join(f"{part}." for part in parts[:-1])
    hint = did_you_mean(parts[-1], fields, " (did you mean {}?)", show=lambda field: repr(prefix + field))
    return hint or f"; valid keys: {', '.join(fields)}"


def upgrade(stored: dict | None) -> dict | None:
    """A run's stored config with the keys added to the schema since it was written filled in with
    their defaults, so it compares equal to today's dump of the same config; None when there is no
    config or it no longer validates."""
    if stored is None:
        return None
    try:
        return RunConfig.model_validate(stored).model_dump(mode="json")
    except ValueError:
        return None


def resume_essentials(cfg: dict) -> dict:
    """The parts of a config that must match to resume (not the length of training or logging)."""
    cfg = {k: v for k, v in cfg.items() if k not in ("description", "claim")}
    cfg["train"] = {k: v for k, v in cfg["train"].items() if k not in ("epochs", "max_steps", "log_every", "checkpoint_every", "nonfinite")}
    return cfg


def diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested config dicts."""
    keys = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            keys += diff_keys(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            keys.append(f"{prefix}{k}")
    return keys
