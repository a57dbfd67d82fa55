"""The data types every source loads into: :class:`Split`, :class:`Dataset`,
:class:`DataError`, and the class-balanced selection of "the first N images".

A :class:`Dataset` is uint8 images in host memory with int32 labels, its class names
and what the model needs to know of it: the image shape (:attr:`Dataset.image_shape`)
and the per-channel mean and standard deviation its pixels are normalised with
(:attr:`Dataset.normalization`: given by the source, else computed from its training
images by :func:`channel_stats`).

**Class-balanced limits** (``max_train`` / ``max_test``). :func:`balanced_subset` keeps
the first N examples, ``N // n_classes`` per class and the remainder one each to the
lowest labels; a class with too few gives its shortfall to the others
(:func:`balanced_counts`, water-filling in label order). Pure NumPy.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

from jaxmetric.utils import check_positive_int

__all__ = ["DataError", "Dataset", "Split", "balanced_counts", "balanced_subset",
           "channel_stats"]


class DataError(Exception):
    """The data set is missing, malformed or corrupt; the message names the file."""


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """One split of a data set, in host memory.

    Attributes:
      images: uint8 array (N, H, W, C); (N, 32, 32, 3) for CIFAR-10.
      labels: int32 array (N,) of class indices.
    """

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        images, labels = self.images, self.labels
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(
                "Split.images must be a uint8 array (N, H, W, C), got "
                f"{getattr(images, 'dtype', type(images))} {getattr(images, 'shape', '')}"
            )
        if not isinstance(labels, np.ndarray) or labels.dtype != np.int32 or labels.ndim != 1:
            raise ValueError(
                "Split.labels must be an int32 array (N,), got "
                f"{getattr(labels, 'dtype', type(labels))} {getattr(labels, 'shape', '')}"
            )
        if len(images) != len(labels):
            raise ValueError(f"Split has {len(images)} images but {len(labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Train and test splits plus the class names (``class_names[label]``).

    Attributes:
      train, test: the splits; their images must have the same shape (H, W, C).
      class_names: ``class_names[label]``.
      mean, std: per-channel pixel statistics in [0, 1] units for normalisation (both
        or neither); None = computed from the training images (:attr:`normalization`).
      description: how reports name the data, e.g. ``"CIFAR-10 (tensorflow-datasets)"``.
      input_size: side of the square the model sees when the images are stored larger
        (see :mod:`jaxmetric.data.folders`): random-resized crops of that size in training,
        the centre crop at evaluation. None: the images as stored, with the pad-4 crop
        + flip in training (the CIFAR recipe).
    """

    train: Split
    test: Split
    class_names: tuple[str, ...]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    description: str | None = None
    input_size: int | None = None

    def __post_init__(self):
        if not isinstance(self.class_names, tuple) or not self.class_names:
            raise ValueError(
                f"Dataset.class_names must be a non-empty tuple, got {self.class_names!r}"
            )
        for name, split in (("train", self.train), ("test", self.test)):
            if len(split) and (
                split.labels.min() < 0 or split.labels.max() >= len(self.class_names)
            ):
                raise ValueError(f"Dataset.{name} has labels outside [0, {len(self.class_names)})")
        if self.train.images.shape[1:] != self.test.images.shape[1:]:
            raise ValueError(
                f"Dataset.train images are {self.train.images.shape[1:]} but test images are "
                f"{self.test.images.shape[1:]}"
            )
        if (self.mean is None) != (self.std is None):
            raise ValueError("Dataset.mean and Dataset.std go together: give both or neither")
        if self.mean is not None:
            channels = self.image_shape[-1]
            for name in ("mean", "std"):
                value = tuple(float(v) for v in getattr(self, name))
                if len(value) != channels:
                    raise ValueError(
                        f"Dataset.{name} needs one value per channel ({channels}); got {value}"
                    )
                object.__setattr__(self, name, value)
            if min(self.std) <= 0:
                raise ValueError(f"Dataset.std must be > 0; got {self.std}")
        if self.input_size is not None:
            size = check_positive_int("Dataset.input_size", self.input_size)
            if size > min(self.image_shape[:2]):
                raise ValueError(f"Dataset.input_size {size} is larger than the stored images "
                                 f"{self.image_shape}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """``(H, W, C)`` of every image: what the model is initialised on."""
        return tuple(int(d) for d in self.train.images.shape[1:])

    @functools.cached_property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``(mean, std)`` per channel: the given ones, else :func:`channel_stats` of the
        training images (computed once)."""
        if self.mean is not None:
            return self.mean, self.std
        return channel_stats(self.train.images)


def channel_stats(
    images: np.ndarray, *, chunk: int = 4096
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images (N, H, W, C), in [0, 1]
    units: the statistics :func:`jaxmetric.train.augment.normalize` takes.

    Two passes in float64 over chunks of ``chunk`` images (the mean, then the squared
    deviations from it), so memory stays small and the result exact to rounding; a
    channel that is constant gets standard deviation 1 (normalising it then only shifts
    it).
    """
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(
            "channel_stats expects uint8 images (N, H, W, C), got "
            f"{getattr(images, 'dtype', type(images))} {getattr(images, 'shape', '')}"
        )
    if len(images) == 0:
        raise ValueError("channel_stats needs at least one image")
    channels = images.shape[-1]
    count = images[..., 0].size

    def chunks():
        for start in range(0, len(images), chunk):
            yield images[start : start + chunk].reshape(-1, channels).astype(np.float64) / 255.0

    mean = sum(x.sum(axis=0) for x in chunks()) / count
    std = np.sqrt(sum(np.square(x - mean).sum(axis=0) for x in chunks()) / count)
    std = np.where(std > 1e-9, std, 1.0)  # rounding leaves ~1e-17 on a constant channel
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def balanced_subset(labels: Sequence[int] | np.ndarray, n: int, n_classes: int) -> np.ndarray:
    """Indices of the first ``n`` examples, balanced over classes.

    Each class gets ``n // n_classes`` examples and the remaining ``n % n_classes`` go
    one each to the lowest labels; a class with fewer examples than its share gives the
    shortfall to the others, so ``min(n, len(labels))`` indices are returned. Within a
    class the earliest examples are taken.

    Returns:
      Sorted int64 indices into ``labels``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(
            f"labels must lie in [0, {n_classes}), got [{labels.min()}, {labels.max()}]"
        )
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    counts = balanced_counts(np.bincount(labels, minlength=n_classes), n)
    picked = [np.flatnonzero(labels == c)[:k] for c, k in enumerate(counts)]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def balanced_counts(available: Sequence[int], n: int) -> np.ndarray:
    """Per-class counts summing to ``min(n, sum(available))``, as equal as possible.

    Water-filling in label order: every class still short of its available images gets
    an equal share of what is left; when the share rounds to zero the lowest such labels
    get one each.
    """
    available = np.asarray(available, dtype=np.int64)
    counts = np.zeros_like(available)
    remaining = min(int(n), int(available.sum()))
    while remaining > 0:
        open_classes = np.flatnonzero(counts < available)
        share = remaining // len(open_classes)
        if share == 0:
            counts[open_classes[:remaining]] += 1
            break
        add = np.minimum(share, available[open_classes] - counts[open_classes])
        counts[open_classes] += add
        remaining -= int(add.sum())
    return counts

