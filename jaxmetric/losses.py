r"""Pairwise contrastive and triplet losses over all pairs / mined triplets of a batch.

Both losses take a batch of embeddings ``(B, D)`` and integer labels ``(B,)`` and
return ``(loss, info)``: a float32 scalar (or, with ``reduction="none"``, one value per
anchor) and a dict of float32 values to watch while training (pair / triplet counts,
the active fraction, mean distances). Both are pure and work under ``jit``, ``vmap``
and ``grad``.

The other losses, with the same interface, live in one module per family and are
re-exported here: :func:`supcon_loss` and :func:`ntxent_loss`
(:mod:`jaxmetric.softmax_losses`); :func:`multi_similarity_loss`, :func:`circle_loss`,
:func:`lifted_structure_loss` and :func:`margin_loss`
(:mod:`jaxmetric.weighted_pair_losses`).

**Distance.** ``distance`` is a name in :data:`jaxmetric.distances.DISTANCES` —
``"squared_l2"`` (the triplet loss's default, as in FaceNet and the lecture), ``"l2"``
(the contrastive loss's default, as in Hadsell et al.) or ``"cosine"`` (``1 - cos``,
in [0, 2], for unit or non-unit embeddings) — or a callable
``(anchors (R, D), batch (B, D)) -> (R, B)`` returning non-negative float distances
that stay finite, with finite gradients, on all-zero rows (padded rows are zeroed
before it is called). The margins are in the units of that distance.

**Reduction.** Each loss is a sum of terms grouped per anchor (row ``i`` of the
batch): the contrastive loss has one term per ordered pair ``(i, j)``, in two groups,
positive and negative pairs; the triplet loss one term per selected triplet
``(i, p, n)``, in one group. With :math:`S_g` the sum of group ``g``'s terms,
:math:`N_g` their number and :math:`A_g` the number of non-zero (*active*) ones, all
over the global batch:

- ``"mean"``: :math:`\sum_g S_g / \max(\sum_g N_g, 1)`, the mean over all terms (all
  valid pairs; all selected triplets);
- ``"mean_nonzero"``: :math:`\sum_g S_g / \max(A_g, 1)`, the mean over the non-zero
  terms *per group*, added: for the triplet loss the mean over the active triplets;
  for the contrastive loss the mean of the non-zero positive-pair terms plus the mean
  of the non-zero negative-pair terms (pytorch-metric-learning's
  ``AvgNonZeroReducer`` on its positive and negative losses);
- ``"sum"``: :math:`\sum_g S_g`;
- ``"none"``: float32 ``(R,)``, each anchor's sum over its own terms (both groups),
  with the anchor's numbers of terms and active terms in
  ``info["anchor_num_selected"]`` and ``info["anchor_num_active"]``. ``R`` is the
  batch size, or under ``axis_name`` the local batch size: each device returns its
  own anchors, in order, so concatenating over the axis gives the single-device
  arrays; ``loss.sum()`` is the ``"sum"`` loss and ``loss.sum() /
  info["anchor_num_selected"].sum()`` the ``"mean"`` loss (summed over devices under
  ``axis_name``). The other info entries are the global scalars of every reduction.

:data:`REDUCTIONS` lists the reductions to a scalar (what a training step can
differentiate); every loss also accepts ``"none"``.

**Data parallelism.** Inside ``jax.shard_map`` or ``jax.pmap`` pass the mapped axis
name as ``axis_name``: each device gives its local shard, the embeddings, labels and
``valid`` flags are all-gathered, every device mines its own anchors against the global
batch, and partial sums are ``psum``-ed. The returned loss equals the single-device loss
on the concatenated batch, and its gradient with respect to each device's local
embeddings is that shard's slice of the single-device gradient (``all_gather``
transposes to a reduce-scatter). The gradient of replicated parameters on one device
is therefore that device's *contribution*; sum it over the axis. With
``reduction="none"`` differentiate each device's ``loss.sum()``: the gradient reaching
each shard is then that of the global sum.

**Padding.** ``valid`` (bool (B,)) marks real rows; padded rows take part in no pair.
They are replaced by zeros before any arithmetic, so whatever they hold (stale data,
NaN, inf) changes neither the loss, nor the info, nor any gradient (a masked-out
``0 * NaN`` would otherwise still be NaN, e.g. in the Gram matmul's gradient).

**Non-finite inputs: NaN in, NaN out.** If any *valid* row of the (global) batch holds
a NaN or ±inf (after the cast to float32), the loss is NaN, on every device, under
``jit``, ``vmap`` and ``axis_name`` alike, for every distance and reduction
(``"none"``: every anchor's value); padded rows never count (above). Without this
rule the masks would swallow such a row while the gradient is NaN, and a run that
stops on a non-finite *loss* would go on with NaN parameters. Whether a bad row shows
in the loss by itself depends on accidents of the arithmetic: a NaN squared distance
becomes an ``"l2"`` distance of 0 in :func:`~jaxmetric.distances.safe_sqrt`, +inf
distances vanish in ``relu(m - d) = 0`` and are never the ``min`` picked as the
closest negative, the sort keys of the mining map NaN to 0, while ``min`` and the
weighted sums ``w * d`` (``0 * NaN = NaN``) do propagate NaN.

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

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxmetric import batch as batch_lib
from jaxmetric import distances, reductions
from jaxmetric import mining as mining_lib
from jaxmetric.reductions import REDUCTIONS, Terms, safe_mean
from jaxmetric.utils import check_choice, check_number

__all__ = ["contrastive_loss", "triplet_loss", "MINING_MODES", "REDUCTIONS",
           "SOFT_MINING_MODES"]

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


# ------------------------------------------------------------------------ contrastive


def contrastive_loss(
    embeddings: ArrayLike,
    labels: ArrayLike,
    *,
    margin: float = 1.0,
    pos_margin: float = 0.0,
    power: float = 2,
    distance: str | distances.DistanceFn = "l2",
    reduction: str = "mean",
    valid: ArrayLike | None = None,
    axis_name=None,
    ref_embeddings: ArrayLike | None = None,
    ref_labels: ArrayLike | None = None,
    ref_valid: ArrayLike | None = None,
) -> tuple[jax.Array, Info]:
    r"""Pairwise contrastive loss (Hadsell et al. 2006; the lecture's section 2).

    Over every ordered pair (i, j), i != j, of valid rows with distance
    :math:`d_{ij}` (Euclidean by default):

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
      distance: ``"l2"`` (default), ``"squared_l2"``, ``"cosine"`` or a callable
        (module docstring); the margins are in its units.
      reduction: ``"mean"`` over all valid pairs; ``"mean_nonzero"`` averages the
        non-zero positive terms and the non-zero negative terms separately and adds
        the two means (PML's ``AvgNonZeroReducer``); ``"sum"``; ``"none"``: each
        anchor's sum over its pairs (module docstring).
      valid: optional bool (B,) mask of real (non-padding) rows; padded rows may hold
        anything, NaN and inf included.
      axis_name: mapped axis to mine across (see module docstring).
      ref_embeddings, ref_labels, ref_valid: optional reference set (M, D), (M,),
        bool (M,): the anchors are the batch's rows, their positives and negatives
        the reference's (query vs reference; a cross-batch memory). The same arrays on
        every device under ``axis_name`` (:mod:`jaxmetric.batch`).

    Returns:
      ``(loss, info)``: float32 scalar (``"none"``: (R,)); info holds
      ``num_pos_pairs``, ``num_neg_pairs``, ``num_active_pos_pairs``,
      ``num_active_neg_pairs``, ``active_fraction`` (non-zero pairs / valid pairs),
      ``mean_pos_distance``, ``mean_neg_distance``, and with ``"none"``
      ``anchor_num_selected`` (valid pairs of each anchor) and ``anchor_num_active``.
      A NaN or inf in a valid row makes the loss and all but the two pair counts NaN
      (module docstring).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxmetric import losses
      >>> emb = jnp.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]])
      >>> labels = jnp.array([0, 0, 1, 1])
      >>> loss, info = losses.contrastive_loss(emb, labels, margin=1.0)
      >>> print(f"{loss:.4f}", info["num_pos_pairs"], info["num_neg_pairs"])
      0.1352 4.0 8.0
      >>> per_anchor, _ = losses.contrastive_loss(emb, labels, distance="cosine",
      ...                                         reduction="none")
      >>> per_anchor.shape
      (4,)
    """
    check_choice("reduction", reduction, reductions.ANY_REDUCTION)
    check_number("margin", margin, minimum=0.0)
    check_number("pos_margin", pos_margin, minimum=0.0)
    check_number("power", power, positive=True)
    distances.resolve(distance)  # a bad name fails before any work
    b = batch_lib.gather(
        embeddings, labels, valid, axis_name, ref_embeddings=ref_embeddings,
        ref_labels=ref_labels, ref_valid=ref_valid)
    d = batch_lib.distance_matrix(b, distance)
    pos, neg = batch_lib.pair_masks(b)

    pos_terms = jnp.where(pos, jax.nn.relu(d - pos_margin) ** power, 0.0)
    neg_terms = jnp.where(neg, jax.nn.relu(margin - d) ** power, 0.0)
    groups = (reductions.row_terms(pos_terms, pos), reductions.row_terms(neg_terms, neg))
    loss, ((_, num_pos, active_pos), (_, num_neg, active_neg)) = reductions.reduce(
        groups, reduction, axis_name
    )

    total = lambda x: reductions.total(x, axis_name)  # noqa: E731
    info = {
        "num_pos_pairs": num_pos,
        "num_neg_pairs": num_neg,
        "num_active_pos_pairs": active_pos,
        "num_active_neg_pairs": active_neg,
        "active_fraction": safe_mean(active_pos + active_neg, num_pos + num_neg),
        "mean_pos_distance": safe_mean(total(jnp.where(pos, d, 0.0)), num_pos),
        "mean_neg_distance": safe_mean(total(jnp.where(neg, d, 0.0)), num_neg),
    }
    if reduction == "none":
        info.update(reductions.anchor_info(groups))
    return batch_lib.propagate_nonfinite(b, loss, info, ("num_pos_pairs", "num_neg_pairs"))


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
        every device under ``axis_name`` (:mod:`jaxmetric.batch`).
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


# ------------------------------------------------ the other families, re-exported here
# (their modules do not import this one)

from jaxmetric.margin_softmax_losses import arcface_loss, cosface_loss  # noqa: E402
from jaxmetric.proxy_losses import proxy_anchor_loss, proxy_nca_loss  # noqa: E402
from jaxmetric.softmax_losses import ntxent_loss, supcon_loss  # noqa: E402
from jaxmetric.weighted_pair_losses import (  # noqa: E402
    circle_loss,
    lifted_structure_loss,
    margin_loss,
    multi_similarity_loss,
)

__all__ += ["ntxent_loss", "supcon_loss", "circle_loss", "lifted_structure_loss",
            "margin_loss", "multi_similarity_loss", "arcface_loss", "cosface_loss",
            "proxy_anchor_loss", "proxy_nca_loss"]
