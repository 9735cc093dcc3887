"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist``, read offline and checksummed.

Variants for the paper's image experiments at CPU scale: small class-balanced training subsets (where
the failure modes show), light augmentation, and "translated" Fashion-MNIST (each image placed at a
fixed random position on a larger blank canvas), which makes FCN and CNN inductive biases differ.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import zlib
from pathlib import Path

import numpy as np
from repguide.errors import DataError
import torch
import torch.nn.functional as F
from torch import Tensor

from repguide.data._common import (
    DatasetIntegrityError,
    DatasetNotFoundError,
    Splits,
    TensorExamples,
    generator,
    register,
)

__all__ = ["DEFAULT_ROOT", "ENV_VAR", "INSTALL_COMMAND", "FashionMNIST", "fashion_mnist"]

ENV_VAR = "REPGUIDE_FASHION_MNIST"
DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
INSTALL_COMMAND = "apt-get update && apt-get install -y --no-install-recommends dataset-fashion-mnist"

# MD5 of the decompressed files: the gz bytes depend on the compressor, the content does not.
_MD5 = {
    "train-images-idx3-ubyte.gz": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte.gz": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte.gz": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte.gz": "15d484375f8d13e6eb1aabb0c3f46965",
}
_SIDE = 28
_NUM_CLASSES = 10
# ±2 px (7% of the side) is the usual light shift for 28×28 images: at most a thin border is cropped.
_MAX_SHIFT = 2
_AUGMENTATIONS = ("none", "flip", "translate")
_NORMALIZATIONS = ("mean_std", "none")


class FashionMNIST(TensorExamples):
    """One split: item i is ``(x, y)`` with ``x: (1, S, S)`` float32 and ``y`` an int64 class in 0..9.

    Images are kept as uint8 ``(n, 28, 28)`` and turned into floats a batch at a time: placed on the
    canvas (S = canvas, else 28), augmented, then normalised. ``source_index: (n,)`` gives each example's
    row in the original idx file, so splits can be checked for overlap and examples traced.

    Augmentation is a fixed function of (seed, epoch, example): call :meth:`set_epoch` at the start of
    every epoch to draw new flips/shifts, as with ``DistributedSampler``. Batching, shuffling and
    worker count do not change what an example looks like. (With ``persistent_workers=True`` the
    workers keep their own copy, so ``set_epoch`` does not reach them.)
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        source_index: Tensor,
        *,
        canvas: int | None,
        augment: str,
        mean: float,
        std: float,
        seed: int,
        split: str,
        with_index: bool = False,
    ) -> None:
        super().__init__(images, labels, with_index=with_index)
        self.source_index = source_index
        self.side = canvas or _SIDE
        self.augment = augment
        self.mean, self.std = mean, std
        self._keys = (seed, "fashion_mnist", split)
        # Positions are drawn once, so an example sits at the same place in every epoch and run.
        g = generator(*self._keys, "canvas")
        self.offsets = torch.randint(0, self.side - _SIDE + 1, (len(images), 2), generator=g)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw the flips and shifts of ``epoch`` for every example (used only when augmenting)."""
        g = generator(*self._keys, "augment", epoch)
        n = len(self)
        self.flips = torch.rand(n, generator=g) < 0.5
        self.shifts = torch.randint(-_MAX_SHIFT, _MAX_SHIFT + 1, (n, 2), generator=g)

    def batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Images ``(b, 1, S, S)`` float32 and labels ``(b,)`` int64 for positions ``idx: (b,)``."""
        images, labels = self.tensors
        x = images[idx].float().div_(255)
        if self.side != _SIDE:
            x = _place(x, self.offsets[idx], self.side)
        if self.augment == "flip":
            x = torch.where(self.flips[idx, None, None], x.flip(-1), x)
        elif self.augment == "translate":
            x = _translate(x, self.shifts[idx])
        x = x.sub_(self.mean).div_(self.std)
        return x.unsqueeze(1), labels[idx]


def _place(x: Tensor, offsets: Tensor, side: int) -> Tensor:
    """Paste ``x: (b, h, w)`` into blank ``(b, side, side)`` images at top-left corners ``offsets: (b, 2)``."""
    b, h, w = x.shape
    rows = offsets[:, :1] + torch.arange(h)  # (b, h)
    cols = offsets[:, 1:] + torch.arange(w)  # (b, w)
    out = x.new_zeros(b, side, side)
    out[torch.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]] = x
    return out


def _translate(x: Tensor, shifts: Tensor) -> Tensor:
    """Shift each image of ``x: (b, h, w)`` by ``shifts: (b, 2)`` pixels (rows, cols), filling with 0."""
    b, h, w = x.shape
    r = _MAX_SHIFT
    padded = F.pad(x, (r, r, r, r))
    rows = (r - shifts[:, :1]) + torch.arange(h)
    cols = (r - shifts[:, 1:]) + torch.arange(w)
    return padded[torch.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def _root(root: str | os.PathLike | None) -> Path:
    if root is not None:
        return Path(root)
    return Path(os.environ.get(ENV_VAR) or DEFAULT_ROOT)


@functools.cache
def _read(root: Path) -> dict[str, Tensor]:
    """The four files as tensors (images uint8 ``(n, 28, 28)``, labels int64 ``(n,)``).

    Cached per process because decompressing and checksumming them is slow (docs/data.md says how slow);
    callers index these tensors (which copies) and never modify them in place.
    """
    missing = [name for name in _MD5 if not (root / name).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"Fashion-MNIST not found in {root} (missing {', '.join(missing)}). Install it as root with\n"
            f"    {INSTALL_COMMAND}\n"
            f"or set {ENV_VAR} to a folder holding the four *-ubyte.gz files."
        )
    out = {}
    for name, md5 in _MD5.items():
        path = root / name
        try:
            raw = gzip.decompress(path.read_bytes())
        except (OSError, EOFError, zlib.error) as err:
            raise DatasetIntegrityError(f"{path} is not a readable gzip file ({err}); reinstall it.") from err
        digest = hashlib.md5(raw).hexdigest()
        if digest != md5:
            raise DatasetIntegrityError(
                f"{path}: MD5 of the decompressed content is {digest}, expected {md5}; the file is corrupt "
                f"or not the official Fashion-MNIST. Reinstall it ({INSTALL_COMMAND})."
            )
        out[name.split("-ubyte")[0]] = _parse_idx(raw)
    return out


def _parse_idx(raw: bytes) -> Tensor:
    # idx format: two zero bytes, a type code (0x08 = uint8), the number of dims, big-endian int32 sizes.
    ndim = raw[3]
    shape = tuple(int(s) for s in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)
    return torch.from_numpy(data.copy()) if ndim > 1 else torch.from_numpy(data.astype(np.int64))


def _balanced_subset(labels: Tensor, candidates: Tensor, size: int, g: torch.Generator) -> Tensor:
    """``size`` of the ``candidates: (m,)`` indices, as equal a number per class as possible, sorted."""
    chosen = []
    for c in range(_NUM_CLASSES):
        pool = candidates[labels[candidates] == c]
        k = size // _NUM_CLASSES + (c < size % _NUM_CLASSES)
        if k > len(pool):
            raise DataError(f"train_size={size} needs {k} examples of class {c}, only {len(pool)} left")
        chosen.append(pool[torch.randperm(len(pool), generator=g)[:k]])
    return torch.cat(chosen).sort().values


def _moments(images: Tensor, side: int) -> tuple[float, float]:
    """Pixel mean and std of ``images: (n, 28, 28)`` uint8 as pasted on blank ``side``×``side`` canvases."""
    counts = torch.bincount(images.flatten(), minlength=256).double()
    values = torch.arange(256, dtype=torch.float64) / 255
    # The canvas only adds zeros, which scale the first and second moments by the area ratio.
    area = _SIDE**2 / side**2
    mean = float((counts * values).sum() / counts.sum()) * area
    second = float((counts * values**2).sum() / counts.sum()) * area
    return mean, (second - mean**2) ** 0.5


@register("fashion_mnist")
def fashion_mnist(
    *,
    train_size: int | None = None,
    val_size: int = 5000,
    normalize: str = "mean_std",
    augment: str = "none",
    canvas: int | None = None,
    seed: int = 0,
    eval_seed: int = 0,
    with_index: bool = False,
    root: str | os.PathLike | None = None,
) -> Splits:
    """Fashion-MNIST train / val / test splits; each item is ``(x: (1, S, S) float32, y: int64)``.

    * val: ``val_size`` examples held out of the 60k training file (drawn with ``eval_seed``);
      test: the 10k t10k file.
    * train: the rest, or a class-balanced subset of ``train_size`` of it drawn with ``seed``.
    * ``normalize``: ``"mean_std"`` (pixel mean/std of the 60k file minus val, on the canvas and
      without augmentation) or ``"none"`` (pixels in [0, 1]).
    * ``augment``: ``"none"``, ``"flip"`` (horizontal, p=0.5) or ``"translate"`` (±2 px); train only.
    * ``canvas``: side S > 28 of a blank image on which each 28×28 image is pasted at a random
      position, fixed per example (train positions from ``seed``, val/test from ``eval_seed``).
    * Files come from ``root``, else ``$REPGUIDE_FASHION_MNIST``, else ``/usr/share/datasets/fashion-mnist``.
    """
    if normalize not in _NORMALIZATIONS:
        raise DataError(f"normalize must be one of {_NORMALIZATIONS}, got {normalize!r}")
    if augment not in _AUGMENTATIONS:
        raise DataError(f"augment must be one of {_AUGMENTATIONS}, got {augment!r}")
    if canvas is not None and canvas < _SIDE:
        raise DataError(f"canvas must be at least {_SIDE}, got {canvas}")
    files = _read(_root(root))
    images, labels = files["train-images-idx3"], files["train-labels-idx1"]
    if not 0 < val_size < len(images):
        raise DataError(f"val_size must be in 1..{len(images) - 1}, got {val_size}")

    order = torch.randperm(len(images), generator=generator(eval_seed, "fashion_mnist", "val"))
    val_idx, rest = order[:val_size].sort().values, order[val_size:].sort().values
    train_idx = rest
    if train_size is not None:
        train_idx = _balanced_subset(labels, rest, train_size, generator(seed, "fashion_mnist", "train"))
    test_idx = torch.arange(len(files["t10k-labels-idx1"]))

    side = canvas or _SIDE
    # Statistics of the whole pool rather than the subset, so val/test inputs do not depend on
    # seed or train_size (e.g. a guide's cached test features stay valid across runs).
    mean, std = _moments(images[rest], side) if normalize == "mean_std" else (0.0, 1.0)

    def split(imgs: Tensor, labs: Tensor, idx: Tensor, name: str, split_seed: int) -> FashionMNIST:
        return FashionMNIST(
            imgs[idx],
            labs[idx],
            idx,
            canvas=canvas,
            augment=augment if name == "train" else "none",
            mean=mean,
            std=std,
            seed=split_seed,
            split=name,
            with_index=with_index,
        )

    return Splits(
        train=split(images, labels, train_idx, "train", seed),
        val=split(images, labels, val_idx, "val", eval_seed),
        test=split(files["t10k-images-idx3"], files["t10k-labels-idx1"], test_idx, "test", eval_seed),
        num_classes=_NUM_CLASSES,
        input_shape=(1, side, side),
    )
