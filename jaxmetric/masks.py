"""Boolean pair and triplet masks, built with broadcasting and no Python loops.

This follows the lecture's tensor construction (Kak & Bouman, section 4): compare the
label vector as a column with itself as a row, ``labels[:, None] == labels[None, :]``,
and remove the diagonal with ``~eye(B)``.

Padding: a ragged last batch can be padded to a fixed shape; pass ``valid`` (bool (B,),
True for real rows) and padded rows take part in no pair and no triplet.

The (B, B, B) triplet mask is the lecture's reference construction. It is kept for tests
and teaching; no loss in jaxmetric builds it (see :mod:`jaxmetric.mining`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["positive_mask", "negative_mask", "triplet_mask"]


def _valid_or_all(labels: jax.Array, valid) -> jax.Array:
    if valid is None:
        return jnp.ones(labels.shape, dtype=bool)
    valid = jnp.asarray(valid)
    if valid.shape != labels.shape:
        raise ValueError(f"valid must have shape {labels.shape}; got {valid.shape}")
    if valid.dtype != jnp.bool_:
        raise TypeError(f"valid must be a boolean array; got dtype {valid.dtype}")
    return valid


def _labels_vector(labels) -> jax.Array:
    labels = jnp.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must have shape (B,); got shape {labels.shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integers; got dtype {labels.dtype}")
    return labels


def positive_mask(labels, valid=None) -> jax.Array:
    """``m[i, j]`` = labels[i] == labels[j] and i != j, both rows valid. bool (B, B)."""
    labels = _labels_vector(labels)
    valid = _valid_or_all(labels, valid)
    same = labels[:, None] == labels[None, :]
    distinct = ~jnp.eye(labels.shape[0], dtype=bool)
    return same & distinct & valid[:, None] & valid[None, :]


def negative_mask(labels, valid=None) -> jax.Array:
    """``m[i, j]`` = labels[i] != labels[j], both rows valid. bool (B, B)."""
    labels = _labels_vector(labels)
    valid = _valid_or_all(labels, valid)
    return (labels[:, None] != labels[None, :]) & valid[:, None] & valid[None, :]


def triplet_mask(labels, valid=None) -> jax.Array:
    """The lecture's valid-triplet mask ``m[a, p, n]``, bool (B, B, B).

    True where a, p, n are distinct, labels[a] == labels[p], labels[a] != labels[n],
    and all three rows are valid. Memory is B³ bytes: a reference, not for training.
    """
    labels = _labels_vector(labels)
    valid = _valid_or_all(labels, valid)
    b = labels.shape[0]
    not_eye = ~jnp.eye(b, dtype=bool)
    distinct = not_eye[:, :, None] & not_eye[:, None, :] & not_eye[None, :, :]
    same_ap = (labels[:, None] == labels[None, :])[:, :, None]
    diff_an = (labels[:, None] != labels[None, :])[:, None, :]
    ok = valid[:, None, None] & valid[None, :, None] & valid[None, None, :]
    return distinct & same_ap & diff_an & ok
