"""Image-folder trees of any image size, read for the class-disjoint protocol.

Two layouts (class names are the folder names; ``.jpg``/``.jpeg``/``.png`` files; hidden
files and folders are skipped):

* **flat** -- ``ROOT/<class>/*.jpg``: every image of a training class is trained on,
  every image of a held-out class is a query, retrieved leave-one-out among the others
  (the CUB-200-2011 / Cars196 protocol);
* **split** -- ``ROOT/train/<class>/...`` and ``ROOT/test/<class>/...``: the training
  classes' ``train/`` images are trained on; a held-out class's ``test/`` images are the
  queries and its ``train/`` images the gallery (never trained on). The ``test/`` images
  of training classes are not used. When ``train/`` and ``test/`` hold disjoint classes
  (Stanford Online Products' own split laid out as folders), that is the default split
  and the held-out classes have no gallery: leave-one-out only.

The classes are sorted by name (over ``train/`` and ``test/`` together); which of them
train is chosen with :func:`jaxmetric.data.splits.choose_classes` (the first N, or lists of
names). Only the images the split uses are decoded.

**Images** (:func:`jaxmetric.data.images.decode_image`). Pillow decodes each file and
converts it to ``channels`` channels: 3 (RGB; grayscale images are copied to three
channels, so a folder that mixes them -- as CUB-200-2011 does -- works) or 1 (Pillow's
``"L"``, ITU-R 601-2 luma, for grayscale data). Every image is resized on load (the
shorter side to the stored size, then the centred square; bilinear, antialiased when
shrinking), so images of any size and aspect become one array:

* ``image_size < LARGE_IMAGE`` (small images, CIFAR-like): stored at ``image_size``;
  training uses the pad-4 crop + flip;
* ``image_size >= LARGE_IMAGE``: stored at :func:`jaxmetric.data.images.stored_size`
  (``round(image_size * 8 / 7)``: 256 for 224, the ImageNet "resize 256, crop 224" recipe) with
  ``Dataset.input_size = image_size``: training takes random-resized crops of
  ``image_size`` + flip, the evaluation the centre crop (:mod:`jaxmetric.train.augment`).

**Normalisation** is the per-channel mean and standard deviation of the training
images of the training classes (:func:`jaxmetric.data.splits.split_classes`), for small and
large images alike -- not ImageNet's statistics: jaxmetric's networks are trained from
scratch, so the data's own statistics are the right ones, they exist for one channel
too, and nothing of a held-out class enters them.

The whole training set is held in memory as uint8 (and on each device during
training): CUB-200-2011's 5,864 training images at 256x256x3 take 1.2 GB.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from jaxmetric.data.images import (
    CHANNELS,
    IMAGE_EXTENSIONS,
    decode_image,
    stored_size,
)
from jaxmetric.data.splits import ClassSplit, choose_classes, split_classes
from jaxmetric.data.types import DataError, Dataset, Split
from jaxmetric.utils import check_choice

__all__ = [
    "FolderTree",
    "load_folder",
    "scan_folder",
    "to_dataset",
]

SPLITS = ("train", "test")
MIN_TREE_CLASSES = 4
"""At least two classes to train and two to hold out."""








@dataclasses.dataclass(frozen=True)
class FolderTree:
    """The image files of a tree, not yet decoded.

    Attributes:
      root: the tree's folder.
      layout: ``"flat"`` or ``"split"`` (see the module docstring).
      files: ``{split: {class: [paths sorted by name]}}``; the flat layout has one
        split, ``"all"``.
      class_names: every class, sorted by name.
    """

    root: pathlib.Path
    layout: str
    files: Mapping[str, Mapping[str, Sequence[pathlib.Path]]]
    class_names: tuple[str, ...]

    def default_split(self) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
        """``(train/ classes, test/ classes)`` when a split tree's two halves hold
        disjoint classes, else None (a split must be chosen)."""
        if self.layout != "split":
            return None
        train, test = set(self.files["train"]), set(self.files["test"])
        if train & test:
            return None
        return (tuple(c for c in self.class_names if c in train),
                tuple(c for c in self.class_names if c in test))


def _visible_dirs(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted((p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.name.lower().endswith(IMAGE_EXTENSIONS)), key=lambda p: p.name)


def scan_folder(root) -> FolderTree:
    """Lists the images of a flat or split tree (see the module docstring).

    Raises:
      DataError: ``root`` is missing or not a folder, holds no class folders, a class
        folder holds no images, or the tree has fewer than 4 classes (two to train and
        two to hold out).
    """
    root = pathlib.Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; expected <class>/*.jpg folders or "
                        "train/<class>/ and test/<class>/")
    subdirs = {p.name: p for p in _visible_dirs(root)}
    if set(subdirs) & set(SPLITS):
        missing = [s for s in SPLITS if s not in subdirs]
        if missing:
            raise DataError(f"{root}: has {'/'.join(s for s in SPLITS if s in subdirs)}/ but "
                            f"no {missing[0]}/ folder; a split tree needs train/<class>/ and "
                            "test/<class>/")
        layout = "split"
        files = {s: {c.name: _images_in(c) for c in _visible_dirs(subdirs[s])} for s in SPLITS}
    else:
        layout = "flat"
        files = {"all": {c.name: _images_in(c) for c in subdirs.values()}}
    for split, classes in files.items():
        where = root if split == "all" else root / split
        if not classes:
            raise DataError(f"{where}: holds no class folders (expected <class>/*.jpg)")
        for name, paths in classes.items():
            if not paths:
                raise DataError(f"{where / name}: class folder holds no images "
                                f"({', '.join(IMAGE_EXTENSIONS)})")
    class_names = tuple(sorted({c for classes in files.values() for c in classes}))
    if len(class_names) < MIN_TREE_CLASSES:
        raise DataError(f"{root}: has {len(class_names)} class(es) ({', '.join(class_names)}); "
                        f"the class-disjoint protocol needs at least {MIN_TREE_CLASSES}: two "
                        "to train, two held out")
    return FolderTree(root, layout, files, class_names)


def _decode_all(paths: Sequence[pathlib.Path], size: int, channels: int,
                workers: int) -> np.ndarray:
    """Decodes ``paths`` into uint8 ``(N, size, size, channels)``, on ``workers``
    threads (Pillow releases the GIL while decoding and resizing)."""
    images = np.empty((len(paths), size, size, channels), np.uint8)

    def fill(i: int) -> None:
        images[i] = decode_image(paths[i], size=size, channels=channels)

    if workers <= 1 or len(paths) < 64:
        for i in range(len(paths)):
            fill(i)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(fill, range(len(paths))))
    return images


def to_dataset(tree: FolderTree, train_names: Sequence[str], eval_names: Sequence[str], *,
               image_size: int, channels: int = 3,
               workers: int | None = None) -> Dataset:
    """Decodes what the split uses into one :class:`~jaxmetric.data.Dataset` over
    ``train_names + eval_names`` (ready for :func:`jaxmetric.data.splits.split_classes`):
    its ``train`` split holds the training images of the training classes and the
    gallery of the held-out ones, its ``test`` split the queries."""
    size = stored_size(image_size)
    check_choice("channels", channels, CHANNELS)
    workers = workers or min(8, os.cpu_count() or 1)
    names = tuple(c for c in tree.class_names if c in set(train_names) | set(eval_names))
    label = {c: i for i, c in enumerate(names)}
    train_set = set(train_names)
    if tree.layout == "flat":
        wanted = {"train": {c: p for c, p in tree.files["all"].items() if c in train_set},
                  "test": {c: p for c, p in tree.files["all"].items()
                           if c in label and c not in train_set}}
    else:
        wanted = {"train": {c: p for c, p in tree.files["train"].items() if c in label},
                  "test": {c: p for c, p in tree.files["test"].items()
                           if c in label and c not in train_set}}
    splits = {}
    for split, classes in wanted.items():
        order = sorted(classes, key=label.__getitem__)
        paths = [p for c in order for p in classes[c]]
        labels = np.array([label[c] for c in order for _ in classes[c]], np.int32)
        splits[split] = Split(_decode_all(paths, size, channels, workers), labels)
    return Dataset(splits["train"], splits["test"], names,
                   description=f"image folders {tree.root.name}/ ({tree.layout} layout)",
                   input_size=image_size if size != image_size else None)


def load_folder(
    root,
    *,
    image_size: int,
    channels: int = 3,
    train_classes: int | None = None,
    train_class_list: Sequence[str] | None = None,
    test_class_list: Sequence[str] | None = None,
    workers: int | None = None,
) -> ClassSplit:
    """Reads an image-folder tree into a class-disjoint :class:`ClassSplit`.

    Args:
      root: a flat or split tree (see the module docstring).
      image_size: side of the model's square input; sets the stored size
        (:func:`jaxmetric.data.images.stored_size`) and the crops.
      channels: 3 (RGB) or 1 (grayscale).
      train_classes: the first N classes (sorted by name) train, the rest are held out.
      train_class_list: the training classes by name (instead of ``train_classes``).
      test_class_list: the held-out classes by name (default: every other class).
      workers: decoding threads (default: up to 8, the CPU count).

    Without any of the three class arguments a split tree whose ``train/`` and
    ``test/`` hold disjoint classes is split that way; otherwise one is required.

    Raises:
      DataError: a bad tree (see :func:`scan_folder`) or an unreadable image.
      ValueError: a bad class choice (see :func:`jaxmetric.data.splits.choose_classes`).
    """
    tree = scan_folder(root)
    if train_classes is None and train_class_list is None and test_class_list is None:
        chosen = tree.default_split()
        if chosen is None:
            raise ValueError(
                f"{tree.root}: choose the training classes (train_classes=N or "
                "train_class_list); only a train/ + test/ tree with disjoint classes has "
                "a split of its own")
    else:
        chosen = choose_classes(tree.class_names, train_classes=train_classes,
                                train_class_list=train_class_list,
                                test_class_list=test_class_list)
    dataset = to_dataset(tree, *chosen, image_size=image_size, channels=channels,
                         workers=workers)
    return split_classes(dataset, *chosen)

