"""The paper's synthetic sequence tasks, copy-paste and parity, generated once from fixed seeds.

The official code re-sampled these on every access without seeding its workers, so its test set
changed every epoch and run (paper §4.2 L10), and it used 0 both as a blank and as a real symbol
(L7). Here every split is a fixed tensor: train is drawn with ``seed``, val and test with
``eval_seed``, each from its own derived stream, so runs with different ``seed`` are scored on the
same examples. Special tokens never collide with real symbols. ``resample=True`` is the official
behaviour for the training split only, made reproducible: a fresh sample every epoch, drawn from
(``seed``, epoch) (:class:`~repguide.data._common.ResampledExamples`); val and test stay fixed.
"""

from __future__ import annotations

from repguide.errors import DataError
import torch
from torch import Tensor

from repguide.data._common import ResampledExamples, Splits, TensorExamples, generator, register

__all__ = ["IGNORE_INDEX", "PARITY_PAD", "copy_paste", "copy_paste_positions", "copy_paste_tokens", "parity", "token_accuracy"]

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index
PARITY_PAD = 2  # the paper's pad token; bits are 0 and 1


def copy_paste_tokens(num_symbols: int = 10) -> dict[str, int]:
    """Ids of the special tokens of copy-paste: real symbols are ``0..num_symbols-1``, these follow."""
    return {"pad": num_symbols, "blank": num_symbols + 1, "copy": num_symbols + 2, "eos": num_symbols + 3}


def _copy_paste_examples(
    n: int, num_symbols: int, min_len: int, max_len: int, g: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """``n`` examples as inputs and targets, both ``(n, 2 * max_len + 2)`` int64, and their lengths ``(n,)``."""
    tok = copy_paste_tokens(num_symbols)
    lengths = torch.randint(min_len, max_len + 1, (n, 1), generator=g)
    symbols = torch.randint(num_symbols, (n, max_len), generator=g)
    pos = torch.arange(2 * max_len + 2)
    # Where position `pos` reads the sequence: itself before [COPY], pos - (L + 1) after it.
    src = torch.gather(symbols, 1, torch.clamp(pos - (pos >= lengths) * (lengths + 1), 0, max_len - 1))
    is_seq, is_copy, is_eos = pos < lengths, pos == lengths, pos == 2 * lengths + 1
    blank = (pos > lengths) & (pos <= 2 * lengths)

    x = torch.full_like(src, tok["pad"])
    x = torch.where(is_seq, src, x)
    x = torch.where(is_copy, tok["copy"], x)
    x = torch.where(blank, tok["blank"], x)
    x = torch.where(is_eos, tok["eos"], x)
    y = torch.full_like(src, IGNORE_INDEX)
    y = torch.where(blank, src, y)
    y = torch.where(is_eos, tok["eos"], y)
    return x, y, lengths[:, 0]


def copy_paste_positions(x: Tensor, y: Tensor, num_symbols: int = 10, **_: object) -> dict[str, Tensor]:
    """Copy-paste's position groups for pair diagnostics, each ``(n, T)`` bool: ``"source"``, the
    sequence read; ``"copy"``, where it is written back (and its EOS), the positions that need memory."""
    return {"source": x < num_symbols, "copy": y != IGNORE_INDEX}


@register("copy_paste")
def copy_paste(
    *,
    num_symbols: int = 10,
    min_len: int = 20,
    max_len: int = 40,
    train_size: int = 80_000,
    val_size: int = 20_000,
    test_size: int = 20_000,
    seed: int = 0,
    eval_seed: int = 0,
    with_index: bool = False,
    resample: bool = False,
) -> Splits:
    """Copy-paste: read a sequence, then write it back. Items are ``(x: (T,), y: (T,))`` int64, T = 2·max_len + 2.

    For a sequence s of length L ~ U{min_len..max_len} over ``num_symbols`` symbols:
    ``x = s, [COPY], L × [BLANK], [EOS], PAD…`` and ``y = (L + 1) × ignore, s, [EOS], ignore…``
    (ignore = -100). The model predicts ``y[t]`` at position t (no shift); the loss is
    ``F.cross_entropy(logits.transpose(1, 2), y)`` and the metric :func:`token_accuracy`, both over the
    L + 1 non-ignored positions (the copy and its EOS). Defaults are the paper's (100k examples,
    80/20 train/val plus a test set the size of val). Each split's ``lengths`` holds every example's L.
    ``resample=True``: the training split draws ``train_size`` new examples every epoch
    (``splits.train.set_epoch(e)``; epoch 0 is the fixed split of ``resample=False``), as the
    official code re-sampled on every access.
    """
    if not 1 <= min_len <= max_len:
        raise DataError(f"need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
    if num_symbols < 2:
        raise DataError(f"num_symbols must be at least 2, got {num_symbols}")
    tok = copy_paste_tokens(num_symbols)

    def split(size: int, split_seed: int, name: str, fresh: bool = False) -> TensorExamples:
        def draw(g: torch.Generator) -> tuple[tuple[Tensor, Tensor], Tensor]:
            x, y, lengths = _copy_paste_examples(size, num_symbols, min_len, max_len, g)
            return (x, y), lengths

        if fresh:
            return ResampledExamples(draw, split_seed, "copy_paste", name, with_index=with_index)
        tensors, lengths = draw(generator(split_seed, "copy_paste", name))
        return TensorExamples(*tensors, with_index=with_index, lengths=lengths)

    vocab = num_symbols + len(tok)
    return Splits(
        train=split(train_size, seed, "train", resample),
        val=split(val_size, eval_seed, "val"),
        test=split(test_size, eval_seed, "test"),
        num_classes=vocab,
        vocab_size=vocab,
        special=tok,
    )


def token_accuracy(
    logits: Tensor, targets: Tensor, *, ignore_index: int = IGNORE_INDEX, reduction: str = "mean"
) -> Tensor:
    """Fraction (``"mean"``) or number (``"sum"``) of non-ignored targets whose argmax logit is right.

    ``logits: (..., V)``, ``targets: (...)`` int. For a whole test set, sum the ``"sum"`` counts and
    divide by ``(targets != ignore_index).sum()``; a mean of per-batch means weights short copies more.
    """
    if reduction not in ("mean", "sum"):
        raise DataError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    keep = targets != ignore_index
    correct = ((logits.argmax(-1) == targets) & keep).sum()
    return correct if reduction == "sum" else correct / keep.sum()



@register("parity")
def parity(
    *,
    min_len: int = 2,
    max_len: int = 50,
    train_size: int = 80_000,
    val_size: int = 10_000,
    test_size: int = 10_000,
    seed: int = 0,
    eval_seed: int = 0,
    with_index: bool = False,
    resample: bool = False,
) -> Splits:
    """Parity of bit strings. Items are ``(x: (max_len,), length: (), y: ())``, all int64.

    A string of L ~ U{min_len..max_len} random bits is padded with 2 to ``max_len``; its label is the
    number of ones mod 2. Batches unpack as ``x, lengths, y``: call ``model(x, lengths)`` (lengths stay
    on the CPU for ``pack_padded_sequence``) and score 2 logits with ``F.cross_entropy``. Defaults
    are the paper's (lengths 2..50, 100k examples split 80/10/10). Short strings repeat across splits:
    there are only 4 strings of length 2. Each split's ``lengths`` holds every example's L.
    ``resample=True``: the training split draws new strings every epoch, as in :func:`copy_paste`.
    """
    if not 1 <= min_len <= max_len:
        raise DataError(f"need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")

    def split(size: int, split_seed: int, name: str, fresh: bool = False) -> TensorExamples:
        def draw(g: torch.Generator) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor]:
            lengths = torch.randint(min_len, max_len + 1, (size,), generator=g)
            bits = torch.randint(2, (size, max_len), generator=g)
            valid = torch.arange(max_len) < lengths[:, None]
            return (torch.where(valid, bits, PARITY_PAD), lengths, (bits * valid).sum(1) % 2), lengths

        if fresh:
            return ResampledExamples(draw, split_seed, "parity", name, with_index=with_index)
        tensors, lengths = draw(generator(split_seed, "parity", name))
        return TensorExamples(*tensors, with_index=with_index, lengths=lengths)

    return Splits(
        train=split(train_size, seed, "train", resample),
        val=split(val_size, eval_seed, "val"),
        test=split(test_size, eval_seed, "test"),
        num_classes=2,
        vocab_size=3,
        special={"pad": PARITY_PAD},
    )
