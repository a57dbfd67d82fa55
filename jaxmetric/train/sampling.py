"""Per-epoch batch indices, generated on the host.

Each function returns an int32 array (steps, batch_size) of example indices for one
epoch. Every batch has the same shape, so a jitted train step compiles once; the trainer
gathers ``images[indices[step]]`` from a device-resident training set. All randomness
comes from the ``np.random.Generator`` passed in, so a seed fixes the epoch.

**Random or class-balanced batches** (:func:`choose_classes_per_batch`). A pair-based
loss learns only from anchors that have a positive in the batch. In a shuffled batch of
``B`` drawn from ``N`` training images, an anchor of class ``c`` (``n_c`` images) has
on average ``(B - 1)(n_c - 1)/(N - 1)`` positives (:func:`random_batch_positives`: the
mean over anchors), and none with probability about ``(1 - (n_c - 1)/(N - 1))^(B-1)``.
With 10 classes and ``B = 256`` that is ~25 positives and no anchor without one; with
300 classes of 20 images it is 0.85, and ~43 % of the anchors have none. Class-balanced
batches of ``P`` classes x ``K`` images give every anchor ``K - 1`` positives. The rule:
take ``K =`` :data:`AUTO_IMAGES_PER_CLASS` (4, the usual ``m`` of
pytorch-metric-learning's ``MPerClassSampler``) images per class when a random batch
gives fewer than ``K - 1`` positives per anchor on average, else shuffle.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["AUTO_IMAGES_PER_CLASS", "BatchChoice", "choose_classes_per_batch",
           "class_balanced_batches", "random_batch_positives", "shuffled_batches",
           "steps_per_epoch"]

AUTO_IMAGES_PER_CLASS = 4
"""K of the class-balanced batches chosen automatically."""


def random_batch_positives(labels: np.ndarray, batch_size: int) -> tuple[float, float]:
    """``(mean positives per anchor, fraction of anchors without one)`` in a shuffled
    batch of ``batch_size`` from ``labels`` (see the module docstring; the fraction uses
    the with-replacement approximation of the hypergeometric law)."""
    counts = np.bincount(np.asarray(labels)).astype(np.float64)
    counts = counts[counts > 0]
    n = counts.sum()
    if n < 2:
        return 0.0, 1.0
    share = counts / n  # the chance an anchor is of class c
    same = (counts - 1) / (n - 1)  # the chance another image is of the anchor's class
    mean = float(np.sum(share * (batch_size - 1) * same))
    without = float(np.sum(share * (1.0 - same) ** (batch_size - 1)))
    return mean, without


class BatchChoice(NamedTuple):
    """What :func:`choose_classes_per_batch` decided, with a sentence for the setup line."""

    classes_per_batch: int | None
    """P of class-balanced batches, or None: shuffled batches."""
    reason: str
    without_positive: float
    """The fraction of anchors of a *random* batch without a positive."""


def choose_classes_per_batch(labels: np.ndarray, batch_size: int, setting, *,
                             needs_positives: bool = True) -> BatchChoice:
    """Resolve the ``classes_per_batch`` setting: an int (P) or None (shuffled) as
    given; ``"auto"``: the rule of the module docstring, for losses that need positives
    in the batch (``needs_positives``; proxy and classification losses shuffle)."""
    mean, without = random_batch_positives(labels, batch_size)
    stats = (f"a random batch gives {mean:.1f} positives per anchor, "
             f"{100 * without:.0f}% of anchors none")
    if setting != "auto":
        if setting is None:
            return BatchChoice(None, f"random batches ({stats})", without)
        return BatchChoice(int(setting), f"class-balanced batches of {setting} classes x "
                           f"{batch_size // int(setting)} images", without)
    if not needs_positives:
        return BatchChoice(None, "random batches (the loss learns class proxies/weights: "
                           "no positives needed in the batch)", without)
    k = AUTO_IMAGES_PER_CLASS
    classes = int(np.count_nonzero(np.bincount(np.asarray(labels)) >= 2))
    if mean >= k - 1:
        return BatchChoice(None, f"random batches ({stats}; auto switches to class-balanced "
                           f"batches of {k} images per class below {k - 1})", without)
    for kk in range(k, batch_size // 2 + 1):  # the smallest K >= 4 that divides the batch
        if batch_size % kk == 0 and batch_size // kk <= classes:
            p = batch_size // kk
            return BatchChoice(p, f"class-balanced batches of {p} classes x {kk} images, "
                               f"chosen because {stats}, fewer than {k - 1} "
                               "(--classes-per-batch none: random)", without)
    return BatchChoice(None, f"random batches ({stats}; no class-balanced split of batch "
                       f"{batch_size} into >= {k} images of <= {classes} classes)", without)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches in one pass over ``num_examples`` (the last partial one is dropped)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_examples < batch_size:
        raise ValueError(
            f"batch_size {batch_size} is larger than the number of examples {num_examples}: "
            "an epoch would have no full batch"
        )
    return num_examples // batch_size


def shuffled_batches(rng: np.random.Generator, num_examples: int, batch_size: int) -> np.ndarray:
    """A random permutation of ``range(num_examples)`` cut into full batches.

    Each index appears at most once per epoch; the ``num_examples % batch_size``
    left over are dropped (different ones each epoch).

    Returns:
      int32 array (num_examples // batch_size, batch_size).
    """
    steps = steps_per_epoch(num_examples, batch_size)
    perm = rng.permutation(num_examples)[: steps * batch_size]
    return perm.reshape(steps, batch_size).astype(np.int32)


def class_balanced_batches(
    rng: np.random.Generator,
    labels: np.ndarray,
    batch_size: int,
    classes_per_batch: int,
) -> np.ndarray:
    """ "P classes x K images" batches, so every example has positives in its batch.

    Each batch holds ``P = classes_per_batch`` distinct classes with
    ``K = batch_size // P`` examples each, laid out class by class:
    ``batch[j*K:(j+1)*K]`` share one label. Classes are drawn with probability
    proportional to how many of their examples the epoch has not used yet, and examples
    are drawn without replacement from a per-class shuffled queue (refilled with a fresh
    shuffle when it runs out, never repeating an example within a batch); a class with
    fewer than K examples contributes all of them plus repeats drawn with replacement.
    An epoch has ``len(labels) // batch_size`` batches, so on a balanced data set it
    sees (nearly) every example once.

    Args:
      rng: source of randomness.
      labels: integer class labels (N,), any values.
      batch_size: examples per batch, divisible by ``classes_per_batch``.
      classes_per_batch: P, at least 1 and at most the number of classes.

    Returns:
      int32 array (len(labels) // batch_size, batch_size) of indices into ``labels``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if classes_per_batch < 1:
        raise ValueError(f"classes_per_batch must be >= 1, got {classes_per_batch}")
    if batch_size % classes_per_batch:
        raise ValueError(
            f"batch_size {batch_size} is not divisible by classes_per_batch {classes_per_batch}"
        )
    k = batch_size // classes_per_batch
    if k < 2:
        raise ValueError(
            f"batch_size {batch_size} / classes_per_batch {classes_per_batch} gives {k} example "
            "per class: need at least 2 so that every example has a positive"
        )
    steps = steps_per_epoch(len(labels), batch_size)
    classes, inverse = np.unique(labels, return_inverse=True)
    if classes_per_batch > len(classes):
        raise ValueError(
            f"classes_per_batch {classes_per_batch} exceeds the {len(classes)} classes in labels"
        )
    members = [np.flatnonzero(inverse == c) for c in range(len(classes))]
    queues = [rng.permutation(m) for m in members]
    unused = np.array([len(m) for m in members], dtype=np.int64)  # left in this epoch's queue

    batches = np.empty((steps, batch_size), dtype=np.int32)
    for step in range(steps):
        for j, c in enumerate(_pick_classes(rng, unused, classes_per_batch)):
            block, queues[c], unused[c] = _draw(rng, members[c], queues[c], unused[c], k)
            batches[step, j * k : (j + 1) * k] = block
    return batches


def _pick_classes(rng: np.random.Generator, unused: np.ndarray, p: int) -> np.ndarray:
    """P distinct classes, weighted by unused examples; exhausted classes fill up the
    batch uniformly when fewer than P classes have any left."""
    open_classes = np.flatnonzero(unused > 0)
    if len(open_classes) >= p:
        weights = unused[open_classes] / unused[open_classes].sum()
        return rng.choice(open_classes, size=p, replace=False, p=weights)
    closed = np.flatnonzero(unused == 0)
    return np.concatenate(
        [open_classes, rng.choice(closed, size=p - len(open_classes), replace=False)]
    )


def _draw(
    rng: np.random.Generator, members: np.ndarray, queue: np.ndarray, unused: int, k: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """K examples of one class from the tail of its queue: (block, queue, unused)."""
    if len(members) < k:  # too small: everything once, then repeats
        extra = rng.choice(members, size=k - len(members), replace=True)
        return rng.permutation(np.concatenate([members, extra])), queue, 0
    if unused >= k:
        return queue[unused - k : unused], queue, unused - k
    # The queue runs dry: use its last examples, then start a new full shuffle of the
    # class, skipping those examples for this batch only (they stay in the new queue).
    head = queue[:unused]
    fresh = rng.permutation(members)
    take = np.flatnonzero(~np.isin(fresh, head))[: k - unused]
    block = np.concatenate([head, fresh[take]])
    queue = np.delete(fresh, take)
    return block, queue, len(queue)
