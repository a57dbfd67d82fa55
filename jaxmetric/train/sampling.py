"""Per-epoch batch indices, generated on the host.

Each function returns an int32 array (steps, batch_size) of example indices for one
epoch. Every batch has the same shape, so a jitted train step compiles once; the trainer
gathers ``images[indices[step]]`` from a device-resident training set. All randomness
comes from the ``np.random.Generator`` passed in, so a seed fixes the epoch.
"""

from __future__ import annotations

import numpy as np

__all__ = ["class_balanced_batches", "shuffled_batches", "steps_per_epoch"]


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
