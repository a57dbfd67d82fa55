r"""The margin loss (Wu et al. 2017): every pair against a learned boundary.

**Margin** (Wu et al. 2017). Each pair :math:`(i, j)` with :math:`y_{ij} = +1` (same
class) or :math:`-1` is pushed to the right side of a boundary :math:`\beta_i` (a
learned scalar, or one per class: :math:`\beta_{c(i)}`) by a margin :math:`\alpha`,
and :math:`\nu \beta_i` regularises the boundary:

.. math::  \ell_{ij} = [\alpha + y_{ij}(D_{ij} - \beta_i)]_+ + \nu \beta_i .

**Distance-weighted sampling** (``sampling="distance_weighted"``, the paper's sampler).
For every positive pair :math:`(i, p)` one negative :math:`n_{ip}` is drawn with
probability :math:`\propto 1 / q(d_{in})`, the inverse density of distances on the unit
sphere, clipped (:func:`jaxmetric.mining.distance_weighted_negatives`), and the loss
sums over these triplets

.. math::  [\alpha + D_{ip} - \beta_i]_+ + [\alpha - D_{i n_{ip}} + \beta_i]_+
           + \nu \beta_i .

The weights are computed from the Euclidean distances of the L2-normalised rows
(:math:`\sqrt{2 - 2\cos}`, the sphere the paper's embeddings lie on), whatever
``distance`` the loss itself uses; the draw carries no gradient. It needs a PRNG
``key``: the train step passes a fresh one every step, derived from the run's seed.
An anchor draws with ``fold_in(key, its position in the global batch)``, so under
``axis_name`` every device draws for its own anchors exactly what one device draws
on the concatenated batch (with a reference set, for the anchors of the batch).

The batch, padding, global batch under ``axis_name``, reference set and the NaN rule
are those of :mod:`jaxmetric.losses.pair_batch`, as for every pair loss; :math:`\beta`
is a replicated parameter like the network's (its gradient is summed over the devices by
``jax.shard_map``, or by the train step under ``jax.pmap``).

References:
  C.-Y. Wu, R. Manmatha, A. J. Smola, P. Krähenbühl, "Sampling Matters in Deep
  Embedding Learning", ICCV 2017.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxmetric import distances
from jaxmetric import mining as mining_lib
from jaxmetric.losses import class_batch, reductions
from jaxmetric.losses import pair_batch as batch_lib
from jaxmetric.losses.reductions import Terms, safe_mean
from jaxmetric.utils import check_choice, check_number

__all__ = ["MARGIN_SAMPLING", "MARGIN_PAIRS", "margin_loss"]

MARGIN_PAIRS: tuple[str, ...] = ("all", "triplets")
"""How :func:`margin_loss` counts pairs: each pair once, or once per triplet it is in."""

MARGIN_SAMPLING: tuple[str, ...] = ("none", "distance_weighted")
"""How :func:`margin_loss` picks its pairs: all of them (as ``pairs`` says), or one
distance-weighted negative per positive pair (module docstring)."""

Info = dict[str, jax.Array]


def margin_loss(
    embeddings: ArrayLike,
    labels: ArrayLike,
    beta: ArrayLike,
    *,
    margin: float = 0.2,
    nu: float = 0.0,
    pairs: str = "all",
    sampling: str = "none",
    key: jax.Array | None = None,
    cutoff: float = mining_lib.DWS_CUTOFF,
    nonzero_loss_cutoff: float = mining_lib.DWS_NONZERO_LOSS_CUTOFF,
    distance: str | distances.DistanceFn = "l2",
    reduction: str = "mean_nonzero",
    valid: ArrayLike | None = None,
    axis_name=None,
    ref_embeddings: ArrayLike | None = None,
    ref_labels: ArrayLike | None = None,
    ref_valid: ArrayLike | None = None,
) -> tuple[jax.Array, Info]:
    r"""Margin loss with a learned boundary :math:`\beta` (Wu et al. 2017).

    Over the pairs :math:`(i, j)` of each anchor :math:`i`, with distances :math:`D`
    (Euclidean by default), :math:`y_{ij} = +1` for a positive and :math:`-1` for a
    negative pair, and the anchor's boundary :math:`\beta_i` (``beta``, or
    ``beta[labels[i]]`` when ``beta`` has one entry per class):

    .. math::  \ell_{ij} = [\alpha + y_{ij}(D_{ij} - \beta_i)]_+ + \nu\, \beta_i

    positives are pulled inside :math:`\beta - \alpha`, negatives pushed beyond
    :math:`\beta + \alpha`, and :math:`\nu \beta_i` (``nu``, the paper's regulariser)
    keeps the boundary small. ``beta`` is an input so that it can be learned: its
    gradient is the loss's, as for any parameter (under ``axis_name``: module
    docstring).

    **Which pairs.** Wu et al. draw one negative per positive pair by
    distance-weighted sampling: ``sampling="distance_weighted"`` with a ``key`` (module
    docstring); each drawn triplet contributes :math:`[\alpha + D_{ip} - \beta_i]_+ +
    [\alpha - D_{in} + \beta_i]_+ + \nu\beta_i`, the paper's code's loss. With
    ``sampling="none"`` (default), ``pairs="all"`` takes every positive and negative
    pair once, as the contrastive loss does. ``pairs="triplets"`` is
    pytorch-metric-learning's ``MarginLoss``
    (``triplets_per_anchor="all"``): every triplet (i, p, n) contributes
    :math:`[\alpha + D_{ip} - \beta_i]_+ + [\alpha - D_{in} + \beta_i]_+ +
    \nu\beta_i`, so a positive pair counts once per negative of its anchor and a
    negative pair once per positive. The default reduction, ``"mean_nonzero"``
    (the sum over the number of non-zero hinge terms), is the paper's code's and
    PML's ``DivisorReducer``; so with ``pairs="triplets"`` this is PML's loss, except
    for a scalar learned ``beta``, where PML adds :math:`\nu\beta` once instead of per
    triplet.

    Args:
      embeddings: (B, D) float embeddings (any float dtype; computed in float32).
      labels: (B,) integer class labels; in ``[0, C)`` with a per-class ``beta``
        (checked as the proxy losses check theirs: a ``ValueError`` for concrete
        labels, a NaN loss and info, ``mean_beta`` included, for traced ones; padded
        rows may hold any label).
      beta: the boundary, a float scalar or (C,) one per class (may be traced).
      margin: :math:`\alpha \ge 0`, in the distance's units.
      nu: :math:`\nu \ge 0`, the weight of the regulariser.
      pairs: ``"all"`` or ``"triplets"`` (above; :data:`MARGIN_PAIRS`); with
        ``sampling="distance_weighted"``, ``"all"``.
      sampling: ``"none"`` or ``"distance_weighted"`` (:data:`MARGIN_SAMPLING`); in a
        run: ``--loss-options sampling=distance_weighted``.
      key: PRNG key of the draw; needed (and only used) with
        ``sampling="distance_weighted"``; the same on every device under ``axis_name``.
      cutoff, nonzero_loss_cutoff: distance-weighted sampling's clipping of the
        normalised rows' distances (the paper's 0.5 and 1.4).
      distance: ``"l2"`` (default), ``"squared_l2"``, ``"cosine"`` or a callable
        (:mod:`jaxmetric.distances`).
      reduction: ``"mean_nonzero"`` (default): the sum of every term over the number of
        non-zero hinge terms; ``"mean"``: over the number of terms; ``"sum"``;
        ``"none"``: (R,) each anchor's sum.
      valid: optional bool (B,) mask of real rows; padded rows may hold anything.
      axis_name: mapped axis of the global batch (module docstring).
      ref_embeddings, ref_labels, ref_valid: optional reference set (M, D), (M,),
        bool (M,): anchors from the batch, positives and negatives from the reference
        (the same arrays on every device under ``axis_name``).

    Returns:
      ``(loss, info)``: float32 scalar (``"none"``: (R,)); info holds
      ``num_pos_pairs``, ``num_neg_pairs``, ``num_active_pos_pairs``,
      ``num_active_neg_pairs`` (non-zero hinges), ``active_fraction`` (active pairs /
      pairs), ``mean_beta`` (the boundary of the valid anchors, averaged),
      ``mean_pos_distance``, ``mean_neg_distance``, and with ``"none"``
      ``anchor_num_selected`` and ``anchor_num_active`` (terms of each anchor, counted
      per triplet with ``pairs="triplets"``, two per drawn triplet with
      distance-weighted sampling, whose active fraction is over those terms). With
      ``sampling="distance_weighted"`` also ``num_triplets``, the triplets drawn. A NaN
      or inf in a valid row makes the loss and all entries but the pair counts and
      ``mean_beta`` NaN.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxmetric import losses
      >>> emb = jnp.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]])
      >>> labels = jnp.array([0, 0, 1, 1])
      >>> loss, info = losses.margin_loss(emb, labels, 1.2)
      >>> print(f"{loss:.4f}", info["num_active_pos_pairs"], info["num_active_neg_pairs"])
      0.5056 0.0 2.0
      >>> loss, info = losses.margin_loss(emb, labels, jnp.array([1.0, 1.3]), nu=0.01)
      >>> print(f"{loss:.4f}", info["mean_beta"])
      0.3052 1.15
    """
    check_choice("reduction", reduction, reductions.ANY_REDUCTION)
    check_choice("pairs", pairs, MARGIN_PAIRS)
    check_choice("sampling", sampling, MARGIN_SAMPLING)
    sampled = sampling == "distance_weighted"
    if sampled and pairs != "all":
        raise ValueError(f"sampling='distance_weighted' draws its own triplets: leave "
                         f"pairs='all' (got pairs={pairs!r})")
    if sampled and key is None:
        raise ValueError("sampling='distance_weighted' draws negatives at random: give a "
                         "PRNG key (key=jax.random.key(...))")
    check_number("cutoff", cutoff, minimum=0.0)
    check_number("nonzero_loss_cutoff", nonzero_loss_cutoff, positive=True)
    check_number("margin", margin, minimum=0.0)
    check_number("nu", nu, minimum=0.0)
    distances.resolve(distance)
    beta = jnp.asarray(float(beta) if isinstance(beta, int) else beta)  # 1 means 1.0
    if beta.ndim > 1 or not jnp.issubdtype(beta.dtype, jnp.floating):
        raise ValueError("beta must be a float scalar or a (C,) float array (one per class); "
                         f"got shape {beta.shape}, dtype {beta.dtype}")
    beta = beta.astype(jnp.float32)
    b = batch_lib.gather(
        embeddings, labels, valid, axis_name, ref_embeddings=ref_embeddings,
        ref_labels=ref_labels, ref_valid=ref_valid)
    d = batch_lib.distance_matrix(b, distance)
    pos, neg = batch_lib.pair_masks(b)

    rows = b.anchor_labels.shape[0]
    label_nan = jnp.float32(0.0)
    if beta.ndim == 1:  # beta[labels]: the labels index beta, as they index proxies
        class_batch.check_label_range(labels, valid, beta.shape[0], name="beta",
                                      per_class="entry")
        label_nan = class_batch.nan_if_out_of_range(b.anchor_labels, b.anchor_valid,
                                                    beta.shape[0], axis_name)
        b = b._replace(nan_if_nonfinite=b.nan_if_nonfinite + label_nan)
    beta_i = jnp.broadcast_to(beta if beta.ndim == 0 else beta[b.anchor_labels], (rows,))
    pos_terms = jnp.where(pos, jax.nn.relu(margin + d - beta_i[:, None]), 0.0)
    neg_terms = jnp.where(neg, jax.nn.relu(margin - d + beta_i[:, None]), 0.0)
    num_pos, num_neg = reductions.count(pos, 1), reductions.count(neg, 1)
    if sampled:
        return _distance_weighted(b, d, pos, neg, pos_terms, beta_i, key, margin, nu,
                                  cutoff, nonzero_loss_cutoff, reduction, axis_name,
                                  label_nan)
    active_pos, active_neg = reductions.count(pos_terms > 0, 1), reductions.count(neg_terms > 0, 1)
    if pairs == "all":  # each pair once, with its regulariser
        w_pos = w_neg = 1.0
        num_reg = num_pos + num_neg
    else:  # each pair once per triplet it is in, one regulariser per triplet
        w_pos, w_neg = num_neg, num_pos
        num_reg = num_pos * num_neg
    anchor_loss = (w_pos * jnp.sum(pos_terms, axis=1) + w_neg * jnp.sum(neg_terms, axis=1)
                   + nu * beta_i * num_reg)
    groups = (Terms(anchor_loss, w_pos * num_pos + w_neg * num_neg,
                    w_pos * active_pos + w_neg * active_neg),)
    loss, _ = reductions.reduce(groups, reduction, axis_name)

    total = lambda x: reductions.total(x, axis_name)  # noqa: E731
    info = batch_lib.pair_distance_info(d, pos, neg, axis_name)
    num_active_pos, num_active_neg = total(active_pos), total(active_neg)
    info |= {
        "num_active_pos_pairs": num_active_pos,
        "num_active_neg_pairs": num_active_neg,
        "active_fraction": safe_mean(num_active_pos + num_active_neg,
                                     info["num_pos_pairs"] + info["num_neg_pairs"]),
        "mean_beta": safe_mean(total(jnp.where(b.anchor_valid, beta_i, 0.0)),
                               total(b.anchor_valid)) + label_nan,
    }
    exact = batch_lib.PAIR_COUNTS + ("mean_beta",)
    return batch_lib.finish(b, loss, info, groups, reduction, exact)


def _distance_weighted(b, d, pos, neg, pos_terms, beta_i, key, margin, nu, cutoff,
                       nonzero_loss_cutoff, reduction, axis_name, label_nan):
    """The margin loss over one distance-weighted negative per positive pair (module
    docstring): ``pos_terms`` (R, C) are the positive pairs' hinges."""
    unit = 2.0 * distances.cross_cosine_distances(b.anchors, b.batch)  # 2 - 2 cos
    index, has_neg = mining_lib.distance_weighted_negatives(
        key, jnp.sqrt(jax.lax.stop_gradient(unit)), neg, b.anchor_index,
        dim=b.anchors.shape[1], cutoff=cutoff, nonzero_loss_cutoff=nonzero_loss_cutoff)
    triplet = pos & has_neg[:, None]  # (i, p) with its drawn negative index[i, p]
    d_neg = jnp.take_along_axis(d, index, axis=1)
    neg_terms = jnp.where(triplet, jax.nn.relu(margin - d_neg + beta_i[:, None]), 0.0)
    pos_terms = jnp.where(triplet, pos_terms, 0.0)
    num_triplets = reductions.count(triplet, 1)
    active_pos, active_neg = reductions.count(pos_terms > 0, 1), reductions.count(neg_terms > 0, 1)
    anchor_loss = (jnp.sum(pos_terms, axis=1) + jnp.sum(neg_terms, axis=1)
                   + nu * beta_i * num_triplets)
    groups = (Terms(anchor_loss, 2.0 * num_triplets, active_pos + active_neg),)
    loss, ((_, num_terms, num_active),) = reductions.reduce(groups, reduction, axis_name)

    total = lambda x: reductions.total(x, axis_name)  # noqa: E731
    info = batch_lib.pair_distance_info(d, pos, neg, axis_name)
    info |= {
        "num_active_pos_pairs": total(active_pos),
        "num_active_neg_pairs": total(active_neg),
        "num_triplets": total(num_triplets),
        "active_fraction": safe_mean(num_active, num_terms),
        "mean_beta": safe_mean(total(jnp.where(b.anchor_valid, beta_i, 0.0)),
                               total(b.anchor_valid)) + label_nan,
    }
    exact = batch_lib.PAIR_COUNTS + ("mean_beta",)
    return batch_lib.finish(b, loss, info, groups, reduction, exact)
