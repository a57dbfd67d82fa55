"""Class-disjoint splits: train on some classes, evaluate retrieval on classes never seen.

Deep metric learning is measured on classes the network was not trained on (the
protocol of Song et al. 2016 and Musgrave et al. 2020): CUB-200-2011 trains on classes
1-100 and tests on 101-200, Cars196 on 98 / 98 classes, Stanford Online Products on its
own class-disjoint lists. :func:`split_classes` cuts a :class:`~jaxmetric.data.Dataset`
that way into a :class:`ClassSplit`:

* ``ClassSplit.train`` -- the training classes: ``train.train`` holds their training
  images (what :func:`jaxmetric.train.fit` trains on), ``train.test`` their test images
  (not used by the protocol);
* ``ClassSplit.eval`` -- the held-out classes: ``eval.test`` holds their test images
  (the queries), ``eval.train`` their training images (the gallery, never trained on).
  With a gallery, :func:`jaxmetric.evaluate.evaluate_embeddings` reports queries against
  the gallery (``test_vs_train``) and leave-one-out among the queries (``test_vs_test``);
  without one (a held-out class has only test images, as in CUB-200-2011, where every
  image of a test class is a query) only the leave-one-out protocol.

Labels are renumbered within each side: ``train.class_names`` and ``eval.class_names``
are the chosen class names in label order of the source, labels index them. The
normalisation statistics are the source's where it has published ones (CIFAR-10's),
else computed from the training images of the training classes only
(:func:`jaxmetric.data.channel_stats`), so nothing of a held-out class leaks into
training; the held-out side carries the same statistics.

:func:`choose_classes` turns the usual ways of naming a split ("the first N classes",
"the last N held out", explicit lists) into the two lists of names, with an error that
names the problem for every bad choice.

**Validation splits** (tuning hyper-parameters without looking at the test set, as
Musgrave et al. 2020 ask): both are carved from the training images alone, so the test
images (and a :class:`ClassSplit`'s held-out classes) stay untouched until the final run.

* :func:`validation_split` -- for the protocol that trains and evaluates on the same
  classes: a class-balanced random part of each class's training images becomes the
  validation queries (``test``), searched against the rest, which is also what trains
  (``train``): the test -> train protocol becomes validation -> train-minus-validation;
* :func:`validation_classes` -- for the class-disjoint protocol: some training classes,
  chosen at random, are held out whole; their training images are the validation
  queries, searched leave-one-out among themselves (no gallery), and the network trains
  on the other classes.

Pure NumPy.

References:
  Song, Xiang, Jegelka, Savarese. "Deep Metric Learning via Lifted Structured Feature
    Embedding". CVPR 2016. https://arxiv.org/abs/1511.06452
  Musgrave, Belongie, Lim. "A Metric Learning Reality Check". ECCV 2020.
    https://arxiv.org/abs/2003.08505
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxmetric.data.types import Dataset, Split, balanced_subset

__all__ = ["MIN_CLASSES", "ClassSplit", "choose_classes", "hold_out_last", "limit",
           "split_classes", "validation_classes", "validation_split"]

MIN_CLASSES = 2
"""Fewest classes on either side: training needs a negative for every anchor, and among
one held-out class every retrieval is right by construction (P@1 = 1 means nothing)."""


@dataclasses.dataclass(frozen=True, eq=False)
class ClassSplit:
    """A data set cut into training classes and held-out classes (see the module
    docstring).

    Attributes:
      train: the training classes (``train.train`` is trained on).
      eval: the held-out classes (``eval.test``: queries; ``eval.train``: gallery,
        possibly empty).
    """

    train: Dataset
    eval: Dataset

    def __post_init__(self):
        shared = set(self.train.class_names) & set(self.eval.class_names)
        if shared:
            raise ValueError(f"ClassSplit is not class-disjoint: {sorted(shared)} on both sides")

    @property
    def has_gallery(self) -> bool:
        """Whether held-out classes have gallery images (else leave-one-out only)."""
        return len(self.eval.train) > 0

    def describe(self) -> dict[str, Any]:
        """What a report records about the split: the class names and image counts."""
        return {
            "protocol": "class-disjoint",
            "train_classes": list(self.train.class_names),
            "eval_classes": list(self.eval.class_names),
            "num_train_images": len(self.train.train),
            "num_queries": len(self.eval.test),
            "num_gallery": len(self.eval.train),
        }


def _names_text(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def choose_classes(
    class_names: Sequence[str],
    *,
    train_classes: int | None = None,
    unseen_classes: int | None = None,
    train_class_list: Sequence[str] | None = None,
    test_class_list: Sequence[str] | None = None,
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(training class names, held-out class names)``, each in the order of
    ``class_names``, from exactly one way of choosing:

    * ``train_classes=N``: the first N classes train, the rest are held out;
    * ``unseen_classes=N``: the last N classes are held out, the rest train;
    * ``train_class_list`` (and optionally ``test_class_list``, default: every class
      not in the training list): by name.

    Raises:
      ValueError: none or several ways given, a count out of range, an unknown or
        repeated name, a class on both sides, or fewer than :data:`MIN_CLASSES` on a side.
    """
    names = tuple(class_names)
    if test_class_list is not None and train_class_list is None:
        raise ValueError("test_class_list needs train_class_list")
    ways = [w for w, v in (("train_classes", train_classes), ("unseen_classes", unseen_classes),
                           ("train_class_list", train_class_list)) if v is not None]
    if len(ways) != 1:
        raise ValueError(
            "choose the training classes one way: train_classes (the first N), "
            "unseen_classes (the last N held out) or train_class_list (by name); got "
            + (", ".join(ways) if ways else "none"))
    most = len(names) - MIN_CLASSES
    if train_classes is not None or unseen_classes is not None:
        what = "train_classes" if train_classes is not None else "unseen_classes"
        n = train_classes if train_classes is not None else unseen_classes
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise ValueError(f"{what} must be an int; got {n!r}")
        if not MIN_CLASSES <= n <= most:
            raise ValueError(
                f"{what}={n} is out of range for {len(names)} classes: it must lie in "
                f"[{MIN_CLASSES}, {most}] so that at least {MIN_CLASSES} classes train and "
                f"at least {MIN_CLASSES} are held out")
        cut = int(n) if train_classes is not None else len(names) - int(n)
        return names[:cut], names[cut:]

    known = set(names)
    chosen = {}
    for what, given in (("train_class_list", train_class_list),
                        ("test_class_list", test_class_list)):
        if given is None:
            continue
        given = [str(c) for c in given]
        unknown = [c for c in given if c not in known]
        if unknown:
            raise ValueError(f"{what} names unknown classes {unknown}; the classes are "
                             f"{_names_text(names)}")
        repeated = sorted({c for c in given if given.count(c) > 1})
        if repeated:
            raise ValueError(f"{what} names {repeated} more than once")
        chosen[what] = set(given)
    train_set = chosen["train_class_list"]
    test_set = chosen.get("test_class_list", known - train_set)
    both = sorted(train_set & test_set)
    if both:
        raise ValueError(f"classes {both} are in both the training and the test list: "
                         "the split must be class-disjoint")
    for what, side in (("training", train_set), ("held-out", test_set)):
        if len(side) < MIN_CLASSES:
            raise ValueError(f"the split has {len(side)} {what} class(es); it needs at "
                             f"least {MIN_CLASSES}")
    return (tuple(c for c in names if c in train_set), tuple(c for c in names if c in test_set))


def _subset(split: Split, keep_labels: np.ndarray, num_classes: int) -> Split:
    """The images of ``split`` whose label is in ``keep_labels``, relabelled to their
    position there (order within the split kept)."""
    relabel = np.full(num_classes, -1, np.int64)
    relabel[keep_labels] = np.arange(len(keep_labels))
    new = relabel[split.labels]
    keep = np.flatnonzero(new >= 0)
    return Split(split.images[keep], new[keep].astype(np.int32))


def split_classes(dataset: Dataset, train_names: Sequence[str],
                  eval_names: Sequence[str]) -> ClassSplit:
    """Cut ``dataset`` into the ``train_names`` and ``eval_names`` classes (see the module
    docstring; usually the output of :func:`choose_classes`).

    Raises:
      ValueError: an unknown name, a class on both sides, fewer than
        :data:`MIN_CLASSES` on a side, a training class without training images or a
        held-out class without test images.
    """
    index = {name: i for i, name in enumerate(dataset.class_names)}
    for what, side in (("training", train_names), ("held-out", eval_names)):
        unknown = [c for c in side if c not in index]
        if unknown:
            raise ValueError(f"unknown {what} classes {unknown}; the classes are "
                             f"{_names_text(dataset.class_names)}")
        if len(set(side)) < MIN_CLASSES:
            raise ValueError(f"the split has {len(set(side))} {what} class(es); it needs "
                             f"at least {MIN_CLASSES}")
    both = sorted(set(train_names) & set(eval_names))
    if both:
        raise ValueError(f"classes {both} are on both sides: the split must be class-disjoint")
    train_ids = np.array([index[c] for c in train_names], np.int64)
    eval_ids = np.array([index[c] for c in eval_names], np.int64)
    n = dataset.num_classes
    for what, split, ids in (("training", dataset.train, train_ids),
                             ("test", dataset.test, eval_ids)):
        counts = np.bincount(split.labels, minlength=n)
        empty = [dataset.class_names[i] for i in ids if counts[i] == 0]
        if empty:
            side = "training class(es)" if what == "training" else "held-out class(es)"
            raise ValueError(f"{side} {empty} have no {what} images")
    train = Dataset(_subset(dataset.train, train_ids, n), _subset(dataset.test, train_ids, n),
                    tuple(train_names), mean=dataset.mean, std=dataset.std,
                    description=dataset.description, input_size=dataset.input_size)
    mean, std = train.normalization  # the training classes' own when none are published
    train = dataclasses.replace(train, mean=mean, std=std)
    note = dataset.description or "the data"
    held_out = Dataset(_subset(dataset.train, eval_ids, n), _subset(dataset.test, eval_ids, n),
                       tuple(eval_names), mean=mean, std=std,
                       description=f"{note}, the {len(eval_names)} classes held out of training",
                       input_size=dataset.input_size)
    return ClassSplit(train, held_out)


def hold_out_last(dataset: Dataset, n: int) -> ClassSplit:
    """Train on every class but the last ``n`` (label order), evaluate on those ``n``:
    :func:`choose_classes` with ``unseen_classes=n``, then :func:`split_classes`."""
    return split_classes(dataset, *choose_classes(dataset.class_names, unseen_classes=n))


def limit(split: ClassSplit, max_train: int | None = None,
          max_test: int | None = None) -> ClassSplit:
    """Keeps the first ``max_train`` training images and the first ``max_test`` queries,
    balanced over classes (:func:`jaxmetric.data.balanced_subset`); the gallery is kept
    whole. None keeps everything."""

    def take(part: Split, n: int | None, num_classes: int) -> Split:
        if n is None or n >= len(part):
            return part
        idx = balanced_subset(part.labels, n, num_classes)
        return Split(part.images[idx], part.labels[idx])

    train = dataclasses.replace(
        split.train, train=take(split.train.train, max_train, split.train.num_classes))
    held_out = dataclasses.replace(
        split.eval, test=take(split.eval.test, max_test, split.eval.num_classes))
    return ClassSplit(train, held_out)


def _empty_like(split: Split) -> Split:
    return Split(split.images[:0], split.labels[:0])


def validation_split(dataset: Dataset, fraction: float = 0.2, *, seed: int = 0) -> Dataset:
    """The training images of ``dataset`` cut into training and validation images, class by
    class (``dataset.test`` is left out).

    A class with :math:`n_c \\ge 2` training images gives
    :math:`k_c = \\min(\\max(\\mathrm{round}(f\\,n_c), 1), n_c - 1)` of them, drawn at
    random (``numpy.random.default_rng(seed)``), to the validation queries; a class with
    one image keeps it for training. So every class is validated and still trains.

    >>> import numpy as np
    >>> from jaxmetric.data import Dataset, Split
    >>> images = np.zeros((10, 4, 4, 3), np.uint8)
    >>> labels = np.array([0] * 5 + [1] * 5, np.int32)
    >>> data = Dataset(Split(images, labels), Split(images[:2], labels[:2]), ("a", "b"))
    >>> val = validation_split(data, 0.4)
    >>> len(val.train), len(val.test), np.bincount(val.test.labels).tolist()
    (6, 4, [2, 2])

    Args:
      dataset: the data of a run that trains and evaluates on the same classes.
      fraction: :math:`f`, the share of each class held out, in (0, 1).
      seed: which images.

    Returns:
      A :class:`~jaxmetric.data.Dataset` with the same classes, normalisation and input
      size: ``train`` the images left to train on, ``test`` the validation queries.

    Raises:
      ValueError: ``fraction`` outside (0, 1), or no class with two training images.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
            or not 0.0 < fraction < 1.0:
        raise ValueError(f"the validation fraction must lie in (0, 1); got {fraction!r}")
    labels = dataset.train.labels
    rng = np.random.default_rng(seed)
    held = []
    for c in range(dataset.num_classes):
        members = np.flatnonzero(labels == c)
        if len(members) < 2:
            continue
        k = min(max(int(round(fraction * len(members))), 1), len(members) - 1)
        held.append(rng.choice(members, k, replace=False))
    if not held:
        raise ValueError("a validation split needs a class with at least 2 training images")
    is_val = np.zeros(len(labels), bool)
    is_val[np.concatenate(held)] = True
    train, val = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    images = dataset.train.images
    note = dataset.description or "the data"
    return dataclasses.replace(
        dataset, train=Split(images[train], labels[train]), test=Split(images[val], labels[val]),
        description=f"{note}, {len(val)} of its training images held out for validation")


def validation_classes(dataset: Dataset, count: int, *, seed: int = 0) -> ClassSplit:
    """``count`` classes of ``dataset``, chosen at random, held out of its training images
    for validation (``dataset.test`` is left out).

    For the class-disjoint protocol pass the training side of a :class:`ClassSplit`
    (``split.train``): its held-out classes stay unseen. The validation classes' training
    images become the queries (``eval.test``), scored leave-one-out (``eval.train`` is
    empty: no gallery); the other classes' training images train (``train.train``;
    ``train.test`` is empty). Labels are renumbered within each side, as in
    :func:`split_classes`.

    >>> import numpy as np
    >>> from jaxmetric.data import Dataset, Split
    >>> images = np.zeros((12, 4, 4, 3), np.uint8)
    >>> labels = np.arange(12, dtype=np.int32) % 6
    >>> data = Dataset(Split(images, labels), Split(images[:1], labels[:1]), tuple("abcdef"))
    >>> split = validation_classes(data, 2)
    >>> len(split.train.class_names), len(split.eval.class_names), len(split.eval.test)
    (4, 2, 4)

    Args:
      dataset: the training classes of a run.
      count: how many of them validate (at least :data:`MIN_CLASSES`, leaving as many).
      seed: which classes.

    Returns:
      A :class:`ClassSplit`: ``train`` the classes that train, ``eval`` the validation
      classes.

    Raises:
      ValueError: ``count`` out of range, or a class without training images.
    """
    n = dataset.num_classes
    most = n - MIN_CLASSES
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) \
            or not MIN_CLASSES <= count <= most:
        raise ValueError(
            f"the number of validation classes must be an int in [{MIN_CLASSES}, {most}] for "
            f"{n} training classes (at least {MIN_CLASSES} validate and {MIN_CLASSES} "
            f"train); got {count!r}")
    counts = np.bincount(dataset.train.labels, minlength=n)
    empty = [dataset.class_names[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise ValueError(f"class(es) {empty} have no training images")
    rng = np.random.default_rng(seed)
    val_ids = np.sort(rng.choice(n, int(count), replace=False))
    train_ids = np.setdiff1d(np.arange(n), val_ids)
    names = dataset.class_names
    train = Dataset(_subset(dataset.train, train_ids, n), _empty_like(dataset.test),
                    tuple(names[i] for i in train_ids), mean=dataset.mean, std=dataset.std,
                    description=dataset.description, input_size=dataset.input_size)
    mean, std = train.normalization
    train = dataclasses.replace(train, mean=mean, std=std)
    note = dataset.description or "the data"
    val = Dataset(_empty_like(dataset.train), _subset(dataset.train, val_ids, n),
                  tuple(names[i] for i in val_ids), mean=mean, std=std,
                  description=f"{note}, {len(val_ids)} training classes held out for "
                              "validation", input_size=dataset.input_size)
    return ClassSplit(train, val)
