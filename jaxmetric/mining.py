"""Triplet mining per anchor, vmapped over the batch, without any B×B×B tensor.

For one anchor ``a`` let ``d_p`` be its distances to its positives and ``d_n`` its
distances to its negatives. The lecture (Kak & Bouman, section 3) splits the negatives
of an (anchor, positive) pair by a margin ``m``:

    hard      d_n <= d_p
    semi-hard d_p <  d_n < d_p + m
    easy      d_n >= d_p + m

and the triplet loss of a selected triplet is ``relu(d_p - d_n + m)``.

**Exact sums in O(B² log B) time and O(B²) memory.** The windows "all", "hard" and
"semi-hard" are (differences of) prefix windows ``d_n < t`` or ``d_n <= t`` with the
threshold ``t = d_p + shift``. Per anchor we sort its row of distances once, with each
positive keyed at ``d_p + shift`` and each negative at ``d_n``. In sorted order,

- ``c_p`` = number of negatives before positive ``p`` = negatives inside p's window;
- ``r_n`` = number of positives after negative ``n`` = windows that contain ``n``.

Every triplet in a prefix window is active (``d_p + m - d_n > 0`` when shift = m), so

    sum_{p} sum_{n in W(p)} (d_p + m - d_n) = sum_p c_p (d_p + m) - sum_n r_n d_n
                                            = sum_j w_j d_j + m * sum_p c_p

with the integer weight row ``w = c`` on positives and ``-r`` on negatives. The window
memberships are piecewise constant in the distances, so ``w`` is also the exact
gradient of the sum with respect to the distance row: the loss is a weighted sum of
the distance matrix and the sort carries no gradient.

Ties are resolved exactly by packing a tie-break bit below the float's bits into one
uint32 key (non-negative float32 values order like their bit patterns). The sort
permutation is found with two stable passes of a single-operand uint32 sort
(LSD radix on 16-bit halves with the row index packed in the low 16 bits); XLA's
single-operand integer sort is several times faster on CPU than a multi-operand or
NaN-aware float sort, and this limits a row to 65,536 entries.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "MAX_ROW_LENGTH",
    "sort_permutation",
    "window_weights",
    "next_negative_index",
]

MAX_ROW_LENGTH = 1 << 16
_LOW16 = np.uint32(0xFFFF)  # numpy: importing must not start a JAX backend


def sort_permutation(keys: jax.Array) -> jax.Array:
    """Indices that sort a uint32 row ascending (ties in any order). int32 (n,).

    Two single-operand sorts: first by the low 16 bits with the index packed in, then
    (stably, by packing the first pass's position) by the high 16 bits.
    """
    n = keys.shape[-1]
    if n > MAX_ROW_LENGTH:
        raise ValueError(f"rows of at most {MAX_ROW_LENGTH} entries are supported; got {n}")
    iota = jnp.arange(n, dtype=jnp.uint32)
    first = jax.lax.sort(((keys & _LOW16) << 16) | iota)
    perm_first = (first & _LOW16).astype(jnp.int32)
    high = jnp.take(keys, perm_first) >> 16
    second = jax.lax.sort((high << 16) | iota)
    return jnp.take(perm_first, (second & _LOW16).astype(jnp.int32))


def _tie_key(values: jax.Array, tag: jax.Array) -> jax.Array:
    """uint32 key ordering non-negative floats by value, then by a 0/1 ``tag``."""
    values = jnp.where(values > 0, values, 0.0)  # canonical +0.0, never -0.0
    bits = jax.lax.bitcast_convert_type(values.astype(jnp.float32), jnp.uint32)
    return (bits << 1) | tag.astype(jnp.uint32)


def window_weights(d, pos, neg, *, shift, strict: bool):
    """Window counts for one anchor's row of distances.

    The window of positive ``p`` holds the negatives with ``d_n < d_p + shift``
    (``strict``) or ``d_n <= d_p + shift`` (not strict).

    Args:
      d: float32 (n,) distances from the anchor (>= 0).
      pos, neg: bool (n,) positives and negatives of this anchor (disjoint).
      shift: scalar threshold offset.
      strict: whether the window boundary is excluded.

    Returns:
      ``(w, count)``: int32 (n,) with ``w_p`` = number of negatives in p's window on
      positives, ``-w_n`` = number of windows containing n on negatives, 0 elsewhere;
      and the int32 number of (positive, negative) pairs inside windows.
    """
    inf = jnp.float32(jnp.inf)
    key_values = jnp.where(pos, d + shift, jnp.where(neg, d, inf))
    # At equal values: strict windows sort the positive first (the tied negative is
    # outside its window), non-strict windows sort it last (inside).
    pos_tag, other_tag = (0, 1) if strict else (1, 0)
    tag = jnp.where(pos, pos_tag, other_tag)
    perm = sort_permutation(_tie_key(key_values, tag))
    pos_sorted = jnp.take(pos, perm).astype(jnp.int32)
    neg_sorted = jnp.take(neg, perm).astype(jnp.int32)
    negs_before = jnp.cumsum(neg_sorted) - neg_sorted
    pos_after = jnp.sum(pos_sorted) - jnp.cumsum(pos_sorted)
    w_sorted = pos_sorted * negs_before - neg_sorted * pos_after
    w = jnp.zeros_like(w_sorted).at[perm].set(w_sorted, unique_indices=True)
    return w, jnp.sum(pos_sorted * negs_before)


def next_negative_index(d, pos, neg):
    """For each positive, the index of the closest negative strictly farther than it.

    Used by FaceNet's semi-hard mining. Returns ``(index, found)``: int32 (n,) column
    indices (meaningful where ``found``), bool (n,) whether such a negative exists.
    """
    n = d.shape[-1]
    inf = jnp.float32(jnp.inf)
    key_values = jnp.where(pos | neg, d, inf)
    # Negatives sort before positives at equal distance, so the next negative after a
    # positive in sorted order is strictly farther.
    perm = sort_permutation(_tie_key(key_values, pos))
    neg_sorted = jnp.take(neg, perm)
    positions = jnp.where(neg_sorted, jnp.arange(n, dtype=jnp.int32), n)
    next_pos = jax.lax.cummin(positions, axis=0, reverse=True)
    found_sorted = next_pos < n
    index_sorted = jnp.take(perm, jnp.minimum(next_pos, n - 1))
    index = jnp.zeros((n,), jnp.int32).at[perm].set(index_sorted, unique_indices=True)
    found = jnp.zeros((n,), bool).at[perm].set(found_sorted, unique_indices=True)
    return index, found
