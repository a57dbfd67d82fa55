r"""Triplet mining: one pure function per mode, applied anchor by anchor, no B×B×B tensor.

**The strategy contract.** A mining mode is a function of *one* anchor's row::

    strategy(d, pos, neg, *, margin) -> Mined(weights, num_selected, num_active)

with ``d`` float32 (B,) the anchor's distances to every row of the (global) batch
(>= 0, without gradient), ``pos`` / ``neg`` bool (B,) its positives and negatives
(disjoint; the anchor itself and padded rows are in neither) and ``margin`` a Python
float >= 0. It returns fixed-shape results whatever the labels:

- ``weights``: float32 (B,), non-zero only on ``pos | neg``, such that the anchor's
  loss over the triplets the mode selects is

  .. math::  L_a = \sum_{(p, n) \text{ selected}} [\,d_p - d_n + m\,]_+
                 = \sum_j w_j\, d_j + m \cdot \mathrm{num\_active}

  and ``w`` is also the gradient of :math:`L_a` with respect to ``d`` (the selection
  is piecewise constant in ``d``; each active triplet puts +1 on p and -1 on n);
- ``num_selected``, ``num_active``: float32 scalars, the triplets the mode selects
  and those among them with a positive loss.

:data:`STRATEGIES` maps each mode's name to its function (the names are
:data:`MODES`); :func:`mine` applies one to every anchor, a bounded chunk of rows at
a time. :func:`jaxmetric.losses.triplet_loss` turns the result into
``sum(weights * d) + margin * num_active`` per anchor, so the loss is a weighted sum of
the distance matrix and nothing is differentiated through a sort or an ``argmin``. A
new mode is one function here with the ``_strategy`` decorator (and one case in
the tests' Python-loop oracle); a callable with this signature can also be passed
as ``triplet_loss(mining=...)`` directly.

**The window modes.**
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

**The one-negative modes** (``hardest_negative``, ``batch_hard``,
``semihard_facenet``) pick, per positive or per anchor, one negative by a ``min`` /
``max`` / sort and write +1 / -1 weights for each active triplet. Where several
entries tie for a ``min`` or ``max``, the weight is shared equally among them (the
gradient ``jnp.min`` / ``jnp.max`` would give).

**Distance-weighted sampling** (:func:`distance_weighted_negatives`; Wu et al. 2017,
"Sampling Matters in Deep Embedding Learning"). On the unit sphere in :math:`D`
dimensions the distances of random pairs follow

.. math::  q(d) \propto d^{D-2} \bigl(1 - \tfrac{d^2}{4}\bigr)^{\frac{D-3}{2}},

concentrated near :math:`\sqrt 2`, so uniformly drawn negatives are almost all at that
distance. Drawing negative :math:`n` of anchor :math:`a` with probability
:math:`\propto 1 / q(d_{an})` spreads the draws over all distances instead; the paper
clips :math:`d` below at a ``cutoff`` (0.5: the weights would explode near 0) and gives
weight 0 to negatives at :math:`d \ge` ``nonzero_loss_cutoff`` (1.4), whose margin-loss
term is zero anyway. In logs, stably,

.. math::  \log w_{an} = (2 - D) \log \bar d_{an}
           - \tfrac{D - 3}{2} \log\bigl(1 - \tfrac{\bar d_{an}^2}{4}\bigr),
           \qquad \bar d = \max(d, \mathrm{cutoff}),

minus each row's maximum (an anchor's probabilities do not change), ``-inf`` (weight 0)
at :math:`\bar d \ge 2` (antipodal rows, where :math:`q = 0`) and beyond the nonzero-loss
cutoff; these are the weights of pytorch-metric-learning's ``DistanceWeightedMiner``.
One negative is drawn per (anchor, column) by inverse transform sampling: a uniform
:math:`u` times the row's total weight, looked up in the row's cumulative weights
(``searchsorted``): :math:`O(B \log B)` per anchor, no :math:`B^3` Gumbel noise.
*Keys.* Anchor :math:`a`'s uniforms come from ``fold_in(key, a)`` with :math:`a` its
position in the global batch, so the draws of an anchor do not depend on which device
holds it: ``N`` devices, each drawing for its own anchors against the all-gathered
batch, draw what one device draws on the concatenated batch with the same key (the
same uniforms against the same weights: only a last-bit difference in a device's
distances, moving a boundary of the cumulative weights past a uniform, could change a
draw).

**The lecture's masks** (:func:`positive_mask`, :func:`negative_mask`,
:func:`triplet_mask`). The boolean tables the selection starts from, built with
broadcasting and no Python loops as in the lecture (Kak & Bouman, section 4): compare
the label vector as a column with itself as a row, ``labels[:, None] == labels[None, :]``,
and remove the diagonal with ``~eye(B)``; ``valid`` (bool (B,)) drops padded rows from
every pair and triplet. The losses build the same (B, B) masks for a shard of anchors
against the global batch (:func:`jaxmetric.losses.pair_batch.pair_masks`); the (B, B, B)
triplet mask is the lecture's reference construction, kept for tests and teaching: no
loss builds it.
"""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "DWS_CUTOFF",
    "DWS_NONZERO_LOSS_CUTOFF",
    "distance_weighted_negatives",
    "negative_mask",
    "positive_mask",
    "triplet_mask",
    "MAX_ROW_LENGTH",
    "MODES",
    "Mined",
    "STRATEGIES",
    "Strategy",
    "mine",
    "next_negative_index",
    "sort_permutation",
    "window_weights",
]

MAX_ROW_LENGTH = 1 << 16
# Rows of the (anchors × batch) distance matrix mined at once: bounds the sort's
# working memory to a few hundred MiB whatever the batch size.
_CHUNK_ELEMENTS = 1 << 22
_LOW16 = np.uint32(0xFFFF)  # numpy: importing must not start a JAX backend


def sort_permutation(keys: jax.Array) -> jax.Array:
    """Indices that sort a uint32 row ascending, stably (ties keep index order). int32 (n,).

    Two single-operand sorts: first by the low 16 bits with the index packed in, then
    (stably, by packing the first pass's position) by the high 16 bits. Equal to
    ``np.argsort(keys, kind="stable")``; rows longer than :data:`MAX_ROW_LENGTH`
    raise ``ValueError``.
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


# --------------------------------------------------------------------- the strategies


class Mined(NamedTuple):
    """A strategy's result: for one anchor, or stacked over anchors by :func:`mine`."""

    weights: jax.Array       # float32 (B,): loss = sum(weights * d) + margin * num_active
    num_selected: jax.Array  # float32 (): triplets the mode selects
    num_active: jax.Array    # float32 (): selected triplets with a positive loss


Strategy = Callable[..., Mined]  # (d, pos, neg, *, margin: float) -> Mined

_STRATEGIES: dict[str, Strategy] = {}

STRATEGIES: MappingProxyType[str, Strategy] = MappingProxyType(_STRATEGIES)
"""Mining mode name -> per-anchor strategy (read-only; the contract is in the module
docstring)."""


def _strategy(name: str):
    """Registers the decorated per-anchor function as mining mode ``name``."""

    def register(fn: Strategy) -> Strategy:
        if name in _STRATEGIES:
            raise ValueError(f"mining mode {name!r} is registered twice")
        _STRATEGIES[name] = fn
        return fn

    return register


def _mined(weights, num_selected, num_active) -> Mined:
    f32 = lambda x: jnp.asarray(x).astype(jnp.float32)  # noqa: E731
    return Mined(f32(weights), f32(num_selected), f32(num_active))


def _nothing(d) -> Mined:
    return _mined(jnp.zeros_like(d), 0, 0)


def _num_triplets(pos, neg):
    """Valid triplets of the anchor, exact in int32 (at most B²/4 = 2³⁰ at B = 2¹⁶)."""
    return jnp.sum(pos, dtype=jnp.int32) * jnp.sum(neg, dtype=jnp.int32)


def _share(mask):
    """``mask`` as float32 weights summing to 1 (0 if empty): a tie split equally."""
    m = mask.astype(jnp.float32)
    return m / jnp.maximum(jnp.sum(m), 1.0)


@_strategy("all")
def _all(d, pos, neg, *, margin: float) -> Mined:
    """Every valid triplet. The active ones, ``d_n < d_p + m``, are one prefix window."""
    w, count = window_weights(d, pos, neg, shift=margin, strict=True)
    return _mined(w, _num_triplets(pos, neg), count)


@_strategy("hard")
def _hard(d, pos, neg, *, margin: float) -> Mined:
    """``d_n <= d_p``: the window with shift 0, not strict.

    All of them are active when ``m > 0``; at ``m = 0`` the ties ``d_n = d_p`` have a
    zero loss (their +1 / -1 weights cancel in value), so the active ones are the
    strict window, counted by a second sort.
    """
    w, count = window_weights(d, pos, neg, shift=0.0, strict=False)
    if margin > 0:
        return _mined(w, count, count)
    _, active = window_weights(d, pos, neg, shift=0.0, strict=True)
    return _mined(w, count, active)


@_strategy("semihard")
def _semihard(d, pos, neg, *, margin: float) -> Mined:
    """``d_p < d_n < d_p + m``: the "all" window minus the "hard" window; all active."""
    if margin == 0:  # the window d_p < d_n < d_p is empty
        return _nothing(d)
    w_all, c_all = window_weights(d, pos, neg, shift=margin, strict=True)
    w_hard, c_hard = window_weights(d, pos, neg, shift=0.0, strict=False)
    count = c_all - c_hard
    return _mined(w_all - w_hard, count, count)


@_strategy("easy")
def _easy(d, pos, neg, *, margin: float) -> Mined:
    """``d_n >= d_p + m``: the complement of the "all" window; every loss is 0."""
    _, c_all = window_weights(d, pos, neg, shift=margin, strict=True)
    return _mined(jnp.zeros_like(d), _num_triplets(pos, neg) - c_all, 0)


def _closest(d, mask):
    return jnp.min(jnp.where(mask, d, jnp.finfo(jnp.float32).max))


@_strategy("hardest_negative")
def _hardest_negative(d, pos, neg, *, margin: float) -> Mined:
    """Each positive with the anchor's closest negative ``n*``: ``[d_p - d_{n*} + m]_+``."""
    closest = _closest(d, neg)
    has_neg = jnp.any(neg)
    active = pos & has_neg & (d - closest + margin > 0)
    num_active = jnp.sum(active, dtype=jnp.int32)
    w = active - num_active * _share(neg & (d == closest))
    return _mined(w, jnp.sum(pos, dtype=jnp.int32) * has_neg, num_active)


@_strategy("batch_hard")
def _batch_hard(d, pos, neg, *, margin: float) -> Mined:
    """One triplet per anchor: its farthest positive and closest negative (Hermans et al.)."""
    farthest = jnp.max(jnp.where(pos, d, 0.0))
    closest = _closest(d, neg)
    selected = jnp.any(pos) & jnp.any(neg)
    active = selected & (farthest - closest + margin > 0)
    w = active * (_share(pos & (d == farthest)) - _share(neg & (d == closest)))
    return _mined(w, selected, active)


@_strategy("semihard_facenet")
def _semihard_facenet(d, pos, neg, *, margin: float) -> Mined:
    """Each positive with the closest negative strictly farther than it, else the
    anchor's farthest negative (FaceNet; TF-Addons' ``triplet_semihard_loss``)."""
    index, found = next_negative_index(d, pos, neg)
    farthest = jnp.argmax(jnp.where(neg, d, -1.0)).astype(jnp.int32)
    index = jnp.where(found, index, farthest)
    selected = pos & jnp.any(neg)
    active = selected & (d - jnp.take(d, index) + margin > 0)
    w = active - jnp.zeros(d.shape, jnp.int32).at[index].add(active.astype(jnp.int32))
    return _mined(w, jnp.sum(selected, dtype=jnp.int32), jnp.sum(active, dtype=jnp.int32))


MODES: tuple[str, ...] = tuple(STRATEGIES)
"""The built-in mining modes, in registration order."""


def mine(strategy: Strategy, d: jax.Array, pos: jax.Array, neg: jax.Array, *,
         margin: float) -> Mined:
    """Applies a per-anchor ``strategy`` to every row of ``d``.

    Args:
      strategy: a :data:`STRATEGIES` value or any function with that contract.
      d: float32 (R, B) distances of R anchors to the batch (>= 0); mined without
        gradient.
      pos, neg: bool (R, B) the anchors' positives and negatives.
      margin: the margin, a Python float >= 0.

    Returns:
      :class:`Mined` with float32 ``weights`` (R, B) and counts (R,), without
      gradient. Rows go through ``strategy`` (vmapped) a chunk of at most 2²² elements
      at a time, which bounds the sorts' working memory whatever the batch size.
    """
    d = jax.lax.stop_gradient(jnp.asarray(d, jnp.float32))
    rows, cols = d.shape
    chunk = max(1, min(rows, _CHUNK_ELEMENTS // max(cols, 1)))
    out = jax.lax.map(lambda a: strategy(*a, margin=margin), (d, pos, neg), batch_size=chunk)
    weights, num_selected, num_active = out
    chex.assert_shape(weights, (rows, cols),
                      custom_message="mining weights must be (B,) per anchor")
    chex.assert_shape([num_selected, num_active], (rows,),
                      custom_message="mining counts must be scalars per anchor")
    return Mined(*(jax.lax.stop_gradient(jnp.asarray(x).astype(jnp.float32)) for x in out))


# ------------------------------------------------------- distance-weighted sampling

DWS_CUTOFF = 0.5
"""Distance-weighted sampling: distances are clipped below at this (Wu et al. 2017)."""
DWS_NONZERO_LOSS_CUTOFF = 1.4
"""Distance-weighted sampling: negatives this far or farther are never drawn."""


def distance_weighted_negatives(key: jax.Array, d: jax.Array, neg: jax.Array,
                                anchor_index: jax.Array, *, dim: int,
                                cutoff: float = DWS_CUTOFF,
                                nonzero_loss_cutoff: float = DWS_NONZERO_LOSS_CUTOFF):
    r"""One negative per (anchor, column), drawn with probability :math:`\propto 1 / q(d)`
    (module docstring: distance-weighted sampling).

    Args:
      key: PRNG key of this draw (the same on every device).
      d: float32 (R, C) Euclidean distances of the L2-normalised anchors to the
        columns, in [0, 2] (used without gradient).
      neg: bool (R, C) the anchors' negatives (the only columns drawn).
      anchor_index: int32 (R,) each anchor's position in the global batch: anchor
        ``a`` draws with ``fold_in(key, a)``.
      dim: ``D``, the embedding dimension (of the sphere the rows lie on).
      cutoff, nonzero_loss_cutoff: the paper's clipping (module docstring).

    Returns:
      ``(index, has_negative)``: int32 (R, C), for every column ``j`` the column of the
      negative drawn for the pair (anchor, ``j``) (used for the positive columns; each
      draw independent), and bool (R,), whether the anchor has any negative of non-zero
      weight (if not, ``index`` is meaningless).
    """
    d = jax.lax.stop_gradient(jnp.asarray(d, jnp.float32))
    clipped = jnp.maximum(d, cutoff)
    inside = clipped < 2.0
    one_minus = jnp.where(inside, 1.0 - 0.25 * clipped * clipped, 1.0)
    log_w = (2.0 - dim) * jnp.log(clipped) - 0.5 * (dim - 3.0) * jnp.log(one_minus)
    eligible = neg & inside & (d < nonzero_loss_cutoff)
    log_w = jnp.where(eligible, log_w, -jnp.inf)
    top = jnp.max(log_w, axis=1, keepdims=True, initial=-jnp.inf)
    has = jnp.isfinite(top[:, 0])
    w = jnp.where(eligible, jnp.exp(log_w - jnp.where(has[:, None], top, 0.0)), 0.0)
    cdf = jnp.cumsum(w, axis=1)
    cols = d.shape[1]
    last = jnp.max(jnp.where(eligible, jnp.arange(cols, dtype=jnp.int32), 0), axis=1)

    def draw(a, cdf_row, last_row):
        u = jax.random.uniform(jax.random.fold_in(key, a), (cols,), jnp.float32)
        idx = jnp.searchsorted(cdf_row, u * cdf_row[-1], side="right")
        return jnp.minimum(idx, last_row).astype(jnp.int32)

    index = jax.vmap(draw)(jnp.asarray(anchor_index, jnp.int32), cdf, last)
    return index, has


# ------------------------------------------------------------- the lecture's masks



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
