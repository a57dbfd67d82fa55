r"""The batch a loss sees: checked inputs, padding, the global batch, a reference set.

Every loss in :mod:`jaxmetric.losses` starts here. :func:`gather` turns the local
``embeddings (B, D)``, ``labels (B,)`` and ``valid (B,)`` into a :class:`Batch` of
*anchors* (this device's rows) against *columns* (the rows the anchors are paired
with):

- **Padding.** Rows with ``valid = False`` are replaced by zeros before any arithmetic
  and take part in no pair, so whatever they hold (stale data, NaN, inf) changes
  neither the loss nor any gradient (a masked-out ``0 * NaN`` would still be NaN).
- **Global batch.** Inside ``jax.shard_map`` / ``jax.pmap`` with ``axis_name``, the
  columns are the all-gathered embeddings, labels and flags of every device: each
  device pairs its own anchors with the global batch, and ``anchor_index`` is each
  anchor's position in it (to leave out the pair of a row with itself).
- **Reference set** (query vs reference; cross-batch memory). With
  ``ref_embeddings (M, D)`` and ``ref_labels (M,)`` the columns are the reference rows
  instead: anchors come from the batch, positives and negatives from the reference, and
  no pair is left out as "self" (the reference is another set of rows). The reference
  is *global*: it is used as given on every device, never gathered, so under
  ``axis_name`` pass the same arrays on every device (a cross-batch memory that
  enqueues the gathered batch is). ``ref_valid (M,)`` marks its real rows (e.g. the
  filled slots of a memory).
- **Non-finite rows: NaN in, NaN out.** ``nan_if_nonfinite`` is NaN when any valid row
  of the global batch or of the reference holds a NaN or ±inf, else 0, without
  gradient; :func:`propagate_nonfinite` adds it to a loss and its info, so such a
  batch can never hide behind a finite loss (the masks and the hinge would otherwise
  swallow the bad row while its gradient is NaN).

:func:`distance_matrix` and :func:`pair_masks` then give the ``(R, C)`` distances and
the positive / negative masks of the anchors against the columns.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from jaxmetric import distances
from jaxmetric.losses import reductions
from jaxmetric.losses.reductions import Terms, safe_mean, total

__all__ = [
    "Batch",
    "anchor_loss_finish",
    "anchor_terms",
    "check_embeddings",
    "distance_matrix",
    "finish",
    "gather",
    "nan_if_nonfinite",
    "pair_distance_info",
    "pair_masks",
    "propagate_nonfinite",
]


class Batch(NamedTuple):
    """Anchors (this device's rows) against the columns (global batch or reference)."""

    anchors: jax.Array          # float32 (R, D)
    anchor_labels: jax.Array    # (R,)
    anchor_valid: jax.Array     # bool (R,)
    anchor_index: jax.Array     # int32 (R,) position of each anchor in the global batch
    batch: jax.Array            # float32 (C, D) the columns
    labels: jax.Array           # (C,)
    valid: jax.Array            # bool (C,)
    nan_if_nonfinite: jax.Array  # float32 () NaN if a valid row anywhere is non-finite
    is_reference: bool = False  # columns are a reference set (no "self" pairs)


def check_embeddings(embeddings, labels, valid=None, *, name: str = "embeddings"):
    """Checks shapes and dtypes; returns float32 embeddings, labels and bool ``valid``.

    ``valid=None`` means every row is real.
    """
    embeddings = jnp.asarray(embeddings)
    labels = jnp.asarray(labels)
    label_name = "labels" if name == "embeddings" else name.replace("embeddings", "labels")
    if embeddings.ndim != 2:
        raise ValueError(f"{name} must have shape (B, D); got shape {embeddings.shape}")
    if not jnp.issubdtype(embeddings.dtype, jnp.floating):
        raise TypeError(f"{name} must be floating point; got dtype {embeddings.dtype}")
    if labels.ndim != 1:
        raise ValueError(f"{label_name} must have shape (B,); got shape {labels.shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(
            f"{label_name} must be an integer array (class ids); got dtype {labels.dtype}"
        )
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"{name} and {label_name} disagree on the batch size: "
            f"{embeddings.shape[0]} embeddings but {labels.shape[0]} labels"
        )
    valid_name = "valid" if name == "embeddings" else name.replace("embeddings", "valid")
    if valid is None:
        valid = jnp.ones(labels.shape, dtype=bool)
    else:
        valid = jnp.asarray(valid)
        if valid.shape != labels.shape:
            raise ValueError(f"{valid_name} must have shape {labels.shape}; got {valid.shape}")
        if valid.dtype != jnp.bool_:
            raise TypeError(f"{valid_name} must be a boolean array; got dtype {valid.dtype}")
    return embeddings.astype(jnp.float32), labels, valid


def nan_if_nonfinite(embeddings, axis_name) -> jax.Array:
    """NaN if any row of ``embeddings`` on any device of ``axis_name`` is non-finite, else 0.

    Padded rows must already be zero. A float32 scalar without gradient, equal on every
    device; ``axis_name=None`` looks at the given rows only.
    """
    bad_rows = ~jnp.all(jnp.isfinite(embeddings), axis=1)
    num_bad = jax.lax.stop_gradient(total(bad_rows, axis_name))
    return jnp.where(num_bad > 0, jnp.float32(jnp.nan), jnp.float32(0.0))


def gather(embeddings, labels, valid=None, axis_name=None, *, ref_embeddings=None,
           ref_labels=None, ref_valid=None, min_columns: int = 2) -> Batch:
    """The :class:`Batch` of the local rows against the global batch or the reference.

    Args:
      embeddings: (B, D) float, this device's rows (any float dtype; float32 here).
      labels: (B,) int.
      valid: optional bool (B,); padded rows are zeroed.
      axis_name: mapped axis to gather the batch over, or None.
      ref_embeddings, ref_labels: optional (M, D) float and (M,) int reference set,
        given together; the same on every device (module docstring).
      ref_valid: optional bool (M,) real rows of the reference.
      min_columns: the fewest columns that make the loss defined.
    """
    embeddings, labels, valid = check_embeddings(embeddings, labels, valid)
    embeddings = jnp.where(valid[:, None], embeddings, 0.0)
    nan = nan_if_nonfinite(embeddings, axis_name)
    local = labels.shape[0]
    offset = 0
    if axis_name is not None:
        offset = jax.lax.axis_index(axis_name).astype(jnp.int32) * local
    index = offset + jnp.arange(local, dtype=jnp.int32)

    if (ref_embeddings is None) != (ref_labels is None):
        raise ValueError("ref_embeddings and ref_labels must be given together")
    if ref_embeddings is None:
        if ref_valid is not None:
            raise ValueError("ref_valid needs ref_embeddings and ref_labels")
        if axis_name is None:
            cols = (embeddings, labels, valid)
        else:
            gather_ = lambda x: jax.lax.all_gather(x, axis_name, tiled=True)  # noqa: E731
            cols = (gather_(embeddings), gather_(labels), gather_(valid))
        is_reference = False
    else:
        ref, ref_labels, ref_valid = check_embeddings(ref_embeddings, ref_labels, ref_valid,
                                                      name="ref_embeddings")
        if ref.shape[1] != embeddings.shape[1]:
            raise ValueError(f"ref_embeddings have dimension {ref.shape[1]} but embeddings "
                             f"have {embeddings.shape[1]}")
        ref = jnp.where(ref_valid[:, None], ref, 0.0)
        nan = nan + nan_if_nonfinite(ref, None)  # replicated: counted once, not psum-ed
        cols = (ref, ref_labels, ref_valid)
        is_reference = True
    if cols[1].shape[0] < min_columns:
        what = "reference set" if is_reference else "batch"
        raise ValueError(f"the {what} needs at least {min_columns} rows to form pairs; "
                         f"got {cols[1].shape[0]}")
    return Batch(embeddings, labels, valid, index, *cols, nan, is_reference)


def distance_matrix(b: Batch, distance) -> jax.Array:
    """float32 (R, C) distances of the anchors to the columns, by ``distance`` (a name in
    :data:`jaxmetric.distances.DISTANCES` or a callable)."""
    d = jnp.asarray(distances.resolve(distance)(b.anchors, b.batch))
    chex.assert_shape(d, (b.anchors.shape[0], b.batch.shape[0]),
                      custom_message="distance must map (R, D), (B, D) to (R, B)")
    if not jnp.issubdtype(d.dtype, jnp.floating):
        raise TypeError(f"distance must return floating-point values; got dtype {d.dtype}")
    return d.astype(jnp.float32)


def pair_masks(b: Batch) -> tuple[jax.Array, jax.Array]:
    """Positive and negative masks of the anchors against the columns, bool (R, C).

    Positive: same label, both rows valid, and not the anchor itself (when the columns
    are the batch); negative: different labels, both valid.
    """
    both = b.anchor_valid[:, None] & b.valid[None, :]
    same = b.anchor_labels[:, None] == b.labels[None, :]
    if b.is_reference:
        return same & both, ~same & both
    columns = jnp.arange(b.labels.shape[0], dtype=jnp.int32)
    not_self = b.anchor_index[:, None] != columns[None, :]
    return same & not_self & both, ~same & both


def pair_distance_info(d, pos, neg, axis_name) -> dict[str, jax.Array]:
    """The numbers of positive and negative pairs of the global batch and the mean of
    the (R, C) distances ``d`` over each: ``num_pos_pairs``, ``num_neg_pairs``,
    ``mean_pos_distance``, ``mean_neg_distance`` (float32 scalars; a mean over no pair
    is 0)."""
    num_pos, num_neg = total(pos, axis_name), total(neg, axis_name)
    return {
        "num_pos_pairs": num_pos,
        "num_neg_pairs": num_neg,
        "mean_pos_distance": safe_mean(total(jnp.where(pos, d, 0.0), axis_name), num_pos),
        "mean_neg_distance": safe_mean(total(jnp.where(neg, d, 0.0), axis_name), num_neg),
    }


def propagate_nonfinite(b: Batch, loss, info, exact_keys=()):
    """Adds ``b.nan_if_nonfinite`` to the loss and to every info entry not in
    ``exact_keys`` (the counts fixed by labels and ``valid`` alone stay exact)."""
    nan = b.nan_if_nonfinite
    return loss + nan, {k: v if k in exact_keys else v + nan for k, v in info.items()}


PAIR_COUNTS = ("num_pos_pairs", "num_neg_pairs")
"""The info entries of a pair loss fixed by the labels and ``valid`` alone (exact even
for a batch with a non-finite row)."""


def anchor_terms(anchor_loss, has_term) -> Terms:
    """One term per anchor that has one; active where it is non-zero."""
    active = has_term & (anchor_loss > 0)
    return Terms(anchor_loss, has_term.astype(jnp.float32), active.astype(jnp.float32))


def finish(b: Batch, loss, info, groups, reduction: str, exact=()):
    """A pair loss's last step: the per-anchor info of ``reduction="none"`` and the
    NaN rule (:func:`propagate_nonfinite`)."""
    if reduction == "none":
        info.update(reductions.anchor_info(groups))
    return propagate_nonfinite(b, loss, info, exact)


def anchor_loss_finish(b: Batch, anchor_loss, has_term, d, pos, neg, reduction: str,
                       axis_name, extra=None):
    """``(loss, info)`` of a loss with one term per anchor (the ranking losses, whose
    term is :math:`1 - \\mathrm{AP}` of the anchor's ranking of its positives).

    ``anchor_loss`` (R,) must be finite everywhere (it is masked with ``where``);
    ``has_term`` (bool (R,)) marks the valid anchors that have one (at least one
    positive). Info: :func:`pair_distance_info` of the distances ``d`` (R, C) over the
    masks, ``num_anchors`` (anchors with a term), ``num_active_anchors`` (those whose
    term is > 0), ``active_fraction`` (their ratio), ``extra`` and, with ``"none"``, the
    per-anchor counts; then the NaN rule (exact: the pair counts and ``num_anchors``).
    """
    anchor_loss = jnp.where(has_term, anchor_loss, 0.0)
    groups = (anchor_terms(anchor_loss, has_term),)
    loss, ((_, num_anchors, num_active),) = reductions.reduce(groups, reduction, axis_name)
    info = pair_distance_info(d, pos, neg, axis_name)
    info |= {
        "num_anchors": num_anchors,
        "num_active_anchors": num_active,
        "active_fraction": safe_mean(num_active, num_anchors),
        **(extra or {}),
    }
    return finish(b, loss, info, groups, reduction, PAIR_COUNTS + ("num_anchors",))
