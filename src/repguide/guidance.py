"""The Guidance module: one target forward, one frozen-guide forward, a layer-wise alignment loss.

    loss = weight(step) · Σ_pairs pair.weight · (1 − similarity(target layer, guide layer))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import Tensor, nn

from repguide.capture import REDUCTIONS, Capture, _batch_size, _first_tensor, discover, reduce
from repguide.pairing import Pair, PairSpec, resolve_pairs
from repguide.similarity import Measure, Prepared, get_measure

__all__ = ["Constant", "Guidance", "GuidanceOutput", "OffAfter", "WeightSchedule"]


# --------------------------------------------------------------------------------------------
# Weight schedules


class WeightSchedule:
    """The alignment weight as a function of the training step (steps counted from 0)."""

    def __call__(self, step: int) -> float:
        raise NotImplementedError


@dataclass(frozen=True)
class Constant(WeightSchedule):
    weight: float = 1.0

    def __call__(self, step: int) -> float:
        return self.weight


@dataclass(frozen=True)
class OffAfter(WeightSchedule):
    """``weight`` for the first ``steps`` steps, then 0: the paper's guidance stopped after 300 steps."""

    weight: float
    steps: int

    def __call__(self, step: int) -> float:
        return self.weight if step < self.steps else 0.0


Weight = Union[float, WeightSchedule, Callable[[int], float]]


@dataclass
class GuidanceOutput:
    """What a guided forward returns.

    ``output``: the target's output, unchanged. ``loss``: the weighted alignment loss (0-dim; zero
    when the weight is 0 at this step, in which case the guide did not run). ``similarities``:
    ``(target layer, guide layer) → 0-dim similarity`` per pair. ``weight``: the weight used.
    """

    output: Any
    loss: Tensor
    similarities: dict[tuple[str, str], Tensor] = field(default_factory=dict)
    weight: float = 0.0


class Guidance(nn.Module):
    """Train ``target`` with an alignment term to the frozen ``guide``.

    Args:
        target: the network being trained (any ``nn.Module``).
        guide: the network whose representations are matched; frozen (parameters never receive
            gradients) and always run in eval mode under ``torch.no_grad()``.
        pairs: ``"stretch"`` (the paper's even spread of guide layers over target layers), an
            explicit list of ``(target_layer, guide_layer[, weight])``, or
            ``{"target": names-or-globs, "guide": names-or-globs}``. See :func:`repguide.layers`.
        measure: a registered similarity name (``"cka"``, ``"cka_unbiased"``, ``"cka_rbf"``,
            ``"rsa"``, ``"procrustes"``) or a :class:`~repguide.similarity.Measure`.
        weight: a float, a :class:`WeightSchedule`, or any ``step -> float`` callable.
        guide_input: ``"same"`` (the guide sees the target's batch), ``"noise"`` (random inputs
            of the batch's shape and dtype, the paper's noise variant), or a callable
            ``(args, kwargs) -> (args, kwargs)`` producing the guide's inputs.
        reduction: how activations become matrices: ``"flatten"`` (paper), ``"mean"`` over
            positions, ``"tokens"`` (per-position similarity, averaged).
        example_input: if given (a tensor or a tuple of positional args), layers are discovered
            and ``pairs`` resolved now; otherwise on the first call.
        layer_types: module types that are candidate layers for ``"stretch"`` (see
            :data:`repguide.capture.DEFAULT_LAYER_TYPES`); patterns match every module.
        target_batch_axes / guide_batch_axes: ``{layer: axis}`` where a layer's batch axis is
            ambiguous. input_batch_axis: the batch axis of the inputs (1 for sequence-first).
        noise_seed: seed of the noise inputs; step k uses ``noise_seed + k``, so a resumed run
            draws the same noise.
        all_gather: for data-parallel training, a function concatenating a ``(n_local, ...)``
            tensor from every process along the batch axis (gradient-carrying for the target):
            the similarity is then computed on the global batch instead of each process's shard.
    """

    def __init__(
        self,
        target: nn.Module,
        guide: nn.Module,
        pairs: PairSpec = "stretch",
        measure: str | Measure = "cka",
        weight: Weight = 1.0,
        guide_input: str | Callable = "same",
        reduction: str = "flatten",
        *,
        example_input: Any = None,
        layer_types: str | tuple[type, ...] = "default",
        target_batch_axes: Mapping[str, int] | None = None,
        guide_batch_axes: Mapping[str, int] | None = None,
        input_batch_axis: int = 0,
        noise_seed: int = 0,
        all_gather: Callable[[Tensor], Tensor] | None = None,
    ):
        super().__init__()
        if target is guide:
            raise ValueError("target and guide must be different modules (the guide is frozen)")
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")
        if not (guide_input in ("same", "noise") or callable(guide_input)):
            raise ValueError(
                f"guide_input must be 'same', 'noise' or a callable (args, kwargs) -> (args, kwargs); "
                f"got {guide_input!r}"
            )
        self.target = target
        self.guide = guide.eval().requires_grad_(False)
        self.measure = get_measure(measure) if isinstance(measure, str) else measure
        if isinstance(weight, (int, float)):
            weight = Constant(float(weight))
        self.weight = weight
        self.guide_input = guide_input
        self.reduction = reduction
        self.layer_types = layer_types
        self.input_batch_axis = input_batch_axis
        self.noise_seed = noise_seed
        self.all_gather = all_gather
        self._batch_axes = {"target": dict(target_batch_axes or {}), "guide": dict(guide_batch_axes or {})}
        self._pair_spec = pairs
        self._pairs: list[Pair] | None = None
        self._captures: dict[str, Capture] = {}
        # Not a submodule attribute: a wrapper stored here must not enter the state dict.
        object.__setattr__(self, "_run_target", target)
        # The training step lives in a buffer so it is saved with the state dict and resumes.
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        if not isinstance(pairs, (str, Mapping)):
            self._set_pairs(resolve_pairs(pairs))
        elif example_input is not None:
            args = example_input if isinstance(example_input, tuple) else (example_input,)
            self._resolve(args, {})

    # -- pairs -------------------------------------------------------------------------------

    @property
    def pairs(self) -> list[Pair]:
        """The explicit list of pairs (resolved on the first call unless ``example_input`` was given)."""
        if self._pairs is None:
            raise RuntimeError(
                "pairs are resolved from the layers seen on the first call; call the Guidance "
                "module once, or pass example_input= to the constructor to resolve them now"
            )
        return list(self._pairs)

    def _resolve(self, args: tuple, kwargs: dict) -> None:
        g_args, g_kwargs = self._guide_inputs(args, kwargs)
        types = "all" if isinstance(self._pair_spec, Mapping) else self.layer_types
        found = {}
        for role, model, a, k in (("target", self.target, args, kwargs), ("guide", self.guide, g_args, g_kwargs)):
            infos = discover(
                model, *a, types=types, batch_axes=self._batch_axes[role],
                input_batch_axis=self.input_batch_axis, **k,
            )
            found[role] = [info.name for info in infos if not info.is_output]
        self._set_pairs(resolve_pairs(self._pair_spec, found["target"], found["guide"]))

    def _set_pairs(self, pairs: list[Pair]) -> None:
        for capture in self._captures.values():
            capture.remove()
        self._pairs = pairs
        self._captures = {
            role: Capture(model, [getattr(p, role) for p in pairs], self._batch_axes[role], role)
            for role, model in (("target", self.target), ("guide", self.guide))
        }

    def run_target_with(self, wrapper: Callable) -> None:
        """Call ``wrapper`` instead of the target module itself (e.g. its DDP or Fabric wrapper,
        which must run for gradient synchronisation); hooks stay on the target's own modules."""
        object.__setattr__(self, "_run_target", wrapper)

    # -- modes -------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> "Guidance":
        super().train(mode)
        self.guide.eval()  # the guide's BatchNorm statistics and dropout never change
        return self

    def current_weight(self) -> float:
        return float(self.weight(int(self.step)))

    # -- forward -----------------------------------------------------------------------------

    def _guide_inputs(self, args: tuple, kwargs: dict, step: int = 0) -> tuple[tuple, dict]:
        if self.guide_input == "same":
            return args, kwargs
        if self.guide_input == "noise":
            first = _first_tensor(list(args))
            generator = torch.Generator(device=first.device if first is not None else "cpu")
            generator.manual_seed(self.noise_seed + step)
            return tuple(_noise_like(a, generator) for a in args), kwargs
        return self.guide_input(args, kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> GuidanceOutput:
        """Run the target once on ``args``/``kwargs`` and the guide once; see :class:`GuidanceOutput`."""
        step = int(self.step)
        weight = float(self.weight(step))
        if self.training and torch.is_grad_enabled():
            self.step += 1
        if weight == 0:
            output = self._run_target(*args, **kwargs)
            return GuidanceOutput(output, _zero_like_output(output), {}, 0.0)
        if self._pairs is None:
            self._resolve(args, kwargs)
        n = _batch_size(args, kwargs, self.input_batch_axis)
        target_capture, guide_capture = self._captures["target"], self._captures["guide"]
        with target_capture.record(n) as t_acts:
            output = self._run_target(*args, **kwargs)
        target_capture.check_complete(t_acts, "target")
        g_args, g_kwargs = self._guide_inputs(args, kwargs, step)
        n_guide = _batch_size(g_args, g_kwargs, self.input_batch_axis)
        if n_guide != n:
            raise ValueError(
                f"the guide's inputs have batch size {n_guide} but the target's have {n}; "
                "similarity compares the same examples, so both must see the same batch size"
            )
        with torch.no_grad(), guide_capture.record(n) as g_acts:
            self.guide(*g_args, **g_kwargs)
        guide_capture.check_complete(g_acts, "guide")
        similarities = self._similarities(t_acts, g_acts)
        loss = sum(p.weight * (1 - similarities[p.key]) for p in self._pairs)
        return GuidanceOutput(output, weight * loss, similarities, weight)

    def _similarities(self, t_acts: dict[str, Tensor], g_acts: dict[str, Tensor]) -> dict:
        t_cf = self._captures["target"].normalise.channels_first
        g_cf = self._captures["guide"].normalise.channels_first
        prepared: dict[tuple[str, int], Prepared] = {}
        out = {}
        for pair in self._pairs:
            t = reduce(t_acts[pair.target], self.reduction, t_cf[pair.target])
            g = reduce(g_acts[pair.guide], self.reduction, g_cf[pair.guide])
            if self.all_gather is not None:
                t, g = self.all_gather(t), self.all_gather(g)
            if t.dim() == 3 and t.shape[1] != g.shape[1]:
                raise ValueError(
                    f"reduction 'tokens' compares position by position, but target layer "
                    f"{pair.target!r} has {t.shape[1]} positions and guide layer {pair.guide!r} "
                    f"has {g.shape[1]}; use 'flatten' or 'mean'"
                )
            with torch.autocast(device_type=t.device.type, enabled=False):
                if t.dim() == 2:
                    out[pair.key] = self._compare(t, g, (pair.guide, -1), prepared)
                else:
                    out[pair.key] = torch.stack(
                        [self._compare(t[:, i], g[:, i], (pair.guide, i), prepared) for i in range(t.shape[1])]
                    ).mean()
        return out

    def _compare(self, t: Tensor, g: Tensor, key: tuple[str, int], prepared: dict) -> Tensor:
        if t.dtype == torch.float64 or g.dtype == torch.float64:
            t, g = t.double(), g.double()
        if key not in prepared:  # each guide layer is centred (and its Gram built) once per step
            with torch.no_grad():
                prepared[key] = self.measure.prepare(g)
        return self.measure.compare(self.measure.prepare(t), prepared[key])

    def extra_repr(self) -> str:
        pairs = "unresolved" if self._pairs is None else f"{len(self._pairs)} pairs"
        return f"measure={self.measure!r}, weight={self.weight!r}, {pairs}, reduction={self.reduction!r}"


def _noise_like(value: Any, generator: torch.Generator) -> Any:
    """Random values of the same shape and dtype: N(0, 1) for floats, uniform over the observed
    range for integer tokens (the paper's integer noise)."""
    if not isinstance(value, Tensor):
        return value
    if value.is_floating_point():
        return torch.randn(value.shape, generator=generator, device=value.device).to(value.dtype)
    if value.dtype == torch.bool:
        return torch.rand(value.shape, generator=generator, device=value.device) < 0.5
    low, high = int(value.min()), int(value.max()) + 1
    return torch.randint(low, high, value.shape, generator=generator, device=value.device, dtype=value.dtype)


def _zero_like_output(output: Any) -> Tensor:
    found = _first_tensor(output)
    device = found.device if found is not None else "cpu"
    return torch.zeros((), device=device)
