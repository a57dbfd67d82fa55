r"""The batch of a classifier-style loss: rows against one learned vector per class.

The proxy losses (:mod:`jaxmetric.losses.proxy`) and the margin-softmax losses
(:mod:`jaxmetric.losses.margin_softmax`) compare each row ``x_i`` of the batch with
``C`` learned class vectors ``w_c`` (proxies, or the weights of the last layer), not
with the other rows: there are no pairs of rows, no reference set and no gathered
batch. :func:`gather` gives what they all start from:

- the local rows checked, cast to float32 and their padding zeroed by
  :func:`jaxmetric.losses.pair_batch.gather` (whose all-gathered columns these losses leave
  unused), with its NaN-in-NaN-out flag;
- the class vectors ``(C, D)`` checked and cast to float32; a NaN or ±inf in them
  makes the loss NaN as well;
- the labels checked to lie in ``[0, C)`` (:func:`check_label_range`);
- the cosines :math:`s_{ic} = \cos(x_i, w_c)` of every row to every class vector,
  float32 ``(R, C)``, of the L2-normalised rows and class vectors
  (:func:`jaxmetric.distances.l2_normalize`, norm floor
  :data:`~jaxmetric.utils.NORM_EPS`): the losses are right for non-normalised inputs,
  and a zeroed (padded) row has cosine 0 with every class;
- the masks ``own`` (row ``i`` and its own class ``y_i``) and ``other`` (row ``i`` and
  every other class), both limited to valid rows.

**Several vectors per class.** Sub-center ArcFace and SoftTriple learn ``K`` vectors
(*centers*) per class: ``vectors`` is then ``(C, K, D)``, or ``(C*K, D)`` with class
``c``'s centers in rows ``c*K .. c*K + K - 1`` (pytorch-metric-learning's layout).
With ``centers=K`` and a ``pool`` from the ``(R, C, K)`` cosines to the centers to one
similarity per class ``(R, C)`` (their maximum, or SoftTriple's soft maximum),
``cos`` holds the pooled similarities and everything else works per class as above.

**Labels out of range.** A class id outside ``[0, C)`` on a valid row has no class
vector. With concrete labels (outside ``jit``, ``vmap``, ``shard_map``) that is a
``ValueError``; a traced label cannot be checked, so there the rule of non-finite
inputs applies: such a row makes the loss and the info NaN (on every device under
``axis_name``). Padded rows (``valid = False``) may hold any label.

:func:`pair_info` and :func:`row_loss` give the ``info`` entries and reductions the
losses share: the pairs are the (row, class) pairs, positive for the row's own class
and negative for every other class, and their distance is the cosine distance
:math:`1 - s_{ic}`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmetric import distances
from jaxmetric.losses import pair_batch as batch_lib
from jaxmetric.losses import reductions
from jaxmetric.losses.reductions import Terms, safe_mean
from jaxmetric.utils import check_choice

__all__ = [
    "ROW_REDUCTIONS",
    "ClassBatch",
    "check_class_vectors",
    "check_label_range",
    "gather",
    "largest_other",
    "nan_if_out_of_range",
    "pair_info",
    "row_loss",
]

ROW_REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")
"""The reductions of the losses with one term per row: the mean over the valid rows of
the global batch, their sum, or each row's own term. (``"mean_nonzero"`` is left out:
these terms are almost never exactly zero, so it would be the mean under another name.)"""


class ClassBatch(NamedTuple):
    """Rows against class vectors (module docstring)."""

    batch: batch_lib.Batch  # the rows; ``batch.nan_if_nonfinite`` covers all inputs
    vectors: jax.Array      # float32 (C, D) the class vectors as given (not normalised)
    cos: jax.Array          # float32 (R, C) cosines of rows to class vectors, in [-1, 1]
    same: jax.Array         # bool (R, C) labels[i] == c, whatever valid says
    own: jax.Array          # bool (R, C) same & valid row
    other: jax.Array        # bool (R, C) ~same & valid row


def check_class_vectors(vectors, dim: int, *, name: str = "proxies",
                        min_classes: int = 1, centers: int | None = None) -> jax.Array:
    """``vectors`` as float32 ``(C, D)`` after checking its shape against the embedding
    dimension ``dim`` and that ``C >= min_classes``; with ``centers=K`` (an int, 1
    included), ``(C*K, D)`` from ``(C, K, D)`` or ``(C*K, D)`` (module docstring)."""
    vectors = jnp.asarray(vectors)
    if centers is not None:
        if vectors.ndim == 3 and vectors.shape[1] != centers:
            raise ValueError(f"{name} of shape (C, K, D) must hold K = centers = {centers} "
                             f"vectors per class; got shape {vectors.shape}")
        if vectors.ndim == 3:
            vectors = vectors.reshape(-1, vectors.shape[2])
        elif vectors.ndim != 2 or vectors.shape[0] % centers:
            raise ValueError(f"{name} must have shape (C, K, D) or (C*K, D) with K = "
                             f"centers = {centers} vectors per class; got shape "
                             f"{vectors.shape}")
    if vectors.ndim != 2:
        raise ValueError(f"{name} must have shape (C, D), one row per class; "
                         f"got shape {vectors.shape}")
    if not jnp.issubdtype(vectors.dtype, jnp.floating):
        raise TypeError(f"{name} must be floating point; got dtype {vectors.dtype}")
    if vectors.shape[1] != dim:
        raise ValueError(f"{name} have dimension {vectors.shape[1]} but embeddings have {dim}")
    k = 1 if centers is None else centers
    if vectors.shape[0] < min_classes * k:
        raise ValueError(f"{name} must hold at least {min_classes} classes; "
                         f"got {vectors.shape[0] // k}")
    return vectors.astype(jnp.float32)


def check_label_range(labels, valid, num_classes: int, *, name: str = "proxies",
                      per_class: str = "row") -> None:
    """Raises ``ValueError`` if a valid row's concrete label is outside
    ``[0, num_classes)`` (``valid=None``: every row); traced labels pass (module
    docstring). The message names ``name``, which holds one ``per_class`` (``"row"``,
    ``"entry"``) per class."""
    if isinstance(labels, jax.core.Tracer) or isinstance(valid, jax.core.Tracer):
        return
    lab = np.asarray(labels)
    if valid is not None:
        lab = lab[np.asarray(valid)]
    bad = (lab < 0) | (lab >= num_classes)
    if bad.any():
        raise ValueError(
            f"labels must be class ids in [0, {num_classes}) (one {per_class} of {name} "
            f"per class); got {sorted(set(lab[bad].tolist()))[:5]}")


def nan_if_out_of_range(labels, valid, num_classes: int, axis_name) -> jax.Array:
    """NaN if a valid row's label on any device of ``axis_name`` is outside
    ``[0, num_classes)``, else 0: the traced half of the rule (module docstring), a
    float32 scalar without gradient, equal on every device."""
    out_of_range = valid & ((labels < 0) | (labels >= num_classes))
    num_bad = jax.lax.stop_gradient(reductions.total(out_of_range, axis_name))
    return jnp.where(num_bad > 0, jnp.float32(jnp.nan), jnp.float32(0.0))


def gather(embeddings, labels, vectors, valid=None, axis_name=None, *,
           name: str = "proxies", min_classes: int = 1, centers: int | None = None,
           pool=None) -> ClassBatch:
    """The :class:`ClassBatch` of the local rows against the class ``vectors`` (C, D).

    Args:
      embeddings: (B, D) float, this device's rows (any float dtype; float32 here).
      labels: (B,) int class ids in ``[0, C)``.
      vectors: (C, D) float, one learned vector per class.
      valid: optional bool (B,); padded rows are zeroed.
      axis_name: mapped axis of the data-parallel batch, or None.
      name: what to call ``vectors`` in error messages.
      min_classes: the fewest classes that make the loss defined.
      centers: ``K``, the vectors per class (module docstring); ``vectors`` is then
        ``(C, K, D)`` or ``(C*K, D)``. None: one per class, ``(C, D)``.
      pool: with ``centers``, ``(R, C, K)`` cosines to the centers ->
        ``(R, C)`` similarities to the classes.
    """
    b = batch_lib.gather(embeddings, labels, valid, axis_name, min_columns=1)
    vectors = check_class_vectors(vectors, b.anchors.shape[1], name=name,
                                  min_classes=min_classes, centers=centers)
    num_classes = vectors.shape[0] // (1 if centers is None else centers)
    check_label_range(labels, valid, num_classes, name=name)
    nan = (b.nan_if_nonfinite + batch_lib.nan_if_nonfinite(vectors, None)  # replicated
           + nan_if_out_of_range(b.anchor_labels, b.anchor_valid, num_classes, axis_name))
    b = b._replace(nan_if_nonfinite=nan)
    cos = 1.0 - distances.cross_cosine_distances(b.anchors, vectors)
    if pool is not None:
        cos = pool(cos.reshape(cos.shape[0], num_classes, -1))
    same = b.anchor_labels[:, None] == jnp.arange(num_classes, dtype=b.anchor_labels.dtype)
    valid_rows = b.anchor_valid[:, None]
    return ClassBatch(b, vectors, cos, same, same & valid_rows, ~same & valid_rows)


def largest_other(cb: ClassBatch, logits) -> jax.Array:
    """float32 (R,) the largest of each row's ``logits`` (R, C) over the other classes;
    ``-inf`` for a row with none (one class)."""
    return jnp.max(jnp.where(cb.same, -jnp.inf, logits), axis=1, initial=-jnp.inf)


def pair_info(cb: ClassBatch, axis_name) -> dict[str, jax.Array]:
    """Counts and mean cosine distances of the (row, class) pairs of the global batch:
    ``num_pos_pairs`` (valid rows with their own class), ``num_neg_pairs`` (valid rows
    with every other class), ``mean_pos_distance`` and ``mean_neg_distance`` (mean of
    :math:`1 - s_{ic}` over those pairs)."""
    total = lambda x: reductions.total(x, axis_name)  # noqa: E731
    num_pos, num_neg = total(cb.own), total(cb.other)
    dist = 1.0 - cb.cos
    return {
        "num_pos_pairs": num_pos,
        "num_neg_pairs": num_neg,
        "mean_pos_distance": safe_mean(total(jnp.where(cb.own, dist, 0.0)), num_pos),
        "mean_neg_distance": safe_mean(total(jnp.where(cb.other, dist, 0.0)), num_neg),
    }


def row_loss(cb: ClassBatch, per_row, active, reduction: str, axis_name):
    """``(loss, info)`` of a loss with one term ``per_row`` (R,) per valid row.

    ``per_row`` must be finite on padded rows too (it is masked with ``where``);
    ``active`` (bool (R,)) marks the rows counted in ``active_fraction``. Info:
    ``num_rows`` (valid rows of the global batch), ``num_active_rows``,
    ``active_fraction`` (their ratio), :func:`pair_info`, and with ``"none"``
    ``anchor_num_selected`` / ``anchor_num_active`` (1 or 0 per row). The non-finite
    rule applies to all but the counts fixed by labels and ``valid``.
    """
    check_choice("reduction", reduction, ROW_REDUCTIONS)
    valid = cb.batch.anchor_valid
    terms = Terms(jnp.where(valid, per_row, 0.0), valid.astype(jnp.float32),
                  (valid & active).astype(jnp.float32))
    loss, ((_, num_rows, num_active),) = reductions.reduce((terms,), reduction, axis_name)
    info = {
        "num_rows": num_rows,
        "num_active_rows": num_active,
        "active_fraction": safe_mean(num_active, num_rows),
        **pair_info(cb, axis_name),
    }
    if reduction == "none":
        info.update(reductions.anchor_info((terms,)))
    exact = ("num_rows", "num_pos_pairs", "num_neg_pairs")
    return batch_lib.propagate_nonfinite(cb.batch, loss, info, exact)
