"""The guide's forward as a stream of layers: each paired layer's activation is reduced (and
sketched) the moment its layer fires, so the raw activations never pile up; where the step prepares
the layers (no guide cache, no gathering), it prepares them there too.

Small layers wait for their equals: reduced (n, d) layers are held while they total at most
:data:`HOLD_BYTES` and then prepared together (:meth:`repguide.similarity.Measure.prepare_guides`),
so that Gram-only layers of one shape are one stack, each op once for the stack rather than once
a layer (issue 14; on a GPU a step of small layers is bound by its kernel launches). Large layers,
whose holding would raise the step's peak memory, are prepared one by one, as they come.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

#: Reduced guide layers are held for a stack while they total at most this many bytes. The held
#: layers, their stack and its centred copy are the guide's peak: on benchmark (a) (an FCN guided by a
#: ResNet-18 of width 16 at batch 256, whose layers are 2-16 MiB), on the device path, the step's peak
#: memory rise was 179 MiB at 8 MiB, 216 at 16 and 345 at 64, against 202 with nothing held
#: (benchmarks/README.md, log #53); 16 MiB since layers of different widths are batched too (log
#: #58: (b)'s two guide layers, 12 and 4 MiB, are one group; (a) 199 → 235 MiB, (c) 166 → 149).
HOLD_BYTES = 16 << 20


class GuideStream:
    """What the guide's forward hooks fill: ``acts`` (the capture's, layer name → activation) with
    each layer reduced by ``reduce(name, activation)`` and, if ``prepare`` is given, prepared by
    ``prepare(names, features) → [prepared layer]``; layers are held only where ``holds(features)``
    (where a stack can be made of them)."""

    def __init__(self, acts: dict, reduce: Callable[[str, Tensor], Tensor], prepare: Callable | None,
                 holds: Callable[[Tensor], bool] = lambda features: True):
        self.acts, self.reduce, self.prepare, self.holds = acts, reduce, prepare, holds
        self.done: set[str] = set()
        self.held: list[str] = []
        self.held_bytes = 0

    def on_layer(self) -> None:
        """After a paired layer fired: reduce (and prepare or hold) what it captured."""
        for name in [name for name in self.acts if name not in self.done]:
            self.done.add(name)
            features = self.acts[name] = self.reduce(name, self.acts[name])
            if self.prepare is None:
                continue
            size = features.numel() * features.element_size()
            if features.dim() != 2 or size > HOLD_BYTES or not self.holds(features):
                self.acts[name] = self.prepare([name], [features])[0]
                continue
            if self.held_bytes + size > HOLD_BYTES:
                self.flush()
            self.held.append(name)
            self.held_bytes += size

    def flush(self) -> None:
        """Prepare the held layers (at the end of the guide's forward, or to make room)."""
        if self.held:
            prepared = self.prepare(self.held, [self.acts[name] for name in self.held])
            self.acts.update(zip(self.held, prepared))
        self.held, self.held_bytes = [], 0
