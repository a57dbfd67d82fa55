r"""The triplet loss over mined triplets (Schroff et al., FaceNet 2015).

For each anchor ``a``, positive ``p`` and negative ``n`` the hinge
:math:`[d(a,p) - d(a,n) + m]_+` (or its soft-margin form
:math:`\log(1 + e^{d(a,p) - d(a,n)})`), over the triplets a mining mode selects:
every valid one, the hard or semi-hard ones, or one per anchor (batch-hard). The
selection is exact over the global batch and never builds the B×B×B table
(:mod:`jaxmetric.mining` derives the sort kernels); the contract is
:mod:`jaxmetric.losses`'.

References:
  F. Schroff, D. Kalenichenko, J. Philbin, "FaceNet: A Unified Embedding for Face
  Recognition and Clustering", CVPR 2015 (triplet loss, semi-hard mining).
  A. Hermans, L. Beyer, B. Leibe, "In Defense of the Triplet Loss for Person
  Re-Identification", arXiv:1703.07737, 2017 (batch-hard mining).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxmetric import distances
from jaxmetric import mining as mining_lib
from jaxmetric.losses import pair_batch as batch_lib
from jaxmetric.losses import reductions
from jaxmetric.losses.reductions import Terms, safe_mean
from jaxmetric.utils import check_choice

__all__ = ["triplet_loss", "MINING_MODES", "SOFT_MINING_MODES"]

MINING_MODES: tuple[str, ...] = mining_lib.MODES
"""The names of the built-in mining modes (:data:`jaxmetric.mining.STRATEGIES`)."""

SOFT_MINING_MODES: tuple[str, ...] = ("all", "hard", "hardest_negative", "batch_hard",
                                      "semihard_facenet")
"""The mining modes of the soft-margin triplet loss (``margin="soft"``): those whose
selection does not depend on a margin ("semihard" and "easy" are windows of width m)."""

# Anchors of the soft-margin "all" / "hard" sums computed at once: each holds a (B, B)
# slice of (positive, negative) terms, so a chunk is at most this many elements (or one
# anchor) and nothing of size B x B x B is ever materialised.
_SOFT_CHUNK_ELEMENTS = 1 << 22


Info = dict[str, jax.Array]


# ----------------------------------------------------------------------------- checks


def _static_margin(margin) -> float | str:
    """The triplet margin as a Python float >= 0, or ``"soft"``."""
    if isinstance(margin, str):
        if margin != "soft":
            raise ValueError(f"margin must be a number >= 0 or 'soft'; got {margin!r}")
        return margin
    try:
        m = float(margin)
    except (TypeError, jax.errors.ConcretizationTypeError) as e:
        raise TypeError(
            "triplet_loss margin must be a concrete Python number or 'soft' (it selects "
            "the mined triplets); pass it as a static value, not a traced array"
        ) from e
    if not m >= 0:
        raise ValueError(f"margin must be >= 0; got {margin}")
    return m


def _strategy(mining) -> mining_lib.Strategy:
    if callable(mining):
        return mining
    check_choice("mining", mining, MINING_MODES)
    return mining_lib.STRATEGIES[mining]


def _triplet_distance(distance, squared):
    """The triplet loss's distance from ``distance`` and the deprecated ``squared``."""
    if squared is None:
        return "squared_l2" if distance is None else distance
    alias = "squared_l2" if squared else "l2"
    if distance is None or (isinstance(distance, str) and distance == alias):
        return alias
    raise ValueError(
        f"squared={squared!r} (deprecated) means distance={alias!r}, but "
        f"distance={distance!r} was given; pass distance only"
    )


# ------------------------------------------------------------- soft-margin triplets


def _soft_window_sums(d, pos, neg, *, hard: bool):
    """Per anchor, the sum of ``softplus(d_p - d_n)`` over its (p, n) triplets (all, or
    ``d_n <= d_p`` when ``hard``) and their number: float32 (R,) each.

    softplus is not linear in the distances, so the sort kernels of
    :mod:`jaxmetric.mining` do not apply: each anchor builds its (B, B) table of
    (positive, negative) terms, a bounded chunk of anchors at a time under
    :func:`jax.lax.map`. The body is rematerialised in the backward pass
    (:func:`jax.checkpoint`), so the scan keeps only its (B,) inputs per anchor: O(B²)
    memory for the loss and its gradient, O(B³) time.
    """
    rows, cols = d.shape
    chunk = max(1, min(rows, _SOFT_CHUNK_ELEMENTS // max(cols * cols, 1)))

    @jax.checkpoint
    def one_anchor(args):
        d_a, pos_a, neg_a = args
        dp, dn = d_a[:, None], d_a[None, :]
        sel = pos_a[:, None] & neg_a[None, :]
        if hard:
            sel = sel & (jax.lax.stop_gradient(dn) <= jax.lax.stop_gradient(dp))
        terms = jnp.where(sel, jax.nn.softplus(dp - dn), 0.0)
        return jnp.sum(terms), reductions.count(sel)

    return jax.lax.map(one_anchor, (d, pos, neg), batch_size=chunk)


def _tie_share(mask):
    """``mask`` as float32 weights summing to 1 per row (0 if empty): ties split equally,
    the gradient ``jnp.min`` / ``jnp.max`` would give."""
    m = mask.astype(jnp.float32)
    return m / jnp.maximum(jnp.sum(m, axis=-1, keepdims=True), 1.0)


def _soft_triplets(d, pos, neg, mining: str):
    r"""Soft-margin triplet terms :math:`\log(1 + e^{d_{ap} - d_{an}})` of each anchor:
    float32 (R,) sums and (R,) numbers of triplets, for a :data:`SOFT_MINING_MODES` mode.
    The one-negative modes pick their triplets exactly as with a hinge (on the distances,
    without gradient)."""
    if mining in ("all", "hard"):
        return _soft_window_sums(d, pos, neg, hard=mining == "hard")
    sd = jax.lax.stop_gradient(d)
    has_pos, has_neg = jnp.any(pos, axis=1), jnp.any(neg, axis=1)
    big = jnp.finfo(jnp.float32).max
    closest = jnp.min(jnp.where(neg, sd, big), axis=1, keepdims=True)
    d_closest = jnp.sum(_tie_share(neg & (sd == closest)) * d, axis=1)  # (R,)
    if mining == "batch_hard":
        farthest = jnp.max(jnp.where(pos, sd, -1.0), axis=1, keepdims=True)
        d_farthest = jnp.sum(_tie_share(pos & (sd == farthest)) * d, axis=1)
        selected = has_pos & has_neg
        loss = jnp.where(selected, jax.nn.softplus(d_farthest - d_closest), 0.0)
        return loss, selected.astype(jnp.float32)
    if mining == "hardest_negative":
        d_neg = d_closest[:, None]
    else:  # semihard_facenet: the closest negative farther than p, else the farthest
        index, found = jax.vmap(mining_lib.next_negative_index)(sd, pos, neg)
        farthest = jnp.argmax(jnp.where(neg, sd, -1.0), axis=1).astype(jnp.int32)
        index = jnp.where(found, index, farthest[:, None])
        d_neg = jnp.take_along_axis(d, index, axis=1)
    selected = pos & has_neg[:, None]
    terms = jnp.where(selected, jax.nn.softplus(d - d_neg), 0.0)
    return jnp.sum(terms, axis=1), reductions.count(selected, 1)


# ---------------------------------------------------------------------------- triplet


def triplet_loss(
    embeddings: ArrayLike,
    labels: ArrayLike,
    *,
    margin: float | str = 0.2,
    mining: str | mining_lib.Strategy = "all",
    distance: str | distances.DistanceFn | None = None,
    reduction: str = "mean",
    valid: ArrayLike | None = None,
    axis_name=None,
    ref_embeddings: ArrayLike | None = None,
    ref_labels: ArrayLike | None = None,
    ref_valid: ArrayLike | None = None,
    squared: bool | None = None,
) -> tuple[jax.Array, Info]:
    r"""Triplet margin loss with batch mining (Schroff et al. 2015; lecture section 3).

    For a triplet (anchor a, positive p, negative n) with distance ``d``:

    .. math::  \ell_{apn} = [\,d(a, p) - d(a, n) + m\,]_+

    where ``d`` is the squared Euclidean distance by default (FaceNet, the lecture).
    ``margin="soft"`` replaces the hinge by the soft margin of Hermans et al. (2017),

    .. math::  \ell_{apn} = \log\left(1 + e^{\,d(a, p) - d(a, n)}\right),

    which never stops pulling (every selected triplet is active) and has no margin to
    tune; it takes the modes whose selection needs no margin
    (:data:`SOFT_MINING_MODES`: "all", "hard" (``d(a,n) <= d(a,p)``),
    "hardest_negative", "batch_hard", "semihard_facenet"), and raises ``ValueError``
    for the others.
    A valid triplet has distinct valid rows with ``y_a = y_p != y_n``. ``mining``
    chooses the triplets (:data:`MINING_MODES`, one function each in
    :data:`jaxmetric.mining.STRATEGIES`):

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

    Each mode gives, per anchor, weights ``w`` over the batch and its counts, and the
    anchor's loss is ``sum_j w_j d(a, j) + m * num_active`` (:mod:`jaxmetric.mining`):
    a weighted sum of the distance matrix whose weights are its exact gradient. The
    first four are exact sums over all their triplets computed in O(B² log B) time
    and O(B²) memory with no B×B×B tensor. With ``margin="soft"`` the loss is not
    linear in the distances: "all" and "hard" are then summed anchor by anchor, each a
    (B, B) table of (positive, negative) terms, in O(B³) time and O(B²) memory (the
    gradient too: the per-anchor tables are recomputed, never stored); the
    one-negative modes stay O(B²).

    Args:
      embeddings: (B, D) float embeddings (any float dtype; computed in float32).
      labels: (B,) integer class labels.
      margin: the margin ``m`` >= 0, a concrete Python number, in the distance's units;
        or ``"soft"``: the soft margin ``softplus(d(a,p) - d(a,n))`` (above).
      mining: one of :data:`MINING_MODES`, or a per-anchor function with the contract
        of :data:`jaxmetric.mining.STRATEGIES`.
      distance: ``"squared_l2"`` (default), ``"l2"``, ``"cosine"`` or a callable
        (module docstring).
      reduction: ``"mean"`` over the selected triplets (0 when none),
        ``"mean_nonzero"`` over the selected triplets with a non-zero loss, ``"sum"``,
        ``"none"``: each anchor's sum over its triplets (module docstring).
      valid: optional bool (B,) mask of real (non-padding) rows; padded rows may hold
        anything, NaN and inf included.
      axis_name: mapped axis to mine across (see module docstring).
      ref_embeddings, ref_labels, ref_valid: optional reference set (M, D), (M,),
        bool (M,): the anchors are the batch's rows, their positives and negatives
        the reference's (query vs reference; a cross-batch memory). The same arrays on
        every device under ``axis_name`` (:mod:`jaxmetric.losses.pair_batch`).
      squared: deprecated alias of ``distance``: True is ``"squared_l2"``, False is
        ``"l2"``; giving both inconsistently raises ``ValueError``.

    Returns:
      ``(loss, info)``: float32 scalar (``"none"``: (R,)); info holds
      ``num_valid_triplets``, ``num_selected_triplets``, ``num_active_triplets``,
      ``active_fraction`` (active / selected; 1 with ``margin="soft"``),
      ``num_pos_pairs``, ``num_neg_pairs``, ``mean_pos_distance``,
      ``mean_neg_distance``, and with ``"none"`` ``anchor_num_selected`` and
      ``anchor_num_active``. Counts are float32 (exact to
      2²⁴, then rounded; an int32 count would overflow near B = 2,900 for "all" over
      10 classes). A NaN or inf in a valid row makes the loss and every entry but
      ``num_valid_triplets``, ``num_pos_pairs`` and ``num_neg_pairs`` NaN (module
      docstring).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxmetric import losses
      >>> emb = jnp.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]])
      >>> labels = jnp.array([0, 0, 1, 1])
      >>> loss, info = losses.triplet_loss(emb, labels, margin=0.5, mining="semihard")
      >>> print(f"{loss:.4f}", info["num_valid_triplets"], info["num_selected_triplets"])
      0.1000 8.0 2.0
      >>> soft, info = losses.triplet_loss(emb, labels, margin="soft", mining="batch_hard")
      >>> print(f"{soft:.4f}", info["num_selected_triplets"], info["active_fraction"])
      0.3485 4.0 1.0
    """
    margin = _static_margin(margin)
    if margin == "soft":
        if callable(mining) or mining not in SOFT_MINING_MODES:
            raise ValueError(
                f"margin='soft' supports mining {', '.join(SOFT_MINING_MODES)}; got "
                f"{mining!r} (semihard and easy are windows of a numeric margin; a custom "
                "strategy's weights assume the hinge)")
    else:
        strategy = _strategy(mining)
    check_choice("reduction", reduction, reductions.ANY_REDUCTION)
    distance = _triplet_distance(distance, squared)
    distances.resolve(distance)
    b = batch_lib.gather(
        embeddings, labels, valid, axis_name, ref_embeddings=ref_embeddings,
        ref_labels=ref_labels, ref_valid=ref_valid)
    d = batch_lib.distance_matrix(b, distance)
    pos, neg = batch_lib.pair_masks(b)

    if margin == "soft":
        anchor_loss, num_terms = _soft_triplets(d, pos, neg, mining)
        groups = (Terms(anchor_loss, num_terms, num_terms),)  # softplus > 0: all active
    else:
        mined = mining_lib.mine(strategy, d, pos, neg, margin=margin)
        anchor_loss = jnp.sum(mined.weights * d, axis=1) + margin * mined.num_active
        groups = (Terms(anchor_loss, mined.num_selected, mined.num_active),)
    loss, ((_, num_selected, num_active),) = reductions.reduce(groups, reduction, axis_name)

    total = lambda x: reductions.total(x, axis_name)  # noqa: E731
    num_pos, num_neg = total(pos), total(neg)
    # Per-anchor products fit int32 (B²/4); the sum over anchors may not: float32.
    num_valid = total(reductions.count(pos, 1) * reductions.count(neg, 1))
    info = {
        "num_valid_triplets": num_valid,
        "num_selected_triplets": num_selected,
        "num_active_triplets": num_active,
        "active_fraction": safe_mean(num_active, num_selected),
        "num_pos_pairs": num_pos,
        "num_neg_pairs": num_neg,
        "mean_pos_distance": safe_mean(total(jnp.where(pos, d, 0.0)), num_pos),
        "mean_neg_distance": safe_mean(total(jnp.where(neg, d, 0.0)), num_neg),
    }
    if reduction == "none":
        info.update(reductions.anchor_info(groups))
    exact = ("num_valid_triplets", "num_pos_pairs", "num_neg_pairs")
    return batch_lib.propagate_nonfinite(b, loss, info, exact)
