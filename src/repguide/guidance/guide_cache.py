"""The guide-feature cache: a frozen guide's features of every training example, kept so that later
epochs skip the guide's forward."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from repguide.errors import GuidanceError
import numpy as np
import torch
from torch import Tensor

__all__ = ["GuideFeatureCache"]


class GuideFeatureCache:
    """The guide's features of every training example, as they are compared (reduced and, with
    ``sketch_dim``, sketched), so that a guided step reads them instead of running the guide.

    Correct only when an example reaches the guide as the same input every time it is drawn (no
    random augmentation; ``guide_input="same"``): the guide is frozen and in eval mode, so its
    features are then a fixed function of the example. The cache fills itself: a batch with an
    example not cached yet runs the guide and stores the whole batch, so the first epoch costs
    what it did and the later ones skip the guide. ::

        train_set = repguide.data.create("fashion_mnist", with_index=True).train
        cache = GuideFeatureCache(len(train_set))
        guidance = Guidance(target, guide, sketch_dim=1024, guide_cache=cache)
        for x, y, index in loader:
            out = guidance(x, guide_index=index)

    Memory: ``num_examples × Σ_layers width`` numbers, width = min(layer width, sketch_dim) under
    ``reduction="flatten"``; ``dtype=torch.bfloat16`` halves it and rounds the stored features
    to ~3 significant digits. Features are stored on the device they were computed on unless
    ``device`` says otherwise (e.g. ``"cpu"`` to keep a GPU's memory free).
    """

    def __init__(self, num_examples: int, dtype: torch.dtype | None = None, device: Any = None):
        if num_examples < 1:
            raise GuidanceError(f"num_examples must be at least 1, got {num_examples}")
        self.num_examples = num_examples
        self.dtype = dtype
        self.device = device
        self.features: dict[str, Tensor] = {}  # guide layer → (num_examples, ...) features
        # (num_examples,) bool on the host, whichever device the features are on: which examples
        # are stored. Read through NumPy, so a lookup dispatches no tensor op and, with the CPU
        # indices a DataLoader gives, waits on no device (an index on an accelerator is copied to
        # the host once per lookup until the cache is complete, and not at all after).
        self.filled: Tensor | None = None
        self.complete = False
        self.spec: tuple | None = None  # the layers and settings the features were made with

    def lookup(self, index: Tensor, spec: tuple) -> dict[str, Tensor] | None:
        """Features of the examples at ``index: (n,)``, or None while any of them is missing."""
        self._check_spec(spec)
        if self.filled is None:
            return None
        if not (self.complete or self.filled.numpy()[_host_positions(index)].all()):
            return None
        index = torch.as_tensor(index, dtype=torch.long)
        return {name: stored[index.to(stored.device)] for name, stored in self.features.items()}

    def store(self, index: Tensor, features: Mapping[str, Tensor], spec: tuple) -> None:
        """Keep ``features`` (``layer → (n, ...)``) as those of the examples at ``index: (n,)``."""
        self._check_spec(spec)
        index = torch.as_tensor(index, dtype=torch.long)
        if index.dim() != 1 or any(len(value) != len(index) for value in features.values()):
            raise GuidanceError(
                f"guide_index must hold one example position per row of the batch; got shape "
                f"{tuple(index.shape)} for {len(next(iter(features.values())))} rows"
            )
        if len(index) and not 0 <= int(index.min()) <= int(index.max()) < self.num_examples:
            raise GuidanceError(
                f"guide_index must lie in [0, {self.num_examples}); got {int(index.min())}..{int(index.max())}"
            )
        self.spec = spec
        for name, value in features.items():
            stored = self.features.get(name)
            if stored is None:
                stored = self.features[name] = value.new_zeros(
                    (self.num_examples, *value.shape[1:]), dtype=self.dtype or value.dtype,
                    device=value.device if self.device is None else self.device,
                )
            if stored.shape[1:] != value.shape[1:]:
                raise GuidanceError(
                    f"guide layer {name!r} gave features of shape {tuple(value.shape[1:])} per example, "
                    f"but the cache holds {tuple(stored.shape[1:])}: a cache needs inputs of one shape"
                )
            stored[index.to(stored.device)] = value.to(stored.dtype)
        if self.filled is None:
            self.filled = torch.zeros(self.num_examples, dtype=torch.bool)
        filled = self.filled.numpy()
        filled[_host_positions(index)] = True
        self.complete = bool(filled.all())

    def _check_spec(self, spec: tuple) -> None:
        if self.spec is not None and spec != self.spec:
            raise GuidanceError(
                f"this cache holds guide features made with (layers, reduction, sketch_dim, sketch_seed) "
                f"= {self.spec}, not {spec}; use one cache per Guidance configuration"
            )

    def __repr__(self) -> str:
        filled = int(self.filled.sum()) if self.filled is not None else 0
        return f"GuideFeatureCache({filled}/{self.num_examples} examples, layers={list(self.features)})"


def _host_positions(index: Any) -> np.ndarray:
    """``index`` as a NumPy array of positions: no tensor op for a CPU tensor (a DataLoader's), one
    device-to-host copy for an accelerator's."""
    if isinstance(index, Tensor):
        return index.cpu().numpy().astype(np.int64, copy=False)
    return np.asarray(index, dtype=np.int64)
