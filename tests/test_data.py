"""Specifications of repguide.data: shapes, fixed seeds, disjoint splits, offline loading, clear errors."""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import repguide.data as data
from repguide.data.images import DEFAULT_ROOT, ENV_VAR, INSTALL_COMMAND
from repguide.data.text import strip_gutenberg
from repguide.errors import DataError

FMNIST_FILES = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
]
FMNIST_ROOT = Path(os.environ.get(ENV_VAR) or DEFAULT_ROOT)
HAVE_FMNIST = all((FMNIST_ROOT / f).is_file() for f in FMNIST_FILES)


def needs_fmnist(test):
    skip = pytest.mark.skipif(
        not HAVE_FMNIST, reason=f"Fashion-MNIST not installed in {FMNIST_ROOT} (as root: {INSTALL_COMMAND})"
    )
    return pytest.mark.fmnist(skip(test))


def everything(ds):
    """All examples of a dataset as batched tensors."""
    return ds.batch(torch.arange(len(ds)))


# ---------------------------------------------------------------- registry


def test_registry_lists_the_paper_tasks():
    assert data.list_datasets() == ["copy_paste", "fashion_mnist", "parity", "shakespeare_char", "shakespeare_word"]


def test_unknown_name_raises_value_error_listing_names():
    with pytest.raises(ValueError, match="copy_paste.*parity"):
        data.create("imagenet")


@pytest.mark.parametrize("name", data.list_datasets())
def test_every_registered_dataset_yields_inputs_then_target(name):
    if name == "fashion_mnist" and not HAVE_FMNIST:
        pytest.skip("Fashion-MNIST not installed")
    splits = data.create(name)
    assert isinstance(splits, data.Splits)
    for ds in (splits.train, splits.val, splits.test):
        item = ds[0]
        assert len(ds) > 0 and all(isinstance(t, torch.Tensor) for t in item)
        assert item[-1].dtype == torch.int64
    assert splits.num_classes >= 2


def test_loading_never_touches_the_network():
    script = textwrap.dedent(
        f"""
        import socket
        def refuse(*args, **kwargs):
            raise AssertionError("network access attempted")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse
        import repguide.data as data
        for name in data.list_datasets():
            if name != "fashion_mnist" or {HAVE_FMNIST}:
                data.create(name)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_with_index_appends_each_items_position():
    splits = data.parity(train_size=100, val_size=10, test_size=10, with_index=True)
    x, lengths, y, idx = next(iter(DataLoader(splits.train, batch_size=16, shuffle=True)))
    plain = data.parity(train_size=100, val_size=10, test_size=10).train
    expected = plain.batch(idx)
    assert torch.equal(x, expected[0]) and torch.equal(lengths, expected[1]) and torch.equal(y, expected[2])


# ---------------------------------------------------------------- Fashion-MNIST


@pytest.fixture(scope="module")
def fmnist():
    return data.fashion_mnist()


@needs_fmnist
def test_fashion_mnist_has_55k_5k_10k_float_images_and_int64_labels(fmnist):
    assert (len(fmnist.train), len(fmnist.val), len(fmnist.test)) == (55_000, 5_000, 10_000)
    x, y = fmnist.train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and 0 <= int(y) < 10
    assert fmnist.input_shape == (1, 28, 28) and fmnist.num_classes == 10


@needs_fmnist
def test_fashion_mnist_val_is_held_out_of_train(fmnist):
    train, val = set(fmnist.train.source_index.tolist()), set(fmnist.val.source_index.tolist())
    assert not train & val
    assert train | val == set(range(60_000))


@needs_fmnist
def test_fashion_mnist_subset_is_class_balanced():
    labels = everything(data.fashion_mnist(train_size=5005).train)[1]
    assert torch.bincount(labels, minlength=10).tolist() == [501] * 5 + [500] * 5


@needs_fmnist
def test_fashion_mnist_seed_changes_train_only():
    a, b, c = (data.fashion_mnist(train_size=1000, seed=s) for s in (0, 0, 1))
    assert torch.equal(a.train.source_index, b.train.source_index)
    assert torch.equal(everything(a.train)[0], everything(b.train)[0])
    assert not torch.equal(a.train.source_index, c.train.source_index)
    assert torch.equal(a.val.source_index, c.val.source_index)
    assert torch.equal(everything(a.test)[0], everything(c.test)[0])
    assert not set(c.train.source_index.tolist()) & set(c.val.source_index.tolist())


@needs_fmnist
def test_fashion_mnist_normalisation_uses_training_pool_statistics(fmnist):
    x = everything(fmnist.train)[0]
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-3
    x40 = everything(data.fashion_mnist(train_size=5000, canvas=40).train)[0]
    assert abs(x40.mean().item()) < 0.02 and abs(x40.std().item() - 1) < 0.02
    raw = everything(data.fashion_mnist(train_size=2000, normalize="none").train)[0]
    assert raw.min() == 0 and raw.max() == 1


@needs_fmnist
def test_canvas_places_each_image_whole_at_a_fixed_position():
    plain = data.fashion_mnist(train_size=500, normalize="none")
    moved = data.fashion_mnist(train_size=500, normalize="none", canvas=40)
    x, x40 = everything(plain.train)[0], everything(moved.train)[0]
    assert x40.shape == (500, 1, 40, 40) and moved.input_shape == (1, 40, 40)
    offsets = moved.train.offsets
    assert len({tuple(o) for o in offsets.tolist()}) > 100
    for i in range(0, 500, 50):
        r, c = offsets[i].tolist()
        assert torch.equal(x40[i, :, r : r + 28, c : c + 28], x[i])
        outside = x40[i].clone()
        outside[:, r : r + 28, c : c + 28] = 0
        assert not outside.any()
    other_seed = data.fashion_mnist(normalize="none", canvas=40, seed=7)
    assert torch.equal(everything(moved.test)[0], everything(other_seed.test)[0])


@needs_fmnist
@pytest.mark.parametrize("augment", ["flip", "translate"])
def test_augmentation_is_train_only_deterministic_and_redrawn_each_epoch(augment):
    plain = data.fashion_mnist(train_size=1000, normalize="none")
    aug = data.fashion_mnist(train_size=1000, normalize="none", augment=augment)
    again = data.fashion_mnist(train_size=1000, normalize="none", augment=augment)
    x, x_aug = everything(plain.train)[0], everything(aug.train)[0]
    changed = (x != x_aug).flatten(1).any(1).float().mean()
    assert 0.3 < changed < 1.0
    assert torch.equal(x_aug, everything(again.train)[0])
    assert torch.equal(everything(plain.test)[0], everything(aug.test)[0])
    assert (x_aug.flatten(1).sum(1) <= x.flatten(1).sum(1) + 1e-3).all()  # shifts crop, never add
    aug.train.set_epoch(1)
    assert not torch.equal(x_aug, everything(aug.train)[0])
    aug.train.set_epoch(0)
    assert torch.equal(x_aug, everything(aug.train)[0])


@needs_fmnist
def test_dataloader_batches_equal_items_and_repeat_under_the_same_generator():
    ds = data.fashion_mnist(train_size=600, augment="translate").train

    def batches():
        loader = DataLoader(ds, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(3))
        return [b for b in loader]

    first = batches()
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, batches()))
    xs, ys = zip(*(ds[i] for i in range(5)))
    xb, yb = next(iter(DataLoader(ds, batch_size=5)))
    assert torch.equal(xb, torch.stack(xs)) and torch.equal(yb, torch.stack(ys))


def test_missing_fashion_mnist_raises_with_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    with pytest.raises(data.DatasetNotFoundError) as err:
        data.fashion_mnist()
    assert isinstance(err.value, FileNotFoundError)
    assert INSTALL_COMMAND in str(err.value) and ENV_VAR in str(err.value)
    assert "train-images-idx3-ubyte.gz" in str(err.value)


def test_wrong_content_fails_the_checksum_naming_the_file(tmp_path, monkeypatch):
    for name in FMNIST_FILES:
        (tmp_path / name).write_bytes(gzip.compress(b"\x00\x00\x08\x01" + bytes(8)))
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    with pytest.raises(data.DatasetIntegrityError, match="train-images-idx3-ubyte.gz.*MD5"):
        data.fashion_mnist()


def test_a_file_that_is_not_gzip_is_reported_by_name(tmp_path):
    for name in FMNIST_FILES:
        (tmp_path / name).write_bytes(b"this is not a gzip file")
    with pytest.raises(data.DatasetIntegrityError, match="train-images-idx3-ubyte.gz"):
        data.fashion_mnist(root=tmp_path)


@needs_fmnist
def test_one_corrupt_file_among_good_ones_is_named(tmp_path):
    for name in FMNIST_FILES[:3]:
        (tmp_path / name).symlink_to(FMNIST_ROOT / name)
    good = gzip.decompress((FMNIST_ROOT / FMNIST_FILES[3]).read_bytes())
    (tmp_path / FMNIST_FILES[3]).write_bytes(gzip.compress(good[:-1] + bytes([(good[-1] + 1) % 10])))
    with pytest.raises(data.DatasetIntegrityError, match="t10k-labels-idx1-ubyte.gz"):
        data.fashion_mnist(root=tmp_path)


# ---------------------------------------------------------------- copy-paste


def small_copy(**kwargs):
    return data.copy_paste(**{"train_size": 500, "val_size": 200, "test_size": 200, **kwargs})


def test_copy_paste_special_tokens_are_distinct_and_not_symbols():
    splits = small_copy(num_symbols=7)
    tok = splits.special
    assert sorted(tok) == ["blank", "copy", "eos", "pad"]
    assert len(set(tok.values())) == 4 and min(tok.values()) >= 7 and max(tok.values()) < splits.vocab_size
    assert splits.vocab_size == 11 == splits.num_classes
    x, y = everything(splits.train)
    assert set(x.unique().tolist()) == set(range(11))
    assert (y[y != data.IGNORE_INDEX] < 7).sum() > 0 and (y == 0).any()  # symbol 0 is a real target


def test_copy_paste_example_layout():
    splits = small_copy(min_len=3, max_len=9)
    tok = splits.special
    x, y = everything(splits.train)
    assert x.shape == y.shape == (500, 20) and x.dtype == y.dtype == torch.int64
    for xi, yi in zip(x, y):
        n = int((xi < tok["pad"]).sum())
        assert xi[n] == tok["copy"] and (xi[n + 1 : 2 * n + 1] == tok["blank"]).all()
        assert xi[2 * n + 1] == tok["eos"] and (xi[2 * n + 2 :] == tok["pad"]).all()
        assert (yi[: n + 1] == data.IGNORE_INDEX).all() and torch.equal(yi[n + 1 : 2 * n + 1], xi[:n])
        assert yi[2 * n + 1] == tok["eos"] and (yi[2 * n + 2 :] == data.IGNORE_INDEX).all()


def test_copy_paste_lengths_span_the_range_and_fix_when_equal():
    lengths = (everything(small_copy().train)[1] != data.IGNORE_INDEX).sum(1) - 1
    assert lengths.min() == 20 and lengths.max() == 40
    x, _ = everything(small_copy(min_len=20, max_len=20).train)
    assert x.shape[1] == 42 and not (x == 10).any()


def test_copy_paste_seeds_fix_every_split():
    a, b, c = small_copy(seed=0), small_copy(seed=0), small_copy(seed=1)
    for split in ("train", "val", "test"):
        assert torch.equal(everything(getattr(a, split))[0], everything(getattr(b, split))[0])
    assert not torch.equal(everything(a.train)[0], everything(c.train)[0])
    assert torch.equal(everything(a.test)[0], everything(c.test)[0])
    assert not torch.equal(everything(a.val)[0][:200], everything(a.test)[0])


def test_copy_paste_test_set_is_disjoint_from_train():
    splits = small_copy()
    train = {tuple(r) for r in everything(splits.train)[0].tolist()}
    assert not train & {tuple(r) for r in everything(splits.test)[0].tolist()}


def test_token_accuracy_counts_only_non_ignored_positions():
    targets = torch.tensor([[-100, 3, 0, -100], [-100, -100, 1, 2]])
    logits = F.one_hot(torch.tensor([[0, 3, 1, 0], [1, 1, 1, 1]]), 4).float()
    assert data.token_accuracy(logits, targets).item() == pytest.approx(2 / 4)
    assert data.token_accuracy(logits, targets, reduction="sum").item() == 2
    perfect = F.one_hot(targets.clamp(min=0), 4).float()
    assert data.token_accuracy(perfect, targets).item() == 1.0


# ---------------------------------------------------------------- parity


def test_parity_items_are_padded_bits_length_and_label():
    splits = data.parity(train_size=2000, val_size=100, test_size=100)
    x, lengths, y = everything(splits.train)
    assert x.shape == (2000, 50) and lengths.shape == y.shape == (2000,)
    assert x.dtype == lengths.dtype == y.dtype == torch.int64
    assert torch.equal(lengths, (x != data.PARITY_PAD).sum(1)) and torch.equal(splits.train.lengths, lengths)
    assert ((x == data.PARITY_PAD) == (torch.arange(50) >= lengths[:, None])).all()
    assert torch.equal(y, (x * (x != data.PARITY_PAD)).sum(1) % 2)
    assert lengths.min() == 2 and lengths.max() == 50
    assert splits.vocab_size == 3 and splits.num_classes == 2 and splits.special == {"pad": 2}


def test_parity_labels_are_balanced():
    y = everything(data.parity(train_size=20_000, val_size=10, test_size=10).train)[2]
    assert abs(y.float().mean().item() - 0.5) < 0.02


def test_parity_batches_feed_a_packed_rnn():
    x, lengths, y = next(iter(DataLoader(data.parity(train_size=64).train, batch_size=64)))
    packed = torch.nn.utils.rnn.pack_padded_sequence(
        F.one_hot(x, 3).float(), lengths, batch_first=True, enforce_sorted=False
    )
    _, h = torch.nn.RNN(3, 8, batch_first=True)(packed)
    assert h.shape == (1, 64, 8)


def test_parity_seeds_fix_every_split():
    a, b, c = (data.parity(train_size=500, seed=s) for s in (0, 0, 1))
    assert torch.equal(everything(a.train)[0], everything(b.train)[0])
    assert not torch.equal(everything(a.train)[0], everything(c.train)[0])
    assert torch.equal(everything(a.test)[0], everything(c.test)[0])
    assert torch.equal(everything(a.val)[0], everything(b.val)[0])


# ---------------------------------------------------------------- resampling (copy-paste, parity)


def _digest(splits) -> str:
    h = hashlib.sha256()
    for name in ("train", "val", "test"):
        for t in everything(getattr(splits, name)):
            h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


SYNTHETIC = {
    "copy_paste": (dict(min_len=3, max_len=9, train_size=300, val_size=50, test_size=50, seed=4, eval_seed=2), "df5d320b4477926e"),
    "parity": (dict(max_len=12, train_size=300, val_size=50, test_size=50, seed=4, eval_seed=2), "681f4938377d3897"),
}


@pytest.mark.parametrize("name", SYNTHETIC)
def test_without_resampling_the_synthetic_splits_are_the_fixed_ones_they_always_were(name):
    kwargs, digest = SYNTHETIC[name]
    # The digest was taken of the splits before `resample` existed; epoch 0 of a resampled train split is the same set.
    assert _digest(data.create(name, **kwargs)) == digest
    assert _digest(data.create(name, **kwargs, resample=False)) == digest
    assert _digest(data.create(name, **kwargs, resample=True)) == digest
    assert not hasattr(data.create(name, **kwargs).train, "set_epoch")


@pytest.mark.parametrize("name", SYNTHETIC)
def test_resampling_draws_new_training_examples_each_epoch_from_seed_and_epoch(name):
    kwargs, _ = SYNTHETIC[name]
    fixed, a, b = data.create(name, **kwargs), data.create(name, **kwargs, resample=True), data.create(name, **kwargs, resample=True)
    epoch0 = everything(a.train)
    a.train.set_epoch(1)
    epoch1 = everything(a.train)
    assert len(a.train) == len(fixed.train) and all(t.shape == u.shape for t, u in zip(epoch0, epoch1))
    assert (epoch0[0] != epoch1[0]).any(1).float().mean() > 0.5  # most examples are new
    a.train.set_epoch(2)
    assert not torch.equal(everything(a.train)[0], epoch1[0])
    b.train.set_epoch(2)
    assert all(torch.equal(t, u) for t, u in zip(everything(a.train), everything(b.train)))  # same seed + epoch
    a.train.set_epoch(1)
    assert all(torch.equal(t, u) for t, u in zip(everything(a.train), epoch1))
    a.train.set_epoch(0)
    assert all(torch.equal(t, u) for t, u in zip(everything(a.train), everything(fixed.train)))
    other_seed = data.create(name, **{**kwargs, "seed": 5}, resample=True)
    other_seed.train.set_epoch(1)
    assert not torch.equal(everything(other_seed.train)[0], epoch1[0])
    for split in ("val", "test"):  # fixed, whatever the epoch of train
        assert all(torch.equal(t, u) for t, u in zip(everything(getattr(a, split)), everything(getattr(fixed, split))))
        assert not hasattr(getattr(a, split), "set_epoch")


def test_resampled_examples_keep_the_task_s_layout_and_labels():
    splits = data.parity(max_len=12, train_size=500, resample=True, with_index=True)
    splits.train.set_epoch(3)
    x, lengths, y = everything(splits.train)
    assert torch.equal(lengths, (x != data.PARITY_PAD).sum(1)) and torch.equal(splits.train.lengths, lengths)
    assert torch.equal(y, (x * (x != data.PARITY_PAD)).sum(1) % 2)
    assert splits.train[7][-1] == 7  # with_index still appends positions
    copy = small_copy(min_len=3, max_len=9, resample=True)
    copy.train.set_epoch(1)
    x, y = everything(copy.train)
    n = (x < copy.special["pad"]).sum(1)
    assert (x[torch.arange(len(x)), n] == copy.special["copy"]).all()
    assert ((y != data.IGNORE_INDEX).sum(1) == n + 1).all()
    assert torch.equal(copy.train.lengths, n)  # a resampled epoch carries its own lengths


def test_the_synthetic_tasks_declare_each_examples_length():
    parity = data.parity(train_size=300, val_size=50, test_size=50)
    copy = small_copy(min_len=3, max_len=9)
    for split in ("train", "val", "test"):
        x, lengths, _ = everything(getattr(parity, split))
        assert torch.equal(getattr(parity, split).lengths, lengths)
        x, y = everything(getattr(copy, split))  # L: the copy token's position, L + 1 scored targets
        assert torch.equal(getattr(copy, split).lengths, (x == copy.special["copy"]).int().argmax(1))
        assert torch.equal(getattr(copy, split).lengths + 1, (y != data.IGNORE_INDEX).sum(1))
    assert data.TensorExamples(torch.zeros(4, 2), torch.zeros(4)).lengths is None  # no length by default
    with pytest.raises(DataError, match="one per example"):
        data.TensorExamples(torch.zeros(4, 2), torch.zeros(4), lengths=torch.zeros(3, dtype=torch.long))


# ---------------------------------------------------------------- Shakespeare


def test_corpus_is_the_plays_without_gutenberg_boilerplate():
    corpus = data.shakespeare_text()
    assert "To be, or not to be" in corpus
    for boilerplate in ("Project Gutenberg", "PROJECT GUTENBERG", "*** START OF", "*** END OF", "SMALL PRINT"):
        assert boilerplate not in corpus


def test_corpus_uses_the_modern_edition_only():
    corpus = data.shakespeare_text()
    assert "Anthonie" not in corpus and "Antony" in corpus  # the First Folio spells it Anthonie
    assert 5.0e6 < len(corpus) < 5.1e6


def test_strip_gutenberg_keeps_only_the_text_between_markers():
    raw = (
        "The Project Gutenberg EBook of Hamlet\nlicense blah\n"
        "*** START OF THE PROJECT GUTENBERG EBOOK HAMLET ***\n\nWho's there?\n\n"
        "*** END OF THE PROJECT GUTENBERG EBOOK HAMLET ***\nmore license\n"
    )
    assert strip_gutenberg(raw) == "Who's there?\n"


def test_text_splits_partition_the_corpus_in_order_at_line_starts():
    parts = [data.shakespeare_text(s) for s in ("train", "val", "test")]
    corpus = data.shakespeare_text()
    assert "".join(parts) == corpus
    assert [round(len(p) / len(corpus), 2) for p in parts] == [0.90, 0.05, 0.05]
    assert parts[0].endswith("\n") and parts[1].endswith("\n")


@pytest.fixture(scope="module", params=["char", "word"])
def lm(request):
    return data.shakespeare(tokenizer=request.param, context=64)


def test_lm_chunks_are_contiguous_and_shifted_by_one(lm):
    x, y = everything(lm.val)
    assert x.shape == y.shape and x.shape[1] == 64 and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x[1:, 0], y[:-1, -1])
    assert x.max() < lm.vocab_size == lm.num_classes == len(lm.tokenizer)


def test_lm_vocabulary_starts_with_unk_and_is_capped(lm):
    assert lm.tokenizer.vocab[0] == "<unk>" and lm.special == {"unk": 0}
    assert len(lm.tokenizer) <= 10_001


def test_char_tokenizer_round_trips_train_text():
    tok = data.shakespeare(tokenizer="char").tokenizer
    text = data.shakespeare_text("train")[:5000]
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("\u2603").tolist() == [0]


def test_word_tokenizer_lowercases_and_splits_punctuation():
    tok = data.shakespeare(tokenizer="word", max_vocab=500).tokenizer
    assert len(tok) == 501
    assert tok.decode(tok.encode("To be, or not to be")) == "to be , or not to be"
    assert tok.encode("zzyzx").tolist() == [0]


def test_lm_units_count_the_text_the_targets_cover():
    text = "a b c d e\n"
    ds = data.TokenChunks(text, data.WordTokenizer.fit(text), context=2)
    assert len(ds) == 2 and ds.units == {"token": 4, "char": 8, "word": 4}  # " b c d e"
    char = data.TokenChunks(text, data.CharTokenizer.fit(text), context=3)
    assert char.units == {"token": 9, "char": 9, "word": 4}  # " b c d e\n"


def test_perplexity_converts_token_nll_to_the_requested_unit(lm):
    units = lm.test.units
    assert data.perplexity(1.5, lm.test) == pytest.approx(math.exp(1.5))
    assert data.perplexity(1.5, lm.test, unit="char") == pytest.approx(
        math.exp(1.5 * units["token"] / units["char"])
    )
    assert data.perplexity(1.5, lm.test, unit="word") > data.perplexity(1.5, lm.test, unit="char")
    with pytest.raises(ValueError, match="unit"):
        data.perplexity(1.5, lm.test, unit="byte")
