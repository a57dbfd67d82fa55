r"""FastAP (Cakir et al. 2019): average precision of each anchor's ranking, by histograms.

Each anchor ranks the rest of the (global) batch by distance; its average precision
(AP) is high when its positives come first. AP is a function of the ranking, flat
almost everywhere in the distances, so FastAP replaces ranks by *histograms* of the
distances with soft (triangular) bins, which are differentiable.

With the rows L2-normalised, the squared distance :math:`d_{ij} = \|\hat x_i - \hat
x_j\|^2 = 2 - 2\cos(x_i, x_j)` lies in :math:`[0, 4]`. ``L`` bins (``num_bins``) have
centers :math:`z_l = l \Delta`, :math:`l = 0, \dots, L`, :math:`\Delta = 4 / L`, and a
distance counts in bin :math:`l` with the triangular pulse

.. math::  \delta_l(d) = \max\bigl(0,\ 1 - |d - z_l| / \Delta\bigr),

(every :math:`d \in [0, 4]` counts 1 in total, shared by its two nearest centers). For
anchor :math:`i` with positives :math:`P_i` (the other valid rows of its class) and
negatives :math:`N_i`:

.. math::
    h^+_{il} = \sum_{j \in P_i} \delta_l(d_{ij}), \quad
    h_{il} = \sum_{j \in P_i \cup N_i} \delta_l(d_{ij}), \quad
    H^+_{il} = \sum_{l' \le l} h^+_{il'}, \quad H_{il} = \sum_{l' \le l} h_{il'},

.. math::
    \mathrm{FastAP}_i = \frac{1}{|P_i|} \sum_{l} \frac{h^+_{il} H^+_{il}}{H_{il}},
    \qquad \ell_i = 1 - \mathrm{FastAP}_i \in [0, 1]

(the paper's Eq. (8): the precision :math:`H^+ / H` at each distance, weighted by the
positives found there; a term with :math:`H_{il} = 0` is 0). The loss averages
:math:`\ell_i` over the anchors with at least one positive (``reduction``). The
histograms are ``(R, L + 1)`` sums over ``(L + 1, R, B)`` pulses: memory
:math:`O(L B^2)`, no :math:`B^3` tensor. The gradient reaches the distances through the
pulses (piecewise linear in :math:`d`). This is pytorch-metric-learning's
``FastAPLoss`` with its default ``num_bins=10`` (PML's ``linspace(0, 4, L + 1)``
centers and width :math:`\Delta`).

References:
  F. Cakir, K. He, X. Xia, B. Kulis, S. Sclaroff, "Deep Metric Learning to Rank",
  CVPR 2019.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxmetric import distances
from jaxmetric.losses import class_batch, reductions
from jaxmetric.losses import pair_batch as batch_lib
from jaxmetric.losses.reductions import safe_mean
from jaxmetric.utils import check_choice, check_positive_int

__all__ = ["MAX_DISTANCE", "fastap_loss"]

MAX_DISTANCE = 4.0
"""The largest squared distance of two unit vectors: the histograms span [0, 4]."""

Info = dict[str, jax.Array]


def fastap_loss(
    embeddings: ArrayLike,
    labels: ArrayLike,
    *,
    num_bins: int = 10,
    reduction: str = "mean",
    valid: ArrayLike | None = None,
    axis_name=None,
) -> tuple[jax.Array, Info]:
    r"""FastAP, the histogram-binned average precision loss (Cakir et al. 2019).

    .. math::
        \ell_i = 1 - \frac{1}{|P_i|} \sum_{l=0}^{L} \frac{h^+_{il} H^+_{il}}{H_{il}}

    over the anchors with positives, on the squared distances of the L2-normalised
    rows (module docstring: the bins, the histograms). The same loss as PML's
    ``FastAPLoss`` with its defaults.

    Args:
      embeddings: (B, D) float embeddings (any float dtype; computed in float32; need
        not be normalised).
      labels: (B,) integer class labels.
      num_bins: ``L >= 1``, the number of bins (``L + 1`` centers on [0, 4]).
      reduction: ``"mean"`` over the anchors of the global batch that have a positive
        (the paper, PML), ``"sum"``, or ``"none"``: float32 (R,), each anchor's
        :math:`\ell_i` (0 for an anchor without positives or padded; under
        ``axis_name`` this device's anchors).
      valid: optional bool (B,) mask of real rows; padded rows may hold anything.
      axis_name: mapped axis of the data-parallel batch: every device ranks the global
        batch for its own anchors (:mod:`jaxmetric.losses`).

    Returns:
      ``(loss, info)``: float32 scalar (``"none"``: (R,)); info holds
      ``num_pos_pairs``, ``num_neg_pairs``, ``mean_pos_distance``,
      ``mean_neg_distance`` (squared distances of the normalised rows, in [0, 4]),
      ``num_anchors`` (anchors with a positive), ``num_active_anchors`` (those with
      :math:`\ell_i > 0`), ``active_fraction`` (their share), ``mean_ap`` (mean
      :math:`\mathrm{FastAP}_i` of the anchors), and with ``"none"``
      ``anchor_num_selected`` and ``anchor_num_active``. A NaN or inf in a valid row
      makes the loss and all entries but the pair counts and ``num_anchors`` NaN.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxmetric import losses
      >>> emb = jnp.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]])
      >>> labels = jnp.array([0, 0, 1, 1])
      >>> loss, info = losses.fastap_loss(emb, labels)
      >>> print(f"{loss:.4f}", info["num_anchors"], f"{info['mean_ap']:.4f}")
      0.0000 4.0 1.0000
    """
    check_choice("reduction", reduction, class_batch.ROW_REDUCTIONS)
    num_bins = check_positive_int("num_bins", num_bins)
    b = batch_lib.gather(embeddings, labels, valid, axis_name)
    d = 2.0 * distances.cross_cosine_distances(b.anchors, b.batch)  # in [0, 4]
    pos, neg = batch_lib.pair_masks(b)

    delta = MAX_DISTANCE / num_bins
    centers = jnp.linspace(0.0, MAX_DISTANCE, num_bins + 1, dtype=jnp.float32)
    pulse = jax.nn.relu(1.0 - jnp.abs(d[None] - centers[:, None, None]) / delta)  # (L+1, R, C)
    pos_f = pos.astype(jnp.float32)
    h_pos = jnp.einsum("lrc,rc->rl", pulse, pos_f)
    h_all = h_pos + jnp.einsum("lrc,rc->rl", pulse, neg.astype(jnp.float32))
    cum_pos, cum_all = jnp.cumsum(h_pos, axis=1), jnp.cumsum(h_all, axis=1)
    has = cum_all > 0
    precision = jnp.where(has, cum_pos / jnp.where(has, cum_all, 1.0), 0.0)
    num_pos = reductions.count(pos, 1)
    has_pos = num_pos > 0
    fast_ap = jnp.sum(h_pos * precision, axis=1) / jnp.maximum(num_pos, 1.0)
    total = lambda x: reductions.total(x, axis_name)  # noqa: E731
    mean_ap = safe_mean(total(jnp.where(has_pos, fast_ap, 0.0)), total(has_pos))
    return batch_lib.anchor_loss_finish(b, 1.0 - fast_ap, has_pos, d, pos, neg, reduction,
                                        axis_name, {"mean_ap": mean_ap})
