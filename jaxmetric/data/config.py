"""The data of a run, described once: :class:`DataConfig` and :func:`load`.

A run folder's ``config.json`` holds the training settings
(:class:`jaxmetric.train.config.TrainConfig`) and, under ``"data"``, a :class:`DataConfig`:
everything that decides which images a run trains and is evaluated on. ``load(cfg)``
rebuilds exactly that data, so a run can be re-evaluated from its folder alone
(``python -m jaxmetric.report RUN_DIR``) and a resumed run can be checked to see the same
split (:meth:`DataConfig.differences`). In the spirit of flax's ``examples/imagenet`` and
big_vision, whose configs name their data set.

Three sources, one loader each:

* ``cifar10`` -- :func:`jaxmetric.data.load_cifar10` (``path``: a ``cifar-10-batches-py``
  folder, an image tree or an archive of one; None: tensorflow-datasets), optionally
  holding the last ``unseen_classes`` classes out of training
  (:func:`jaxmetric.data.splits.hold_out_last`);
* ``folder`` -- any class-per-folder tree (:func:`jaxmetric.data.folders.load_folder`),
  split by ``train_classes`` / ``train_class_list`` / ``test_class_list`` (or the tree's
  own ``train/`` + ``test/`` classes), images resized to ``image_size``;
* ``tfds`` -- a tensorflow-datasets metric-learning benchmark (``tfds``: its name) with
  its standard split (:mod:`jaxmetric.data.tfds_benchmarks`).

``max_train`` / ``max_test`` keep the first N images, class-balanced (CIFAR-10: before
the class split; the other sources: of the training classes' training images and of the
queries). ``path`` is where the data lives, not what it is: it may change between a run
and its resumption or re-evaluation; every other field shapes the data and may not.

:func:`load` returns a :class:`~jaxmetric.data.Dataset` (trained and evaluated on the
same classes) or a :class:`~jaxmetric.data.splits.ClassSplit` (trained on some classes,
evaluated on the others).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from jaxmetric.data.cifar10 import load_cifar10
from jaxmetric.data.splits import ClassSplit, hold_out_last, limit
from jaxmetric.data.tfds_benchmarks import BENCHMARKS
from jaxmetric.data.types import Dataset
from jaxmetric.utils import check_choice

__all__ = ["CIFAR10_IMAGE_SIZE", "LOCATION_FIELDS", "SOURCES", "DataConfig", "load"]

SOURCES = ("cifar10", "folder", "tfds")
CIFAR10_IMAGE_SIZE = 32
LOCATION_FIELDS = frozenset({"path"})
"""Fields that say where the data lives rather than what it is."""
CLASS_CHOICES = ("train_classes", "train_class_list", "test_class_list")
LEGACY_FIELDS = ("data_dir", "max_train", "max_test", "unseen_classes")
"""The data settings that configs written before :class:`DataConfig` held themselves."""


def _field(default, help: str, **meta) -> Any:
    """A field with its help text (and, for :mod:`jaxmetric.train.flags`, ``flag``: the
    command-line spelling where it is not the field's name, ``choices``, ``metavar``,
    ``convert``: how a flag's text becomes the value)."""
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def class_list(text: str) -> tuple[str, ...]:
    """``"cat, dog,frog"`` -> ``("cat", "dog", "frog")``."""
    names = tuple(c.strip() for c in text.split(",") if c.strip())
    if not names:
        raise ValueError("expected comma-separated class names")
    return names


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which images a run trains and is evaluated on (see the module docstring).

    Raises ``ValueError`` (``TypeError`` for a wrongly typed value) naming the problem for
    a setting its source does not take or a value out of range.
    """

    source: str = _field("cifar10", "cifar10, an image-folder tree, or a tfds benchmark",
                         choices=SOURCES)
    path: str | None = _field(
        None, "where the data lives (CIFAR-10: a cifar-10-batches-py folder, an image tree "
        "or a .tar.xz/.tar.gz of one, None: tensorflow-datasets; folder: the tree)",
        flag="--data-dir", metavar="PATH")
    tfds: str | None = _field(None, "a tensorflow-datasets benchmark with its standard split",
                              choices=tuple(sorted(BENCHMARKS)))
    max_train: int | None = _field(None, "keep only the first N training images, "
                                   "class-balanced; None: all")
    max_test: int | None = _field(None, "keep only the first N test images, class-balanced; "
                                  "None: all")
    unseen_classes: int | None = _field(
        None, "hold the last N classes (label order) out of training and evaluate retrieval "
        "on them only: their test images query their training images, and each other "
        "(leave-one-out); max_train/max_test apply before the split. None: every class "
        "trains and is evaluated")
    train_classes: int | None = _field(
        None, "the first N classes (sorted by name) train, the rest are held out", metavar="N")
    train_class_list: tuple[str, ...] | None = _field(
        None, "the training classes by name", metavar="A,B,...", convert=class_list)
    test_class_list: tuple[str, ...] | None = _field(
        None, "the held-out classes by name (default: every other class)", metavar="A,B,...",
        convert=class_list)
    image_size: int = _field(CIFAR10_IMAGE_SIZE, "side of the network's square input; "
                             "images are resized on load", metavar="S")
    channels: int = _field(3, "3: RGB (grayscale images copied to 3 channels); 1: grayscale",
                           choices=(1, 3))

    def __post_init__(self):
        check_choice("source", self.source, SOURCES)
        if self.tfds is not None:
            check_choice("tfds benchmark", self.tfds, tuple(sorted(BENCHMARKS)))
        for name in ("max_train", "max_test", "unseen_classes", "train_classes"):
            value = getattr(self, name)
            if value is not None:
                _positive_int(name, value)
        _positive_int("image_size", self.image_size)
        check_choice("channels", self.channels, (1, 3))
        for name in ("train_class_list", "test_class_list"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, str) or not all(isinstance(c, str) for c in value):
                    raise TypeError(f"{name} must be a sequence of class names; got {value!r}")
                object.__setattr__(self, name, tuple(value))
        if self.unseen_classes is not None and self.unseen_classes < 2:
            raise ValueError(f"unseen_classes must be >= 2; got {self.unseen_classes}")
        chosen = [f for f in CLASS_CHOICES if getattr(self, f) is not None]
        if self.source == "cifar10":
            wrong = chosen + [f for f in ("tfds",) if self.tfds is not None]
            if wrong:
                raise ValueError(f"{', '.join(wrong)}: not for CIFAR-10 (its held-out classes "
                                 "are chosen with unseen_classes)")
            if (self.image_size, self.channels) != (CIFAR10_IMAGE_SIZE, 3):
                raise ValueError(f"CIFAR-10 images are {CIFAR10_IMAGE_SIZE}x"
                                 f"{CIFAR10_IMAGE_SIZE} RGB; image_size and channels stay "
                                 "at their defaults")
            return
        if self.unseen_classes is not None:
            raise ValueError("unseen_classes is CIFAR-10's; choose the training classes "
                             "with train_classes or train_class_list")
        if self.source == "folder":
            if self.path is None:
                raise ValueError("source folder needs path: the image-folder tree")
            if self.tfds is not None:
                raise ValueError("give the data one way: a folder path or a tfds name")
        else:
            if self.tfds is None:
                raise ValueError("source tfds needs the benchmark's name (tfds)")
            if self.path is not None:
                raise ValueError("give the data one way: a folder path or a tfds name")
            if chosen:
                raise ValueError(f"tfds {self.tfds} has its standard split; leave out "
                                 + ", ".join(chosen))

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (class lists as lists): a run's ``config.json``
        holds it under ``"data"``."""
        d = dataclasses.asdict(self)
        for name in ("train_class_list", "test_class_list"):
            if d[name] is not None:
                d[name] = list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error, missing ones default."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown DataConfig fields: {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def from_legacy(cls, run_config: Mapping[str, Any]) -> DataConfig:
        """The data of a ``config.json`` written before the data had a section of its own
        (only CIFAR-10 runs recorded their data there: ``data_dir``, ``max_train``,
        ``max_test``, ``unseen_classes``)."""
        return cls(source="cifar10", path=run_config.get("data_dir"),
                   max_train=run_config.get("max_train"), max_test=run_config.get("max_test"),
                   unseen_classes=run_config.get("unseen_classes"))

    @classmethod
    def of_run(cls, run_config: Mapping[str, Any]) -> DataConfig:
        """The data of a run from its loaded ``config.json``: the ``"data"`` section, or
        for a file written before there was one, :meth:`from_legacy`."""
        if "data" in run_config:
            return cls.from_dict(run_config["data"])
        return cls.from_legacy(run_config)

    def differences(self, other: DataConfig) -> list[str]:
        """``"field: saved X, now Y"`` for each field that shapes the data and differs
        (``path`` may differ: the same data can move)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{k}: saved {mine[k]!r}, now {theirs[k]!r}" for k in mine
                if k not in LOCATION_FIELDS and mine[k] != theirs[k]]

    def describe(self) -> str:
        """A short name of the data for log lines."""
        if self.source == "tfds":
            return f"{self.tfds} (tensorflow-datasets)"
        where = self.path if self.path is not None else "tensorflow-datasets"
        return f"{self.source} {where}"


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1; got {value}")


def load(cfg: DataConfig) -> Dataset | ClassSplit:
    """The data ``cfg`` describes: a :class:`Dataset`, or a :class:`ClassSplit` when
    classes are held out of training (see the module docstring).

    Raises:
      DataError: missing, malformed or unreadable data (the message names it).
      ValueError: a class choice the data does not allow (an unknown class name, more
        held-out classes than the data has, ...).
    """
    if cfg.source == "cifar10":
        dataset = load_cifar10(cfg.path, max_train=cfg.max_train, max_test=cfg.max_test)
        if cfg.unseen_classes is None:
            return dataset
        return hold_out_last(dataset, cfg.unseen_classes)
    if cfg.source == "tfds":
        from jaxmetric.data.tfds_benchmarks import load_tfds

        split = load_tfds(cfg.tfds, image_size=cfg.image_size, channels=cfg.channels)
    else:
        from jaxmetric.data.folders import load_folder

        split = load_folder(cfg.path, image_size=cfg.image_size, channels=cfg.channels,
                            train_classes=cfg.train_classes,
                            train_class_list=_listed(cfg.train_class_list),
                            test_class_list=_listed(cfg.test_class_list))
    return limit(split, cfg.max_train, cfg.max_test)


def _listed(names: Sequence[str] | None) -> list[str] | None:
    return None if names is None else list(names)
