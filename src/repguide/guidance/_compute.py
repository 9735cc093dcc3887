"""The similarity loop of a guided step: every pair's similarity and the weighted loss.

Linear CKA (the default measure) in the Gram form goes through
:func:`repguide.similarity.fused.linear_cka_loss`: the pairs whose target activations share a
shape (and the positions of a ``reduction="tokens"`` pair, without a loop over them) are stacked
and compared in one autograd node that also returns their weighted loss: ~18 aten ops forward
and 5 backward for the whole stack, one ``bmm`` each way (benchmarks/README.md, log #46, #51).
Stacks of plain (n, d) layers that share n but not d (a CNN's stages) go through one node together,
:func:`repguide.similarity.fused_group.linear_cka_group_loss` (log #68).
Every other measure, form or guide preparation runs the measure's own ``prepare_target`` and
``compare``, each target layer prepared once. No path reads a value on the host (the guide's
Grams, made before this, read one per layer on a CPU only: :meth:`Prepared.gram_only`).
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from repguide.capture import reduce
from repguide.errors import GuidanceError
from repguide.similarity import Prepared, sketch
from repguide.similarity.fused import linear_cka_loss, unit_gram
from repguide.similarity.fused_group import linear_cka_group_loss
from repguide.similarity.sketching import stacked_signs
from repguide.similarity.kernel_alignment import LinearCKA, use_gram_form

__all__ = ["similarities_and_loss", "sketch_seed"]


def similarities_and_loss(guidance, t_acts: dict[str, Tensor], guide: dict[str, list]) -> tuple[dict, Tensor]:
    """``({pair key: 0-dim similarity}, Σ pair.weight · (1 − similarity))`` for one step."""
    targets = _reduced_targets(guidance, t_acts)
    groups: dict[tuple, list] = {}  # (n, d, dtype, device) → [(pair, (m, n, d) stack, [unit Grams])]
    out, prepared, loss = {}, {}, None
    for pair in guidance._pairs:
        t, g = targets[pair.target], guide[pair.guide]
        if t.dim() == 3 and t.shape[1] != len(g):
            raise GuidanceError(
                f"reduction 'tokens' compares position by position, but target layer "
                f"{pair.target!r} has {t.shape[1]} positions and guide layer {pair.guide!r} "
                f"has {len(g)}; use 'flatten' or 'mean'"
            )
        if _fused(guidance.measure, t, g):
            x = t if t.dim() == 2 else t.transpose(0, 1)  # (n, d), or (positions, n, d)
            x = x if x.dtype == g[0].dtype else _tensor(x).to(g[0].dtype)
            groups.setdefault((*x.shape[-2:], x.dtype, x.device), []).append((pair, x, [unit_gram(p) for p in g]))
            continue
        t = _tensor(t)
        with torch.autocast(device_type=t.device.type, enabled=False):
            if t.dim() == 2:
                s = _compare(guidance.measure, t, (pair.target, -1), g[0], prepared)
            else:
                s = torch.stack([_compare(guidance.measure, t[:, i], (pair.target, i), g[i], prepared)
                                 for i in range(t.shape[1])]).mean()
        out[pair.key] = s
        term = pair.weight * (1 - s)
        loss = term if loss is None else loss + term
    for items in _by_width(groups, guidance.compile_similarity):
        if isinstance(items, _Widths):
            loss = _fused_widths(items, out, loss)
        else:
            loss = _fused_group(items, out, loss, _stack_function(guidance, items[0][1].device))
    return {p.key: out[p.key] for p in guidance._pairs}, loss


class _Widths(list):
    """Stacks of 2-D target layers of one batch, dtype and device whose widths differ: one node
    for all of them (:func:`repguide.similarity.fused_group.linear_cka_group_loss`)."""


def _by_width(groups: dict[tuple, list], compiled: bool) -> list:
    """The stacks of ``groups``, those of plain (n, d) layers that share n, dtype and device but
    not d gathered into one :class:`_Widths` (not with ``compile``, which compiles the stack)."""
    merged: dict[tuple, _Widths] = {}
    out: list = []
    for (n, d, dtype, device), items in groups.items():
        if compiled or not all(type(x) is Tensor and x.dim() == 2 for _, x, _ in items):
            out.append(items)
            continue
        widths = merged.get((n, dtype, device))
        if widths is None:
            widths = merged[(n, dtype, device)] = _Widths()
            out.append(widths)
        widths.append(items)
    return [w[0] if isinstance(w, _Widths) and len(w) == 1 else w for w in out]


def _fused_widths(stacks: _Widths, out: dict, loss: Tensor | None) -> Tensor:
    """Stacks of target layers that differ in width against their guides' unit Grams, one node."""
    items = [item for stack in stacks for item in stack]
    x = items[0][1]
    per_row = tuple(pair.weight for pair, _, _ in items)
    with torch.autocast(device_type=x.device.type, enabled=False):
        units = _stacked([u for _, _, us in items for u in us])
        term, sims = linear_cka_group_loss([[x for _, x, _ in stack] for stack in stacks], units,
                                           *_row_weights(per_row, x.dtype, x.device), sum(per_row))
    for (pair, _, _), s in zip(items, sims.unbind()):
        out[pair.key] = s
    return term if loss is None else loss + term


def sketch_seed(seed: int, role: str, layer: str) -> int:
    """The CountSketch seed of one layer ("target" or "guide" ``role``) under ``sketch_seed``."""
    return zlib.crc32(f"{seed}/{role}/{layer}".encode())


def _reduced_targets(guidance, t_acts: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each paired target layer reduced (and sketched, gathered) once: (n, d) or (n, positions, d).
    A flattened layer that the stack can flatten (and sketch) in its one copy is left as a
    :class:`_Flat`: a non-contiguous one, which ``reshape`` would copy first, and with a
    ``sketch_dim`` any layer wider than it."""
    t_cf = guidance._captures["target"].normalise.channels_first
    dim, targets = guidance.sketch_dim, {}
    for pair in guidance._pairs:
        if pair.target not in targets:
            a = t_acts[pair.target]
            if guidance.reduction == "flatten" and guidance.all_gather is None and (
                    a.dim() > 2 and not a.is_contiguous() and dim is None
                    or dim is not None and math.prod(a.shape[1:]) > dim):
                seed = None if dim is None else sketch_seed(guidance.sketch_seed, "target", pair.target)
                targets[pair.target] = _Flat(a, seed, dim)
                guidance._target_widths[pair.target] = targets[pair.target].shape[-1]
                continue
            t = guidance._sketch("target", pair.target, reduce(a, guidance.reduction, t_cf[pair.target]))
            targets[pair.target] = guidance.all_gather(t) if guidance.all_gather is not None else t
            guidance._target_widths[pair.target] = t.shape[-1]
    return targets


class _Flat(NamedTuple):
    """A target activation standing for its ``reduce(a, "flatten")`` (sketched to ``dim`` with
    ``seed`` where ``seed`` is set), made by :func:`_targets_of_stack` inside the stack: a
    non-contiguous activation (a batch-first RNN's output, a channels-last conv map) would be
    copied by the flatten before the stack copies it again, and a sketch of each layer alone
    costs a copy and four ops a layer each way, where the stack's is two ops forward and one back."""

    a: Tensor
    seed: int | None = None
    width: int | None = None  # the sketch's

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.a.shape[0], self.width if self.seed is not None else math.prod(self.a.shape[1:])))

    @property
    def dtype(self) -> torch.dtype:
        return self.a.dtype

    @property
    def device(self) -> torch.device:
        return self.a.device

    def dim(self) -> int:
        return 2


def _tensor(t: Tensor | _Flat) -> Tensor:
    if not isinstance(t, _Flat):
        return t
    flat = t.a.reshape(t.a.shape[0], -1)
    return flat if t.seed is None else sketch(flat, t.width, t.seed)


def _fused(measure, t: Tensor, g: list) -> bool:
    """Whether the pair goes through the one-node linear CKA: the biased linear CKA itself (not a
    subclass, which may change it), every guide position a Prepared input, the Gram form."""
    if type(measure) is not LinearCKA or not all(isinstance(p, Prepared) for p in g):
        return False
    n, d = t.shape[0], t.shape[-1]
    return all(p.x is None or use_gram_form(n, d, p.d) for p in g)


def _stack_similarities(xs: list[Tensor], units: Tensor, weights: tuple, total: float,
                        layers: bool = False, signs: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(Σ weight · (1 − similarity), similarities)`` of the target layers ``xs`` (each (n, d), or
    (positions, n, d); with ``layers``, (n, ...) activations of one shape; with ``signs``, each
    layer CountSketched first) against the guides' unit Grams ``units: (m, n, n)``, one per (n, d)
    row of the stack, with the rows' ``weights`` (w, −w as (m, 1, 1)) and ``total`` = Σ weight."""
    return linear_cka_loss(xs, units, *weights, total, layers, signs)


def _targets_of_stack(xs: list) -> tuple[list[Tensor], bool, Tensor | None]:
    """The target layers of a stack as tensors; whether they are activations ``(n, ...)`` of one
    shape, which the stack flattens in its one copy (flattening a non-contiguous one first would
    copy it twice; the stack inside the node also keeps its backward to one ``unbind``); and the
    signs of the sketch the stack applies to them, where they are :class:`_Flat` layers to be
    sketched, all of one width (None: no sketch, or each layer already sketched alone)."""
    if not all(isinstance(x, _Flat) for x in xs):
        return [_tensor(x) for x in xs], False, None
    one_shape = len(xs) > 1 and len({x.a.shape for x in xs}) == 1
    if xs[0].seed is None:
        return ([x.a for x in xs], True, None) if one_shape else ([_tensor(x) for x in xs], False, None)
    widths = {math.prod(x.a.shape[1:]) for x in xs}
    if len(widths) > 1:
        return [_tensor(x) for x in xs], False, None
    signs = stacked_signs(tuple(x.seed for x in xs), widths.pop(), xs[0].width, xs[0].dtype, xs[0].device)
    if one_shape:
        return [x.a for x in xs], True, signs
    return [x.a.reshape(x.a.shape[0], -1) for x in xs], False, signs


def _stacked(units: list[Tensor]) -> Tensor:
    """``torch.stack(units)``, or, where the units are already consecutive (n, n) blocks of one
    tensor (guide layers prepared as one stack), a view of it: no copy."""
    first = units[0]
    if len(units) == 1:
        return first[None]
    n, offset, ptr = first.shape[-1], first.storage_offset(), first.untyped_storage().data_ptr()
    if all(u.shape == first.shape and u.is_contiguous() and u.untyped_storage().data_ptr() == ptr
           and u.storage_offset() == offset + i * n * n for i, u in enumerate(units)):
        return first.as_strided((len(units), n, n), (n * n, n, 1))
    return torch.stack(units)


_COMPILED: dict[str, Callable] = {}  # device type → compiled _stack_similarities


def _stack_function(guidance, device: torch.device) -> Callable:
    """:func:`_stack_similarities`, compiled with ``Guidance(compile=True)``: inductor, static
    shapes (each new stack shape compiles once); on CUDA its CUDA-graph mode (untested on a GPU)."""
    if not guidance.compile_similarity:
        return _stack_similarities
    if device.type not in _COMPILED:
        mode = "reduce-overhead" if device.type == "cuda" else None
        _COMPILED[device.type] = torch.compile(_stack_similarities, dynamic=False, mode=mode)
    return _COMPILED[device.type]


def _fused_group(items: list, out: dict, loss: Tensor | None, stack_function: Callable) -> Tensor:
    """One stack of equal-shape target activations against their guides' unit Grams; a
    ``"tokens"`` pair contributes one row per position and its similarity is their mean."""
    x = items[0][1]
    sizes = [1 if x.dim() == 2 else x.shape[0] for _, x, _ in items]
    per_row = tuple(pair.weight / size for (pair, _, _), size in zip(items, sizes) for _ in range(size))
    total = sum(pair.weight for pair, _, _ in items)
    with torch.autocast(device_type=x.device.type, enabled=False):
        xs, layers, signs = _targets_of_stack([x for _, x, _ in items])
        units = _stacked([u for _, _, us in items for u in us])
        term, sims = stack_function(xs, units, _row_weights(per_row, x.dtype, x.device), total, layers, signs)
    if sims.device.type == "cuda" and stack_function is not _stack_similarities:
        term, sims = term.clone(), sims.clone()  # a CUDA graph's outputs are overwritten by its next replay
    rows = sims.unbind() if max(sizes) == 1 else [part.mean() for part in sims.split(sizes)]
    for (pair, _, _), s in zip(items, rows):
        out[pair.key] = s
    return term if loss is None else loss + term


@functools.lru_cache(maxsize=64)
def _row_weights(per_row: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """The weights of a stack's rows, ``(w: (m,), −w: (m, 1, 1))``, made once (not a host-to-device
    copy a step); never inference tensors, which a later training step could not save for its
    backward."""
    with torch.inference_mode(False):
        w = torch.tensor(per_row, dtype=dtype, device=device)
        return w, (-w).view(-1, 1, 1)


def _compare(measure, t: Tensor, key: tuple[str, int], guide: Any, prepared: dict) -> Tensor:
    if key not in prepared:
        prepared[key] = measure.prepare_target(t, guide)
    return measure.compare(prepared[key], guide)
