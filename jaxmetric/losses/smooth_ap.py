r"""Smooth-AP (Brown et al. 2020): average precision with ranks smoothed by a sigmoid.

Each anchor ranks the rest of the (global) batch by cosine similarity
:math:`s_{ij} = \cos(x_i, x_j)`. The rank of row :math:`p` is one plus the number of
rows ranked above it, :math:`1 + \sum_{j \ne p} \mathbb{1}[s_{ij} > s_{ip}]`; Smooth-AP
replaces the step :math:`\mathbb{1}[\cdot]` by a sigmoid with temperature
:math:`\tau`, :math:`G(u) = \sigma(u / \tau) = 1 / (1 + e^{-u/\tau})`, so that the
average precision of anchor :math:`i` with positives :math:`P_i` and every ranked row
:math:`A_i = P_i \cup N_i` (valid, not the anchor itself) becomes

.. math::
    \mathrm{AP}_i = \frac{1}{|P_i|} \sum_{p \in P_i}
        \frac{1 + \sum_{j \in P_i,\, j \ne p} G(s_{ij} - s_{ip})}
             {1 + \sum_{j \in A_i,\, j \ne p} G(s_{ij} - s_{ip})},
    \qquad \ell_i = 1 - \mathrm{AP}_i,

(the paper's Eq. (12): the smoothed rank of each positive among the positives over
its smoothed rank among all rows), averaged over the anchors with a positive. As
:math:`\tau \to 0` it is one minus the exact AP; the default :math:`\tau = 0.01` is the
paper's and pytorch-metric-learning's.

*The anchor itself.* The authors' code, and PML's ``SmoothAPLoss`` that follows it,
also rank the anchor (similarity 1, so first) and count it as one of its own
positives; ``include_anchor=True`` gives that form (then :math:`P_i` and :math:`A_i`
contain :math:`i`). PML's loss also requires sorted labels with the same number of rows
in every class (and, in version 2.9, groups the rows into blocks of the number of
classes rather than of the class size, so it agrees with this one when the two are
equal); this one takes any labels.

*Memory.* Every anchor compares every pair of rows :math:`(p, j)`: ``R * B * B``
sigmoids, a ``B x B x B`` tensor for the whole batch (4 GiB in float32 at B = 1024,
twice that with its gradient). The loss never builds it: anchors are processed in
chunks of :math:`c` rows (``lax.map``), each chunk's ``(c, B, B)`` sigmoids summed away
at once, and the chunk's computation is rematerialised in the backward pass
(``jax.checkpoint``), so the peak memory is :math:`O(c B^2)` in the forward *and* the
backward pass, with :math:`c = \max(1, \lfloor 2^{22} / B^2 \rfloor)`
(:data:`CHUNK_ELEMENTS`: about 16 MiB per buffer; ``c = 1`` for B >= 2048, one
:math:`B^2` buffer per anchor at a time). The time is :math:`O(R B^2)` either way.

References:
  A. Brown, W. Xie, V. Kalogeiton, A. Zisserman, "Smooth-AP: Smoothing the Path
  Towards Large-Scale Image Retrieval", ECCV 2020.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxmetric import distances
from jaxmetric.losses import class_batch, reductions
from jaxmetric.losses import pair_batch as batch_lib
from jaxmetric.losses.reductions import safe_mean
from jaxmetric.utils import check_choice, check_number

__all__ = ["CHUNK_ELEMENTS", "smooth_ap_loss"]

CHUNK_ELEMENTS = 2 ** 22
"""The most sigmoids Smooth-AP evaluates at once (module docstring: memory)."""

Info = dict[str, jax.Array]


def _anchor_ap(s, pos, ranked, temperature):
    """One anchor's sum over its positives of (smoothed rank among the positives) /
    (smoothed rank among every ranked row): ``s`` (B,) its similarities, ``pos`` /
    ``ranked`` float (B,) masks. One (B, B) buffer of sigmoids ``[p, j]``."""
    g = jax.nn.sigmoid((s[None, :] - s[:, None]) / temperature)
    g = jnp.where(jnp.eye(s.shape[0], dtype=bool), 0.0, g)  # j != p
    rank_pos = 1.0 + g @ pos
    rank_all = 1.0 + g @ ranked
    return jnp.sum(pos * rank_pos / rank_all)


def smooth_ap_loss(
    embeddings: ArrayLike,
    labels: ArrayLike,
    *,
    temperature: float = 0.01,
    include_anchor: bool = False,
    reduction: str = "mean",
    valid: ArrayLike | None = None,
    axis_name=None,
) -> tuple[jax.Array, Info]:
    r"""Smooth-AP, average precision with sigmoid-smoothed ranks (Brown et al. 2020).

    .. math::
        \ell_i = 1 - \frac{1}{|P_i|} \sum_{p \in P_i}
            \frac{1 + \sum_{j \in P_i, j \ne p} \sigma((s_{ij} - s_{ip}) / \tau)}
                 {1 + \sum_{j \in A_i, j \ne p} \sigma((s_{ij} - s_{ip}) / \tau)}

    over the anchors with positives, on cosine similarities (module docstring: the
    anchor itself, the memory in anchor chunks).

    Args:
      embeddings: (B, D) float embeddings (any float dtype; computed in float32; need
        not be normalised).
      labels: (B,) integer class labels.
      temperature: :math:`\tau > 0`, the sigmoid's temperature.
      include_anchor: rank the anchor as its own positive (the authors' code and PML's
        ``SmoothAPLoss``); False: the paper's formula.
      reduction: ``"mean"`` over the anchors of the global batch that have a positive,
        ``"sum"``, or ``"none"``: float32 (R,), each anchor's :math:`\ell_i` (0 for an
        anchor without positives or padded; under ``axis_name`` this device's anchors).
      valid: optional bool (B,) mask of real rows; padded rows may hold anything.
      axis_name: mapped axis of the data-parallel batch: every device ranks the global
        batch for its own anchors (:mod:`jaxmetric.losses`).

    Returns:
      ``(loss, info)``: float32 scalar (``"none"``: (R,)); info holds
      ``num_pos_pairs``, ``num_neg_pairs``, ``mean_pos_distance``,
      ``mean_neg_distance`` (cosine distances :math:`1 - s`), ``num_anchors``,
      ``num_active_anchors`` (:math:`\ell_i > 0`), ``active_fraction``, ``mean_ap``
      (mean smoothed AP of the anchors), and with ``"none"`` ``anchor_num_selected``
      and ``anchor_num_active``. A NaN or inf in a valid row makes the loss and all
      entries but the pair counts and ``num_anchors`` NaN.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxmetric import losses
      >>> emb = jnp.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]])
      >>> labels = jnp.array([0, 1, 0, 1])
      >>> loss, info = losses.smooth_ap_loss(emb, labels, temperature=0.1)
      >>> print(f"{loss:.4f}", info["num_anchors"], f"{info['mean_ap']:.4f}")
      0.5834 4.0 0.4166
    """
    check_choice("reduction", reduction, class_batch.ROW_REDUCTIONS)
    check_number("temperature", temperature, positive=True)
    if not isinstance(include_anchor, bool):
        raise TypeError(f"include_anchor must be a bool; got {include_anchor!r}")
    b = batch_lib.gather(embeddings, labels, valid, axis_name)
    d = distances.cross_cosine_distances(b.anchors, b.batch)
    s = 1.0 - d
    pos, neg = batch_lib.pair_masks(b)
    num_pos = reductions.count(pos, 1)
    has_pos = num_pos > 0
    rank_pos, ranked = pos, pos | neg
    if include_anchor:
        columns = jnp.arange(b.labels.shape[0], dtype=jnp.int32)
        self_col = (b.anchor_index[:, None] == columns[None, :]) & b.anchor_valid[:, None]
        rank_pos, ranked = rank_pos | self_col, ranked | self_col

    rows, cols = s.shape
    chunk = max(1, min(rows, CHUNK_ELEMENTS // (cols * cols)))
    per_anchor = jax.checkpoint(lambda x: _anchor_ap(*x, temperature))
    sums = jax.lax.map(per_anchor, (s, rank_pos.astype(jnp.float32),
                                    ranked.astype(jnp.float32)), batch_size=chunk)
    ap = sums / jnp.maximum(reductions.count(rank_pos, 1), 1.0)
    total = lambda x: reductions.total(x, axis_name)  # noqa: E731
    mean_ap = safe_mean(total(jnp.where(has_pos, ap, 0.0)), total(has_pos))
    return batch_lib.anchor_loss_finish(b, 1.0 - ap, has_pos, d, pos, neg, reduction,
                                        axis_name, {"mean_ap": mean_ap})
