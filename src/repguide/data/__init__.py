"""Offline data for the paper's experiments, with fixed splits.

Every factory returns :class:`Splits` (train / val / test datasets plus ``num_classes``,
``input_shape`` or ``vocab_size``). Datasets yield ``(*inputs, target)``: call ``model(*inputs)``;
with ``with_index=True`` each item also ends with its position in its dataset. See docs/data.md.

>>> data = create("parity", train_size=1000)
>>> x, lengths, y = data.train[0]
"""

from repguide.data._common import (
    DATASETS,
    DatasetIntegrityError,
    DatasetNotFoundError,
    ResampledExamples,
    Splits,
    TensorExamples,
    create,
    list_datasets,
)
from repguide.data.images import FashionMNIST, fashion_mnist
from repguide.data.synthetic import (
    IGNORE_INDEX,
    PARITY_PAD,
    copy_paste,
    copy_paste_positions,
    copy_paste_tokens,
    parity,
    token_accuracy,
)
from repguide.data.text import (
    CharTokenizer,
    TokenChunks,
    WordTokenizer,
    perplexity,
    shakespeare,
    shakespeare_text,
)

# Data sets whose positions fall into groups worth telling apart in pair diagnostics.
_POSITION_GROUPS = {"copy_paste": copy_paste_positions}


def position_groups(name: str, x, y, **kwargs) -> dict | None:
    """The position groups (name → ``(n, T)`` bool) of data set ``name`` for a batch ``x``, ``y``
    (``kwargs``: the data set's options), or None where the task has none."""
    groups = _POSITION_GROUPS.get(name)
    return None if groups is None else groups(x, y, **kwargs)


__all__ = [
    "DATASETS",
    "IGNORE_INDEX",
    "PARITY_PAD",
    "CharTokenizer",
    "DatasetIntegrityError",
    "DatasetNotFoundError",
    "FashionMNIST",
    "ResampledExamples",
    "Splits",
    "TensorExamples",
    "TokenChunks",
    "WordTokenizer",
    "copy_paste",
    "copy_paste_positions",
    "copy_paste_tokens",
    "create",
    "fashion_mnist",
    "list_datasets",
    "parity",
    "perplexity",
    "position_groups",
    "shakespeare",
    "shakespeare_text",
    "token_accuracy",
]
