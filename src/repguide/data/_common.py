"""Pieces shared by every data set: the returned bundle, the in-memory dataset, seeds, the registry."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from repguide._registry import Registry
from repguide.errors import DataError, DatasetIntegrityError, DatasetNotFoundError


@dataclass(frozen=True)
class Splits:
    """Train, validation and test sets of one task, with what a model needs to know about them.

    Every dataset yields tuples ``(*inputs, target)`` (call ``model(*inputs)``), or
    ``(*inputs, target, index)`` when built with ``with_index=True``.
    """

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int  # size of the output layer: classes, or the vocabulary for token prediction
    input_shape: tuple[int, ...] | None = None  # (C, H, W) of one image; None for token inputs
    vocab_size: int | None = None  # number of distinct input token ids; None for images
    special: dict[str, int] = field(default_factory=dict)  # ids of special tokens, e.g. {"pad": 2}
    tokenizer: Any = None  # text data sets only: turns text into ids and back


class TensorExamples(Dataset):
    """Examples held as tensors sharing their first axis (n examples); item i is ``(t[i] for t in tensors)``.

    ``__getitems__`` gathers a whole batch with one indexing operation per tensor, so a DataLoader over
    it costs about as much as slicing tensors. With ``with_index=True`` each item ends with its
    position ``i`` in this dataset (a 0-dim int64 tensor), e.g. to look up cached guide features.
    ``lengths``: where examples have a length (a string's, a sequence's), each one's, ``(n,)`` int64;
    evaluation then also reports the metric at each length. None where examples have no length.
    """

    def __init__(self, *tensors: Tensor, with_index: bool = False, lengths: Tensor | None = None) -> None:
        sizes = {len(t) for t in tensors}
        if len(sizes) != 1:
            raise DataError(f"tensors must share their first axis, got lengths {sorted(sizes)}")
        if lengths is not None and lengths.shape != (len(tensors[0]),):
            raise DataError(f"lengths must be ({len(tensors[0])},), one per example, got {tuple(lengths.shape)}")
        self.tensors = tensors
        self.with_index = with_index
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, i: int) -> tuple[Tensor, ...]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[Tensor, ...]]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        batch = self.batch(idx)
        if self.with_index:
            batch = (*batch, idx)
        return list(zip(*(t.unbind(0) for t in batch)))

    def batch(self, idx: Tensor) -> tuple[Tensor, ...]:
        """The examples at positions ``idx: (b,)`` as batched tensors, each ``(b, ...)``."""
        return tuple(t[idx] for t in self.tensors)


class ResampledExamples(TensorExamples):
    """A training split drawn afresh every epoch (the official code's copy-paste and parity data drew a
    new sample on every access): :meth:`set_epoch` replaces the tensors by ``draw(g)``'s, where ``g``
    is ``generator(seed, *keys)`` for epoch 0, the fixed split the data set has without resampling,
    and ``generator(seed, *keys, "epoch", e)`` for epoch e ≥ 1. So epoch e's examples are a function of
    (seed, split, e) alone: the same in a resumed run as in an uninterrupted one, and on every process.
    Position i holds a different example in each epoch, so nothing may be cached by position (the
    guide-feature cache is refused with it). ``draw(g)`` returns the split's tensors and their
    ``lengths`` (None where examples have none).
    """

    def __init__(
        self,
        draw: Callable[[torch.Generator], tuple[tuple[Tensor, ...], Tensor | None]],
        seed: int,
        *keys: str,
        with_index: bool = False,
    ) -> None:
        tensors, lengths = draw(generator(seed, *keys))
        super().__init__(*tensors, with_index=with_index, lengths=lengths)
        self._draw, self._keys = draw, (seed, *keys)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Hold epoch ``epoch``'s examples (drawn again only when it differs from the current one)."""
        if epoch != self.epoch:
            self.tensors, self.lengths = self._draw(generator(*self._keys, *(("epoch", epoch) if epoch else ())))
            self.epoch = epoch


def generator(seed: int, *keys: str | int) -> torch.Generator:
    """A torch Generator seeded from ``seed`` and ``keys`` (e.g. the split's name).

    Mixing through numpy's SeedSequence gives statistically independent streams for different keys,
    which ``seed + 1``-style offsets do not.
    """
    words = [seed] + [zlib.crc32(k.encode()) if isinstance(k, str) else k for k in keys]
    state = np.random.SeedSequence(words).generate_state(1, np.uint64)
    return torch.Generator().manual_seed(int(state[0]))


DATASETS: Registry[Callable[..., Splits]] = Registry("data set", error=DataError)
Factory = TypeVar("Factory", bound=Callable[..., Splits])


def register(name: str, **defaults: Any) -> Callable[[Factory], Factory]:
    """Decorator: make a factory available to :func:`create` as ``name``, with ``defaults`` bound."""
    return DATASETS.register(name, **defaults)


def list_datasets() -> list[str]:
    """Names accepted by :func:`create`, sorted."""
    return DATASETS.list()


def create(name: str, **kwargs: Any) -> Splits:
    """Build the data set registered as ``name``; ``kwargs`` go to its factory."""
    return DATASETS.get(name).build(**kwargs)
