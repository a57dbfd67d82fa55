r"""Pairwise contrastive and triplet losses over all pairs / mined triplets of a batch.

Both losses take a batch of embeddings ``(B, D)`` and integer labels ``(B,)`` and
return ``(loss, info)``: a float32 scalar and a dict of float32 scalars to watch while
training (pair / triplet counts, the active fraction, mean distances). Both are pure
and work under ``jit``, ``vmap`` and ``grad``.

**Data parallelism.** Inside ``jax.shard_map`` or ``jax.pmap`` pass the mapped axis
name as ``axis_name``: each device gives its local shard, the embeddings, labels and
``valid`` flags are all-gathered, every device mines its own anchors against the global
batch, and partial sums are ``psum``-ed. The returned loss equals the single-device loss
on the concatenated batch, and its gradient with respect to each device's local
embeddings is that shard's slice of the single-device gradient (``all_gather``
transposes to a reduce-scatter). The gradient of replicated parameters on one device
is therefore that device's *contribution*; sum it over the axis.

**Padding.** ``valid`` (bool (B,)) marks real rows; padded rows take part in no pair.
They are replaced by zeros before any arithmetic, so whatever they hold (stale data,
NaN, inf) changes neither the loss, nor the info, nor any gradient (a masked-out
``0 * NaN`` would otherwise still be NaN, e.g. in the Gram matmul's gradient).

**Non-finite inputs: NaN in, NaN out.** If any *valid* row of the (global) batch holds
a NaN or ±inf (after the cast to float32), the loss is NaN, on every device, under
``jit``, ``vmap`` and ``axis_name`` alike; padded rows never count (above). Without
this rule the masks swallow such a row while the gradient is NaN, and a run that stops
on a non-finite *loss* goes on with NaN parameters. A NaN row gives NaN squared
distances; an inf row gives a mix of +inf and NaN (``inf - inf`` in the Gram
construction). Then:

- :func:`~jaxmetric.distances.safe_sqrt` keeps ``d > 0`` only, so a NaN squared
  distance becomes a Euclidean distance of 0: the contrastive loss (any reduction and
  power) and every triplet mode with ``squared=False`` come out finite;
- +inf distances vanish in ``relu(m - d) = 0`` (contrastive negatives) and are never
  the ``min`` picked as closest negative (``"hardest_negative"``, ``"batch_hard"``,
  ``"semihard_facenet"``, whose sort keys also map NaN to 0);
- what did show NaN (every squared triplet mode, the windowed modes with inf rows) did
  so by accident: ``min`` propagating NaN, or ``w * d`` summed over whole rows where
  ``0 * NaN = NaN`` — which also let a NaN in a *padded* row poison those losses.

So the rule is applied once, at the end, by one helper, rather than by chasing every
mask:

.. math::  L' = L + \pi, \qquad
           \pi = \begin{cases} \mathrm{NaN} & \exists\, i \text{ valid}, k:\;
           x_{ik} \notin \mathbb{R} \\ 0 & \text{otherwise} \end{cases}

with :math:`\pi` one reduction over the local embeddings, ``psum``-ed over
``axis_name`` and without gradient: finite inputs keep their values and (finite)
gradients. The same :math:`\pi` is added to every info entry computed from distances
(mean distances, selected / active counts and the active fraction), which are
undefined for such a batch; the counts fixed by the labels and ``valid`` alone
(``num_pos_pairs``, ``num_neg_pairs``, ``num_valid_triplets``) stay exact. The
gradient of such a batch is undefined too and is left as it comes out (in practice
NaN).

References:
  R. Hadsell, S. Chopra, Y. LeCun, "Dimensionality Reduction by Learning an Invariant
  Mapping", CVPR 2006 (contrastive loss).
  F. Schroff, D. Kalenichenko, J. Philbin, "FaceNet: A Unified Embedding for Face
  Recognition and Clustering", CVPR 2015 (triplet loss, semi-hard mining).
  A. Hermans, L. Beyer, B. Leibe, "In Defense of the Triplet Loss for Person
  Re-Identification", arXiv:1703.07737, 2017 (batch-hard mining).
  A. Kak, C. Bouman, "Metric Learning", Purdue lecture slides (sections 2-4).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxmetric import distances, mining
from jaxmetric.parallel import varying_axes
from jaxmetric.utils import check_choice

__all__ = ["contrastive_loss", "triplet_loss", "MINING_MODES", "REDUCTIONS"]

MINING_MODES = (
    "all", "hard", "semihard", "easy", "hardest_negative", "batch_hard", "semihard_facenet",
)
REDUCTIONS = ("mean", "mean_nonzero", "sum")

# Rows of the (anchors × batch) distance matrix mined at once: bounds the sort's
# working memory to a few hundred MiB whatever the batch size.
_CHUNK_ELEMENTS = 1 << 22


class _Batch(NamedTuple):
    """Anchors (this device's rows) against the whole (global) batch."""

    anchors: jax.Array        # float32 (R, D)
    anchor_labels: jax.Array  # (R,)
    anchor_valid: jax.Array   # bool (R,)
    anchor_index: jax.Array   # int32 (R,) position of each anchor in the global batch
    batch: jax.Array          # float32 (B, D)
    labels: jax.Array         # (B,)
    valid: jax.Array          # bool (B,)
    nan_if_nonfinite: jax.Array  # float32 () NaN if a valid row anywhere is non-finite, else 0


# ----------------------------------------------------------------------------- checks


def _check_number(name: str, value, *, minimum=None, positive=False):
    """Validates a hyper-parameter when it is concrete; passes tracers through."""
    try:
        v = float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return value
    if math.isnan(v) or (minimum is not None and v < minimum) or (positive and v <= 0):
        bound = "> 0" if positive else f">= {minimum}"
        raise ValueError(f"{name} must be {bound}; got {value}")
    return value


def _static_margin(margin) -> float:
    try:
        m = float(margin)
    except (TypeError, jax.errors.ConcretizationTypeError) as e:
        raise TypeError(
            "triplet_loss margin must be a concrete Python number (it selects the mined "
            "triplets); pass it as a static value, not a traced array"
        ) from e
    if not m >= 0:
        raise ValueError(f"margin must be >= 0; got {margin}")
    return m


def _check_inputs(embeddings, labels, valid):
    embeddings = jnp.asarray(embeddings)
    labels = jnp.asarray(labels)
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must have shape (B, D); got shape {embeddings.shape}")
    if not jnp.issubdtype(embeddings.dtype, jnp.floating):
        raise TypeError(f"embeddings must be floating point; got dtype {embeddings.dtype}")
    if labels.ndim != 1:
        raise ValueError(f"labels must have shape (B,); got shape {labels.shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(
            f"labels must be an integer array (class ids); got dtype {labels.dtype}"
        )
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"embeddings and labels disagree on the batch size: {embeddings.shape[0]} "
            f"embeddings but {labels.shape[0]} labels"
        )
    if valid is None:
        valid = jnp.ones(labels.shape, dtype=bool)
    else:
        valid = jnp.asarray(valid)
        if valid.shape != labels.shape:
            raise ValueError(f"valid must have shape {labels.shape}; got {valid.shape}")
        if valid.dtype != jnp.bool_:
            raise TypeError(f"valid must be a boolean array; got dtype {valid.dtype}")
    return embeddings.astype(jnp.float32), labels, valid


def _gather_batch(embeddings, labels, valid, axis_name) -> _Batch:
    embeddings, labels, valid = _check_inputs(embeddings, labels, valid)
    embeddings = jnp.where(valid[:, None], embeddings, 0.0)  # padding may hold garbage
    nan = _nan_if_nonfinite(embeddings, axis_name)
    local = labels.shape[0]
    if axis_name is None:
        index = jnp.arange(local, dtype=jnp.int32)
        batch = _Batch(embeddings, labels, valid, index, embeddings, labels, valid, nan)
    else:
        gather = lambda x: jax.lax.all_gather(x, axis_name, tiled=True)  # noqa: E731
        offset = jax.lax.axis_index(axis_name).astype(jnp.int32) * local
        index = offset + jnp.arange(local, dtype=jnp.int32)
        batch = _Batch(
            embeddings, labels, valid, index, gather(embeddings), gather(labels), gather(valid),
            nan,
        )
    if batch.labels.shape[0] < 2:
        raise ValueError(
            f"a batch needs at least 2 examples to form pairs; got {batch.labels.shape[0]}"
        )
    return batch


def _pair_rows(b: _Batch, label, valid, index):
    """Positive and negative masks of one anchor against the global batch."""
    columns = jnp.arange(b.labels.shape[0], dtype=jnp.int32)
    both = valid & b.valid
    same = b.labels == label
    return same & (columns != index) & both, ~same & both


def _pair_masks(b: _Batch):
    return jax.vmap(lambda l, v, i: _pair_rows(b, l, v, i))(
        b.anchor_labels, b.anchor_valid, b.anchor_index
    )


def _total(x, axis_name):
    """Sum over all elements, then over the devices of ``axis_name``; float32.

    Each device differentiates only its own partial sum: the ``all_gather`` of the
    inputs already routes every device's cotangents back to their owner. Inside
    ``jax.shard_map`` with varying-axis checking (the default) ``psum`` transposes that
    way by itself; under ``jax.pmap`` (or ``check_vma=False``) it would transpose to a
    second ``psum`` and scale gradients by the device count, so there the cross-device
    part of the value is added without gradient.
    """
    s = jnp.sum(x.astype(jnp.float32))
    if axis_name is None:
        return s
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    if set(names) <= varying_axes(s):
        return jax.lax.psum(s, axis_name)
    return s + jax.lax.stop_gradient(jax.lax.psum(s, axis_name) - s)


def _reduce(loss_sum, num_selected, num_active, reduction):
    if reduction == "sum":
        return loss_sum
    denominator = num_selected if reduction == "mean" else num_active
    return loss_sum / jnp.maximum(denominator, 1.0)


def _safe_mean(total, count):
    return total / jnp.maximum(count, 1.0)


def _nan_if_nonfinite(embeddings, axis_name):
    """NaN if any row of ``embeddings`` on any device of ``axis_name`` is non-finite, else 0.

    The one place of the non-finite rule (module docstring); padded rows are already
    zero here. A float32 scalar without gradient, equal on every device.
    """
    bad_rows = ~jnp.all(jnp.isfinite(embeddings), axis=1)
    num_bad = jax.lax.stop_gradient(_total(bad_rows, axis_name))
    return jnp.where(num_bad > 0, jnp.float32(jnp.nan), jnp.float32(0.0))


def _propagate_nonfinite(b: _Batch, loss, info, exact_keys):
    """Adds ``b.nan_if_nonfinite`` to the loss and to every info entry not in ``exact_keys``."""
    nan = b.nan_if_nonfinite
    return loss + nan, {k: v if k in exact_keys else v + nan for k, v in info.items()}


# ------------------------------------------------------------------------ contrastive


def contrastive_loss(
    embeddings,
    labels,
    *,
    margin=1.0,
    pos_margin=0.0,
    power=2,
    reduction: str = "mean",
    valid=None,
    axis_name=None,
):
    r"""Pairwise contrastive loss (Hadsell et al. 2006; the lecture's section 2).

    Over every ordered pair (i, j), i != j, of valid rows with Euclidean distance
    :math:`d_{ij} = \|x_i - x_j\|_2`:

    .. math::
        \ell_{ij} = \begin{cases}
          [d_{ij} - m_+]_+^{\,p} & y_i = y_j \quad\text{(positive pair)}\\
          [m - d_{ij}]_+^{\,p}   & y_i \ne y_j \quad\text{(negative pair)}
        \end{cases}

    ``power=2, pos_margin=0`` is Hadsell's / the lecture's loss; ``power=1`` is
    pytorch-metric-learning's ``ContrastiveLoss``. Each unordered pair appears in both
    orders (as in PML), which leaves the means unchanged and doubles ``"sum"``.

    Args:
      embeddings: (B, D) float embeddings (any float dtype; computed in float32).
      labels: (B,) integer class labels.
      margin: negative pairs closer than this are penalised.
      pos_margin: positive pairs farther than this are penalised.
      power: exponent ``p`` of each term (> 0).
      reduction: ``"mean"`` over all valid pairs; ``"mean_nonzero"`` averages the
        non-zero positive terms and the non-zero negative terms separately and adds
        the two means (PML's ``AvgNonZeroReducer``); ``"sum"``.
      valid: optional bool (B,) mask of real (non-padding) rows; padded rows may hold
        anything, NaN and inf included.
      axis_name: mapped axis to mine across (see module docstring).

    Returns:
      ``(loss, info)``: float32 scalar; info holds ``num_pos_pairs``,
      ``num_neg_pairs``, ``num_active_pos_pairs``, ``num_active_neg_pairs``,
      ``active_fraction`` (non-zero pairs / valid pairs), ``mean_pos_distance``,
      ``mean_neg_distance``. A NaN or inf in a valid row makes the loss and all but
      the two pair counts NaN (module docstring).
    """
    check_choice("reduction", reduction, REDUCTIONS)
    _check_number("margin", margin, minimum=0.0)
    _check_number("pos_margin", pos_margin, minimum=0.0)
    _check_number("power", power, positive=True)
    b = _gather_batch(embeddings, labels, valid, axis_name)
    d = distances.cross_euclidean_distances(b.anchors, b.batch)
    pos, neg = _pair_masks(b)

    pos_terms = jnp.where(pos, jax.nn.relu(d - pos_margin) ** power, 0.0)
    neg_terms = jnp.where(neg, jax.nn.relu(margin - d) ** power, 0.0)
    total = lambda x: _total(x, axis_name)  # noqa: E731
    num_pos, num_neg = total(pos), total(neg)
    active_pos, active_neg = total(pos_terms > 0), total(neg_terms > 0)
    pos_sum, neg_sum = total(pos_terms), total(neg_terms)

    if reduction == "mean":
        loss = _safe_mean(pos_sum + neg_sum, num_pos + num_neg)
    elif reduction == "mean_nonzero":
        loss = _safe_mean(pos_sum, active_pos) + _safe_mean(neg_sum, active_neg)
    else:
        loss = pos_sum + neg_sum

    info = {
        "num_pos_pairs": num_pos,
        "num_neg_pairs": num_neg,
        "num_active_pos_pairs": active_pos,
        "num_active_neg_pairs": active_neg,
        "active_fraction": _safe_mean(active_pos + active_neg, num_pos + num_neg),
        "mean_pos_distance": _safe_mean(total(jnp.where(pos, d, 0.0)), num_pos),
        "mean_neg_distance": _safe_mean(total(jnp.where(neg, d, 0.0)), num_neg),
    }
    return _propagate_nonfinite(b, loss, info, ("num_pos_pairs", "num_neg_pairs"))


# ---------------------------------------------------------------------------- triplet


def _chunked_rows(fn, d, b: _Batch):
    """``fn(d_row, pos_row, neg_row)`` over every anchor, a bounded chunk at a time."""

    def per_anchor(args):
        d_row, label, valid, index = args
        pos, neg = _pair_rows(b, label, valid, index)
        return fn(d_row, pos, neg)

    chunk = max(1, min(d.shape[0], _CHUNK_ELEMENTS // d.shape[1]))
    args = (d, b.anchor_labels, b.anchor_valid, b.anchor_index)
    return jax.lax.map(per_anchor, args, batch_size=chunk)


def _window_sum(d, b, *, shift, strict):
    """(weights, count) rows of :func:`mining.window_weights`, without gradient."""
    fn = lambda r, p, n: mining.window_weights(r, p, n, shift=shift, strict=strict)  # noqa: E731
    w, count = _chunked_rows(fn, jax.lax.stop_gradient(d), b)
    return jax.lax.stop_gradient(w.astype(jnp.float32)), count


def _windowed_triplets(d, b, mining_mode, margin, num_valid, axis_name):
    """loss sum, #selected, #active for the prefix-window modes (exact, no B³)."""
    total = lambda x: _total(x, axis_name)  # noqa: E731
    zero = jnp.float32(0.0)
    if mining_mode == "semihard" and margin == 0:  # the window d_p < d_n < d_p is empty
        return total(0.0 * d), zero, zero
    if mining_mode in ("all", "semihard", "easy"):
        w_all, c_all = _window_sum(d, b, shift=margin, strict=True)
    if mining_mode in ("hard", "semihard"):
        w_hard, c_hard = _window_sum(d, b, shift=0.0, strict=False)

    if mining_mode == "all":
        return total(w_all * d) + margin * total(c_all), num_valid, total(c_all)
    if mining_mode == "easy":
        # Easy negatives satisfy d_n >= d_p + m, so every term relu(d_p - d_n + m) is 0.
        return total(0.0 * d), num_valid - total(c_all), zero
    if mining_mode == "hard":
        loss_sum = total(w_hard * d) + margin * total(c_hard)
        if margin > 0:
            return loss_sum, total(c_hard), total(c_hard)
        _, c_strict = _window_sum(d, b, shift=0.0, strict=True)  # ties give 0 at m = 0
        return loss_sum, total(c_hard), total(c_strict)
    # semihard: d_p < d_n < d_p + m is the "all" window minus the "hard" window.
    c = total(c_all) - total(c_hard)
    return total((w_all - w_hard) * d) + margin * c, c, c


def _hardest_triplets(d, pos, neg, b, mining_mode, margin, axis_name):
    """loss sum, #selected, #active for the modes that pick one negative per pair."""
    total = lambda x: _total(x, axis_name)  # noqa: E731
    big = jnp.float32(jnp.finfo(jnp.float32).max)
    has_pos = jnp.any(pos, axis=1)
    has_neg = jnp.any(neg, axis=1)
    closest_neg = jnp.min(jnp.where(neg, d, big), axis=1)
    if mining_mode == "batch_hard":
        farthest_pos = jnp.max(jnp.where(pos, d, 0.0), axis=1)
        selected = has_pos & has_neg
        terms = jnp.where(selected, jax.nn.relu(farthest_pos - closest_neg + margin), 0.0)
    else:
        if mining_mode == "hardest_negative":
            d_neg = jnp.broadcast_to(closest_neg[:, None], d.shape)
        else:  # semihard_facenet
            index, found = _chunked_rows(mining.next_negative_index, jax.lax.stop_gradient(d), b)
            farthest_index = jnp.argmax(jnp.where(neg, d, -1.0), axis=1)
            index = jnp.where(found, index, farthest_index[:, None])
            d_neg = jnp.take_along_axis(d, jax.lax.stop_gradient(index), axis=1)
        selected = pos & has_neg[:, None]
        terms = jnp.where(selected, jax.nn.relu(d - d_neg + margin), 0.0)
    return total(terms), total(selected), total(terms > 0)


def triplet_loss(
    embeddings,
    labels,
    *,
    margin=0.2,
    mining: str = "all",
    squared: bool = True,
    reduction: str = "mean",
    valid=None,
    axis_name=None,
):
    r"""Triplet margin loss with batch mining (Schroff et al. 2015; lecture section 3).

    For a triplet (anchor a, positive p, negative n) with distance ``d``:

    .. math::  \ell_{apn} = [\,d(a, p) - d(a, n) + m\,]_+

    where ``d`` is the squared Euclidean distance if ``squared`` (the lecture) and the
    Euclidean distance otherwise. A valid triplet has distinct valid rows with
    ``y_a = y_p != y_n``. ``mining`` chooses the triplets:

    - ``"all"``: every valid triplet;
    - ``"hard"``: ``d(a,n) <= d(a,p)``;
    - ``"semihard"``: ``d(a,p) < d(a,n) < d(a,p) + m``;
    - ``"easy"``: ``d(a,n) >= d(a,p) + m`` (their loss is 0; counted for monitoring);
    - ``"hardest_negative"``: each (a, p) with its closest negative (the lecture's
      hard-negative mining);
    - ``"batch_hard"``: per anchor its farthest positive and closest negative
      (Hermans et al.);
    - ``"semihard_facenet"``: each (a, p) with the closest negative farther than p,
      else the farthest negative (FaceNet / TF-Addons).

    The first four are exact sums over all their triplets computed in O(B² log B) time
    and O(B²) memory with no B×B×B tensor (see :mod:`jaxmetric.mining`).

    Args:
      embeddings: (B, D) float embeddings (any float dtype; computed in float32).
      labels: (B,) integer class labels.
      margin: the margin ``m`` >= 0, a concrete Python number.
      mining: one of :data:`MINING_MODES`.
      squared: squared Euclidean (True) or Euclidean (False) distance.
      reduction: ``"mean"`` over the selected triplets (0 when none),
        ``"mean_nonzero"`` over the selected triplets with a non-zero loss, ``"sum"``.
      valid: optional bool (B,) mask of real (non-padding) rows; padded rows may hold
        anything, NaN and inf included.
      axis_name: mapped axis to mine across (see module docstring).

    Returns:
      ``(loss, info)``: float32 scalar; info holds ``num_valid_triplets``,
      ``num_selected_triplets``, ``num_active_triplets``, ``active_fraction``
      (active / selected), ``num_pos_pairs``, ``num_neg_pairs``,
      ``mean_pos_distance``, ``mean_neg_distance``. Counts are float32 (exact to 2²⁴,
      then rounded; an int32 count would overflow near B = 2,900 for "all" over
      10 classes). A NaN or inf in a valid row makes the loss and every entry but
      ``num_valid_triplets``, ``num_pos_pairs`` and ``num_neg_pairs`` NaN (module
      docstring).
    """
    check_choice("mining", mining, MINING_MODES)
    check_choice("reduction", reduction, REDUCTIONS)
    margin = _static_margin(margin)
    b = _gather_batch(embeddings, labels, valid, axis_name)
    d = distances.cross_squared_distances(b.anchors, b.batch)
    if not squared:
        d = distances.safe_sqrt(d)
    pos, neg = _pair_masks(b)

    total = lambda x: _total(x, axis_name)  # noqa: E731
    num_pos, num_neg = total(pos), total(neg)
    # Per-anchor products fit int32 (B²/4); the sum over anchors may not: float32.
    per_anchor = jnp.sum(pos, axis=1).astype(jnp.float32) * jnp.sum(neg, axis=1)
    num_valid = total(per_anchor)

    if mining in ("all", "hard", "semihard", "easy"):
        loss_sum, num_selected, num_active = _windowed_triplets(
            d, b, mining, margin, num_valid, axis_name
        )
    else:
        loss_sum, num_selected, num_active = _hardest_triplets(
            d, pos, neg, b, mining, margin, axis_name
        )

    loss = _reduce(loss_sum, num_selected, num_active, reduction)
    info = {
        "num_valid_triplets": num_valid,
        "num_selected_triplets": num_selected,
        "num_active_triplets": num_active,
        "active_fraction": _safe_mean(num_active, num_selected),
        "num_pos_pairs": num_pos,
        "num_neg_pairs": num_neg,
        "mean_pos_distance": _safe_mean(total(jnp.where(pos, d, 0.0)), num_pos),
        "mean_neg_distance": _safe_mean(total(jnp.where(neg, d, 0.0)), num_neg),
    }
    exact = ("num_valid_triplets", "num_pos_pairs", "num_neg_pairs")
    return _propagate_nonfinite(b, loss, info, exact)
