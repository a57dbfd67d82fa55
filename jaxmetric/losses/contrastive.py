r"""The contrastive loss over every pair of a batch (Hadsell, Chopra & LeCun 2006).

Positive pairs are pulled together past ``pos_margin`` and negative pairs pushed apart
beyond ``margin``; the math, the reductions and the options are in
:func:`contrastive_loss`'s docstring, the contract shared with every loss in
:mod:`jaxmetric.losses`. :func:`snr_contrastive_loss` is the same loss on the
signal-to-noise ratio distance of Yuan et al. 2019
(:func:`jaxmetric.distances.cross_snr_distances`).

References:
  R. Hadsell, S. Chopra, Y. LeCun, "Dimensionality Reduction by Learning an Invariant
  Mapping", CVPR 2006.
  T. Yuan, W. Deng, J. Tang, Y. Tang, B. Chen, "Signal-to-Noise Ratio: A Robust
  Distance Metric for Deep Metric Learning", CVPR 2019.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxmetric import distances
from jaxmetric.losses import pair_batch as batch_lib
from jaxmetric.losses import reductions
from jaxmetric.losses.reductions import safe_mean
from jaxmetric.utils import check_choice, check_number

__all__ = ["contrastive_loss", "snr_contrastive_loss"]

Info = dict[str, jax.Array]


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
        every device under ``axis_name`` (:mod:`jaxmetric.losses.pair_batch`).

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


def snr_contrastive_loss(
    embeddings: ArrayLike,
    labels: ArrayLike,
    *,
    margin: float = 1.0,
    pos_margin: float = 0.0,
    power: float = 1,
    reduction: str = "mean_nonzero",
    valid: ArrayLike | None = None,
    axis_name=None,
    ref_embeddings: ArrayLike | None = None,
    ref_labels: ArrayLike | None = None,
    ref_valid: ArrayLike | None = None,
) -> tuple[jax.Array, Info]:
    r"""The contrastive loss on signal-to-noise ratio distances (Yuan et al. 2019).

    With the SNR distance of anchor :math:`i` to row :math:`j`
    (:func:`jaxmetric.distances.cross_snr_distances`, on L2-normalised rows),

    .. math::
        d_{ij} = \frac{\operatorname{var}(x_j - x_i)}{\operatorname{var}(x_i)}, \qquad
        \ell_{ij} = \begin{cases}
          [d_{ij} - m_+]_+^{\,p} & y_i = y_j\\
          [m - d_{ij}]_+^{\,p}   & y_i \ne y_j
        \end{cases}

    the pairs, reductions and options of :func:`contrastive_loss`. A small SNR distance
    means the difference of the two rows is weak noise against the anchor's signal. The
    defaults (``margin=1``, ``pos_margin=0``, ``power=1``, ``"mean_nonzero"``) are those
    of pytorch-metric-learning's ``SignalToNoiseRatioContrastiveLoss``; its loss, with
    every ordered pair (the distance is not symmetric: both orders count, each with its
    own anchor's variance). The paper adds a regulariser on the mean of the embeddings
    for unnormalised ones; the rows here are normalised, so it is left out (as in PML).

    Args:
      embeddings: (B, D) float embeddings, ``D >= 2`` (any float dtype; computed in
        float32).
      labels: (B,) integer class labels.
      margin, pos_margin, power: as for :func:`contrastive_loss`, in SNR units (a
        variance ratio: 1 is noise as strong as the signal).
      reduction, valid, axis_name, ref_embeddings, ref_labels, ref_valid: as for
        :func:`contrastive_loss`.

    Returns:
      ``(loss, info)`` with the entries of :func:`contrastive_loss` (mean distances in
      SNR units).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxmetric import losses
      >>> emb = jnp.array([[1.0, 0.0, 0.2], [0.8, 0.6, 0.0], [0.0, 1.0, 0.3],
      ...                  [-0.6, 0.8, 0.1]])
      >>> labels = jnp.array([0, 0, 1, 1])
      >>> loss, info = losses.snr_contrastive_loss(emb, labels)
      >>> print(f"{loss:.4f}", info["num_pos_pairs"], info["num_active_neg_pairs"])
      0.5837 4.0 0.0
    """
    return contrastive_loss(
        embeddings, labels, margin=margin, pos_margin=pos_margin, power=power,
        distance=distances.cross_snr_distances, reduction=reduction, valid=valid,
        axis_name=axis_name, ref_embeddings=ref_embeddings, ref_labels=ref_labels,
        ref_valid=ref_valid)
