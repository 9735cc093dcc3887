"""The Guidance module: one target forward, one frozen-guide forward, a layer-wise alignment loss.

    loss = weight(step) · Σ_pairs pair.weight · (1 − similarity(target layer, guide layer))
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from repguide.capture import Capture, discover, first_tensor, input_batch_size, plain_name, reduce
from repguide.errors import GuidanceError
from repguide.pairing import Pair, PairSpec, resolve_pairs
from repguide.guidance._checks import check_options, check_weight, set_guide_mode
from repguide.guidance._compute import similarities_and_loss, sketch_seed
from repguide.guidance._guide_stream import GuideStream
from repguide.guidance.diagnostics import Diagnosable
from repguide.guidance._host_step import HostStep
from repguide.guidance.guide_cache import GuideFeatureCache
from repguide.guidance.guide_input import explain_guide_failure, noise_like
from repguide.guidance.schedules import Constant, Weight
from repguide.similarity import Measure, get_measure, sketch

__all__ = ["Guidance", "GuidanceOutput"]


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


class Guidance(Diagnosable, nn.Module):
    """Train ``target`` with an alignment term to the frozen ``guide``.

    Args:
        target: the network being trained (any ``nn.Module``).
        guide: the network whose representations are matched; frozen (parameters never receive
            gradients) and run under ``torch.no_grad()``. It may share no module, parameter or
            buffer with the target. Its weights are part of this module's ``state_dict()``
            (under ``guide.``), so a saved Guidance restores the guide it was trained with.
        pairs: ``"stretch"`` (the paper's even spread of guide layers over target layers),
            ``"official"`` (the official code's mapping: with more guide than target layers, the
            last guide layer mapped to a target layer wins), an explicit list of
            ``(target_layer, guide_layer[, weight])``, or
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
        layers: which modules are candidate layers for ``"stretch"``: ``"blocks"`` (the model's
            blocks, or its leaf layers where it has none), ``"leaves"`` (the module types of
            :data:`repguide.capture.DEFAULT_LAYER_TYPES`), ``"all"`` or ``"official"`` (the
            official code's exact classes, the last recorded layer dropped; see
            :mod:`repguide.capture._discovery`); patterns match every module.
        layer_types: a tuple of module classes that overrides ``layers`` (``"default"``, what
            stored configs say, means ``layers="leaves"``).
        target_batch_axes / guide_batch_axes: ``{layer: axis}`` where a layer's batch axis is
            ambiguous. input_batch_axis: the batch axis of the inputs (1 for sequence-first).
        noise_seed: seed of the noise inputs; step k uses ``noise_seed + k``, so a resumed run
            draws the same noise.
        all_gather: for data-parallel training, a function concatenating a ``(n_local, ...)``
            tensor from every process along the batch axis (gradient-carrying for the target):
            the similarity is then computed on the global batch instead of each process's shard.
        guide_mode: ``"eval"`` (no dropout; BatchNorm uses its running statistics and never
            changes them) or ``"train"`` (dropout on and BatchNorm statistics updated, as the
            official code runs the guide; refused with a ``guide_cache``). Set at every guide
            forward, whatever ``.train()`` / ``.eval()`` calls reached the guide.

    Fast modes (opt-in; the defaults are exact; measured speed and error: benchmarks/README.md):
        guide_precision: ``"fp32"`` (exact) or ``"bf16"``: the guide's Gram matrices are computed
            from bf16 operands (fp32 accumulation, result rounded to bf16), faster on CPUs with
            bf16 units; the target side stays fp32.
        sketch_dim: if set, every compared activation (target and guide) wider than this is first
            projected to ``sketch_dim`` features by a fixed, seeded CountSketch
            (:func:`repguide.similarity.sketch`), which keeps its Gram in expectation. The Gram of a
            d-wide layer then costs n²·sketch_dim instead of n²·d. The error grows with the
            activations' effective rank over ``sketch_dim``: small for wide conv and linear layers,
            larger for whole flattened sequences, where it buys little anyway. ``sketch_seed``
            picks the signs.
        guide_cache: a :class:`GuideFeatureCache`; the call then takes ``guide_index=`` (the
            batch's example positions) and reads the guide's features from the cache instead of
            running the guide, once every example has been seen.
        compile: if True, linear CKA's stacked similarity (the default measure in the Gram form,
            forward and backward) is compiled with ``torch.compile`` (inductor, static shapes, so
            each new stack shape compiles once; CUDA-graph mode on CUDA, untested on a GPU). Other
            measures and forms run as without it. Same results to float rounding.
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
        layers: str = "blocks",
        layer_types: str | tuple[type, ...] | None = None,
        target_batch_axes: Mapping[str, int] | None = None,
        guide_batch_axes: Mapping[str, int] | None = None,
        input_batch_axis: int = 0,
        noise_seed: int = 0,
        all_gather: Callable[[Tensor], Tensor] | None = None,
        guide_precision: str = "fp32",
        sketch_dim: int | None = None,
        sketch_seed: int = 0,
        guide_cache: GuideFeatureCache | None = None,
        guide_mode: str = "eval",
        compile: bool = False,
    ):
        super().__init__()
        check_options(
            target, guide, layers=layers, reduction=reduction, guide_input=guide_input,
            guide_precision=guide_precision, sketch_dim=sketch_dim, guide_cache=guide_cache, guide_mode=guide_mode,
            compile=compile, weight=weight,
        )
        self.target = target
        self.guide_mode = guide_mode
        self.guide = guide.requires_grad_(False)
        set_guide_mode(guide, guide_mode)
        self.measure = get_measure(measure) if isinstance(measure, str) else measure
        if isinstance(weight, (int, float)):
            weight = Constant(float(weight))
        self.weight = weight
        self.guide_input = guide_input
        self.reduction = reduction
        self.layers = layers
        self.layer_types = layer_types
        self.input_batch_axis = input_batch_axis
        self.noise_seed = noise_seed
        self.all_gather = all_gather
        self.guide_precision = guide_precision
        self.sketch_dim = sketch_dim
        self.sketch_seed = sketch_seed
        self.guide_cache = guide_cache
        self.compile_similarity = compile  # not `self.compile`: nn.Module.compile is a method
        self._target_widths: dict[str, int] = {}  # last seen, to choose each guide layer's form early
        self._guide_hooks: list = []
        self._guide_stream: GuideStream | None = None  # while the guide runs
        self._guide_float64 = False
        self._batch_axes = {role: {plain_name(model, name): axis for name, axis in (axes or {}).items()} for role, model, axes
                            in (("target", target, target_batch_axes), ("guide", guide, guide_batch_axes))}
        self._overwritten: dict[str, dict[str, bool]] = {"target": {}, "guide": {}}  # seen by discovery
        self._pair_spec = pairs
        self._pairs: list[Pair] | None = None
        self._probed = False
        self._captures: dict[str, Capture] = {}
        # Not a submodule attribute: a wrapper stored here must not enter the state dict.
        object.__setattr__(self, "_run_target", target)
        # The training step lives in a buffer so it is saved with the state dict and resumes.
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._host_step = HostStep()  # read without a host-device sync (the schedule is host-side)
        if not isinstance(pairs, (str, Mapping)):
            self._set_pairs(resolve_pairs(pairs))
        if example_input is not None:
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
        """Probe both networks once: fix every layer's batch axis and, unless the pairs are
        explicit, find the candidate layers and pair them."""
        g_args, g_kwargs = self._guide_inputs(args, kwargs)
        explicit = self._pairs is not None
        types = "all" if explicit or isinstance(self._pair_spec, Mapping) else self.layer_types
        found = {}
        set_guide_mode(self.guide, self.guide_mode)
        for role, model, a, k in (("target", self.target, args, kwargs), ("guide", self.guide, g_args, g_kwargs)):
            with explain_guide_failure(self.guide_input) if role == "guide" else contextlib.nullcontext():
                infos = discover(
                    model, *a, layers=self.layers, types=types, batch_axes=self._batch_axes[role],
                    input_batch_axis=self.input_batch_axis, **k,
                )
            for info in infos:
                self._batch_axes[role].setdefault(info.name, info.batch_axis)
                self._overwritten[role][info.name] = info.overwritten
                if role == "target" and (self.reduction != "tokens" or len(info.shape) > 2):
                    # The width each target layer reaches the measure with, known before the first
                    # step, so that step chooses the guide's form as every later one does (a
                    # resumed run must compute exactly what an uninterrupted one computes).
                    reduced = reduce(torch.empty(info.shape, device="meta"), self.reduction, info.channels_first)
                    width = reduced.shape[-1]
                    self._target_widths[info.name] = min(width, self.sketch_dim) if self.sketch_dim else width
            found[role] = [info.name for info in infos if not info.is_output]
        pairs = self._pairs if explicit else resolve_pairs(self._pair_spec, found["target"], found["guide"])
        self._set_pairs(pairs)
        self._probed = True

    def _set_pairs(self, pairs: list[Pair]) -> None:
        for capture in self._captures.values():
            capture.remove()
        for handle in self._guide_hooks:
            handle.remove()
        self._pairs = pairs = [  # a compiled network's layers go by the original module's names
            Pair(plain_name(self.target, p.target), plain_name(self.guide, p.guide), p.weight) for p in pairs]
        self._captures = {
            role: Capture(model, [getattr(p, role) for p in pairs], self._batch_axes[role], role,
                          self._overwritten[role])
            for role, model in (("target", self.target), ("guide", self.guide))
        }
        # Registered after the capture's hooks, so they see each activation right after it is kept.
        self._guide_hooks = [m.register_forward_hook(self._on_guide_layer) for m in self._captures["guide"].modules]

    def run_target_with(self, wrapper: Callable) -> None:
        """Call ``wrapper`` instead of the target module itself (e.g. its DDP or Fabric wrapper,
        which must run for gradient synchronisation); hooks stay on the target's own modules."""
        object.__setattr__(self, "_run_target", wrapper)

    # -- modes -------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> "Guidance":
        super().train(mode)
        set_guide_mode(self.guide, self.guide_mode)
        return self

    def current_weight(self) -> float:
        return float(self.weight(self._host_step.read(self.step)))

    # -- forward -----------------------------------------------------------------------------

    def _guide_inputs(self, args: tuple, kwargs: dict, step: int = 0) -> tuple[tuple, dict]:
        if self.guide_input == "same":
            return args, kwargs
        if self.guide_input == "noise":
            first = first_tensor(list(args))
            generator = torch.Generator(device=first.device if first is not None else "cpu")
            generator.manual_seed(self.noise_seed + step)
            return tuple(noise_like(a, generator) for a in args), kwargs
        return self.guide_input(args, kwargs)

    def forward(self, *args: Any, guide_index: Tensor | None = None, **kwargs: Any) -> GuidanceOutput:
        """Run the guide once and the target once on ``args``/``kwargs``; see :class:`GuidanceOutput`.

        ``guide_index: (n,)``, the batch's example positions, is required with a ``guide_cache``
        (and refused without one): the guide's features are then read from the cache.
        """
        if (guide_index is None) != (self.guide_cache is None):
            raise GuidanceError(
                "guide_index= (the batch's example positions) goes with guide_cache= and only with it; "
                f"this Guidance has guide_cache={'set' if self.guide_cache is not None else 'None'}"
            )
        step = self._host_step.read(self.step)
        weight = check_weight(self.weight(step), f"the weight at step {step}")
        if self.training and torch.is_grad_enabled():
            self._host_step.advance(self.step)
        if weight == 0:
            output = self._run_target(*args, **kwargs)
            return GuidanceOutput(output, _zero_like_output(output), {}, 0.0)
        if not self._probed:
            self._resolve(args, kwargs)
        n = input_batch_size(args, kwargs, self.input_batch_axis)
        if n < self.measure.min_n and self.all_gather is None:  # (gathered, the batches add up)
            raise GuidanceError(
                f"{self.measure!r} needs at least {self.measure.min_n} examples per batch (it compares "
                f"examples with each other); got a batch of {n}. A DataLoader's last batch can be "
                "that small: pass drop_last=True, or skip such batches"
            )
        # The guide goes first and is reduced at once to what the measure needs (for linear CKA
        # one n×n Gram per layer), so its activations are freed before the target's graph exists.
        guide = self._prepare_guide(args, kwargs, step, n, guide_index)
        target_capture = self._captures["target"]
        with target_capture.record(n) as t_acts:
            output = self._run_target(*args, **kwargs)
        target_capture.check_complete(t_acts, "target", trains=self.training and torch.is_grad_enabled())
        similarities, loss = self._similarities(t_acts, guide)
        return GuidanceOutput(output, loss if weight == 1 else weight * loss, similarities, weight)

    @torch.no_grad()
    def _prepare_guide(self, args: tuple, kwargs: dict, step: int, n: int, index: Tensor | None) -> dict[str, list]:
        """``guide layer → [prepared input per position]`` (one entry unless reduction='tokens'),
        from the cache or from one guide forward.

        Each guide layer is centred once per step and shared by every pair naming it; where no pair
        needs its features (a Gram-form measure, judged on the target widths of the last step),
        only its n×n Gram is kept.
        """
        cache, capture = self.guide_cache, self._captures["guide"]
        spec = (tuple(capture.names), self.reduction, self.sketch_dim, self.sketch_seed)
        self._guide_float64 = any(p.dtype == torch.float64 for p in self.target.parameters())
        features = cache.lookup(index, spec) if cache is not None else None
        if features is None:
            # Prepared inside the guide's forward unless the features must be stored first, or
            # gathered across processes (a collective is kept out of the forward hooks).
            features = self._run_guide(args, kwargs, step, n, prepare=cache is None and self.all_gather is None)
            if cache is not None:
                cache.store(index, features, spec)
        names = [name for name, value in features.items() if not isinstance(value, list)]
        return {**features, **dict(zip(names, self._prepare_guide_layers(names, [features[n] for n in names])))}

    def _run_guide(self, args: tuple, kwargs: dict, step: int, n: int, prepare: bool) -> dict[str, Any]:
        """One guide forward; each layer's activation is reduced and sketched (and, if ``prepare``,
        prepared) the moment its layer fires, so the raw activations never pile up."""
        g_args, g_kwargs = self._guide_inputs(args, kwargs, step)
        n_guide = input_batch_size(g_args, g_kwargs, self.input_batch_axis)
        if n_guide != n:
            raise GuidanceError(
                f"the guide's inputs have batch size {n_guide} but the target's have {n}; "
                "similarity compares the same examples, so both must see the same batch size"
            )
        capture = self._captures["guide"]
        set_guide_mode(self.guide, self.guide_mode)
        with capture.record(n) as g_acts, explain_guide_failure(self.guide_input):
            prepare_layers = self._prepare_guide_layers if prepare else None
            self._guide_stream = GuideStream(g_acts, self._reduce_guide_layer, prepare_layers,
                                             lambda g: self.measure.stacks_guides(g.device, self._matmul_dtype))
            try:
                self.guide(*g_args, **g_kwargs)
                self._guide_stream.flush()
            finally:
                self._guide_stream = None
        capture.check_complete(g_acts, "guide")
        # Popped, so that the capture holds no reference to them after this step.
        return {name: g_acts.pop(name) for name in capture.names}

    def _on_guide_layer(self, module: nn.Module, args: Any, output: Any) -> None:
        """Forward hook on the guide's paired modules, run after the capture's own hook."""
        if self._guide_stream is not None:
            self._guide_stream.on_layer()

    def _reduce_guide_layer(self, name: str, activation: Tensor) -> Tensor:
        channels_first = self._captures["guide"].normalise.channels_first[name]
        return self._sketch("guide", name, reduce(activation, self.reduction, channels_first))

    @property
    def _matmul_dtype(self) -> torch.dtype | None:
        """The dtype of the guide Grams' products: bfloat16 for ``guide_precision="bf16"``."""
        return torch.bfloat16 if self.guide_precision == "bf16" else None

    def _prepare_guide_layers(self, names: list[str], gs: list[Tensor]) -> list[list]:
        """``[prepared input per position]`` of each guide layer ``names[i]``, reduced to ``gs[i]``;
        the (n, d) ones through :meth:`~repguide.similarity.Measure.prepare_guides` together."""
        if self.all_gather is not None:
            gs = [self.all_gather(g) for g in gs]
        if self._guide_float64:
            gs = [g.double() for g in gs]
        widths = [[self._target_widths.get(p.target) for p in self._pairs if p.guide == name]
                  for name in names]
        dtype = self._matmul_dtype
        out: list = [None] * len(gs)
        flat = [i for i, g in enumerate(gs) if g.dim() == 2]
        with torch.autocast(device_type=gs[0].device.type, enabled=False) if gs else contextlib.nullcontext():
            for i, p in zip(flat, self.measure.prepare_guides([gs[i] for i in flat], [widths[i] for i in flat], dtype)):
                out[i] = [p]
            for i in set(range(len(gs))) - set(flat):
                out[i] = self.measure.prepare_guide_positions(gs[i], widths[i], dtype)
        return out

    def _sketch(self, role: str, layer: str, a: Tensor) -> Tensor:
        if self.sketch_dim is None:
            return a
        return sketch(a, self.sketch_dim, sketch_seed(self.sketch_seed, role, layer))

    def _similarities(self, t_acts: dict[str, Tensor], guide: dict[str, list]) -> tuple[dict, Tensor]:
        """Every pair's similarity and Σ pair.weight · (1 − similarity): guidance._compute."""
        return similarities_and_loss(self, t_acts, guide)

    def extra_repr(self) -> str:
        pairs = "unresolved" if self._pairs is None else f"{len(self._pairs)} pairs"
        return f"measure={self.measure!r}, weight={self.weight!r}, {pairs}, reduction={self.reduction!r}"


def _zero_like_output(output: Any) -> Tensor:
    found = first_tensor(output)
    device = found.device if found is not None else "cpu"
    return torch.zeros((), device=device)
