r"""Softmax losses over the pairs of a batch: supervised contrastive (SupCon) and NT-Xent.

Both losses score pairs by the cosine similarity of the L2-normalised rows,

.. math::  s_{ij} = \frac{x_i \cdot x_j}{\max(\|x_i\|, \epsilon)\,\max(\|x_j\|, \epsilon)}
           \in [-1, 1], \qquad \epsilon = \mathtt{utils.NORM\_EPS},

computed inside (:func:`jaxmetric.distances.cross_cosine_distances`, ``s = 1 - d``),
so they are right for non-normalised embeddings too (an all-zero row has similarity 0
with everything). Each turns, for an anchor :math:`i`, its similarities divided by a
temperature :math:`\tau` into a softmax over a set of candidates, and pays
:math:`-\log` of the probability of its positives:

- **SupCon** (Khosla et al. 2020, :math:`\mathcal{L}^{sup}_{out}`) puts *all* of the
  anchor's positives and negatives :math:`A(i)` in one softmax and averages the
  log-probability of its positives :math:`P(i)`:

  .. math::  \ell_i = -\frac{1}{|P(i)|} \sum_{p \in P(i)}
             \log \frac{e^{s_{ip}/\tau}}{\sum_{a \in A(i)} e^{s_{ia}/\tau}}
             = \operatorname{LSE}_{a \in A(i)} \frac{s_{ia}}{\tau}
               - \frac{1}{|P(i)|} \sum_{p \in P(i)} \frac{s_{ip}}{\tau}

  One term per anchor with at least one positive.

- **NT-Xent** (Chen et al. 2020, SimCLR; Sohn 2016's N-pair loss at
  :math:`\tau = 1`) makes one softmax *per positive pair*, over that positive and the
  anchor's negatives :math:`N(i)` (the other positives are left out):

  .. math::  \ell_{ip} = -\log \frac{e^{s_{ip}/\tau}}
                                    {e^{s_{ip}/\tau} + \sum_{n \in N(i)} e^{s_{in}/\tau}}
             = \log\left(1 + e^{L_i - s_{ip}/\tau}\right), \qquad
             L_i = \operatorname{LSE}_{n \in N(i)} \frac{s_{in}}{\tau}

  so one log-sum-exp per anchor serves all its positive pairs: O(B²) for all of them.
  With labels that are instance ids and two views per instance (one positive per
  anchor) it is SimCLR's loss exactly; an anchor without negatives costs 0.

**The batch.** Pairs, padding (``valid``), the global batch under ``axis_name``
(``jax.shard_map`` / ``jax.pmap``: each device's anchors against the all-gathered
batch; loss and gradients equal those of one device on the concatenated batch), the
reference set (``ref_embeddings``, ``ref_labels``, ``ref_valid``: anchors from the
batch, positives and negatives from the reference) and the NaN-in-NaN-out rule are
those of :mod:`jaxmetric.losses.pair_batch`, as for :func:`jaxmetric.losses.contrastive_loss`.
Every log-sum-exp is :func:`jaxmetric.losses.reductions.masked_logsumexp`: computed in
float32 whatever the input dtype, finite with zero gradients on empty sets and on
masked-out entries.

**Reduction** (:mod:`jaxmetric.losses.reductions`): SupCon has one term per anchor with a
positive, NT-Xent one per positive pair, grouped per anchor. ``"mean"`` averages them
(the papers), ``"mean_nonzero"`` averages the non-zero ones (pytorch-metric-learning's
``AvgNonZeroReducer``, ``SupConLoss``'s default), ``"sum"``, ``"none"`` gives each
anchor's sum over its terms.

References:
  P. Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020.
  T. Chen, S. Kornblith, M. Norouzi, G. Hinton, "A Simple Framework for Contrastive
  Learning of Visual Representations", ICML 2020.
  K. Sohn, "Improved Deep Metric Learning with Multi-class N-pair Loss Objective",
  NeurIPS 2016.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxmetric.losses import pair_batch as batch_lib
from jaxmetric.losses import reductions
from jaxmetric.losses.reductions import Terms, masked_logsumexp, safe_mean
from jaxmetric.utils import check_choice, check_number

__all__ = ["ntxent_loss", "supcon_loss"]

Info = dict[str, jax.Array]


def _cosine_batch(embeddings, labels, valid, axis_name, ref_embeddings, ref_labels,
                  ref_valid):
    """The batch, its cosine similarities and distances ``1 - s`` (R, C), and masks."""
    b = batch_lib.gather(
        embeddings, labels, valid, axis_name, ref_embeddings=ref_embeddings,
        ref_labels=ref_labels, ref_valid=ref_valid)
    d = batch_lib.distance_matrix(b, "cosine")
    pos, neg = batch_lib.pair_masks(b)
    return b, 1.0 - d, d, pos, neg


def supcon_loss(
    embeddings: ArrayLike,
    labels: ArrayLike,
    *,
    temperature: float = 0.1,
    reduction: str = "mean",
    valid: ArrayLike | None = None,
    axis_name=None,
    ref_embeddings: ArrayLike | None = None,
    ref_labels: ArrayLike | None = None,
    ref_valid: ArrayLike | None = None,
) -> tuple[jax.Array, Info]:
    r"""Supervised contrastive loss (Khosla et al. 2020, :math:`\mathcal{L}^{sup}_{out}`).

    For each anchor :math:`i` with at least one positive, over its positives
    :math:`P(i)` and all its pairs :math:`A(i) = P(i) \cup N(i)` (the anchor itself
    excluded), with cosine similarities :math:`s` (module docstring):

    .. math::  \ell_i = \operatorname{LSE}_{a \in A(i)} \frac{s_{ia}}{\tau}
                 - \frac{1}{|P(i)|} \sum_{p \in P(i)} \frac{s_{ip}}{\tau}
               = -\frac{1}{|P(i)|} \sum_{p \in P(i)} \log
                 \frac{e^{s_{ip}/\tau}}{\sum_{a \in A(i)} e^{s_{ia}/\tau}}

    pytorch-metric-learning's ``SupConLoss`` computes the same terms; it averages the
    non-zero ones by default (``reduction="mean_nonzero"`` here). Where the paper's code
    multiplies by ``temperature / base_temperature`` (0.07), the paper and PML do not,
    nor does this; the code also counts anchors without positives as 0 in its mean,
    here they have no term.

    Args:
      embeddings: (B, D) float embeddings, normalised inside (any float dtype;
        computed in float32).
      labels: (B,) integer class labels.
      temperature: :math:`\tau > 0`.
      reduction: ``"mean"`` over the anchors with a positive (the paper),
        ``"mean_nonzero"`` over those with a non-zero loss (PML), ``"sum"``, or
        ``"none"``: (R,) each anchor's term (0 without a positive).
      valid: optional bool (B,) mask of real rows; padded rows may hold anything.
      axis_name: mapped axis of the global batch (module docstring).
      ref_embeddings, ref_labels, ref_valid: optional reference set (M, D), (M,),
        bool (M,): anchors from the batch, positives and negatives from the reference
        (the same arrays on every device under ``axis_name``).

    Returns:
      ``(loss, info)``: float32 scalar (``"none"``: (R,)); info holds
      ``num_pos_pairs``, ``num_neg_pairs``, ``num_anchors`` (anchors with a positive),
      ``num_active_anchors`` (with a non-zero loss: another pair besides a lone
      positive), ``active_fraction`` (their ratio), ``mean_pos_distance``,
      ``mean_neg_distance`` (cosine distance :math:`1 - s`), and with ``"none"``
      ``anchor_num_selected`` and ``anchor_num_active``. A NaN or inf in a valid
      row makes the loss and all entries but the pair and anchor counts NaN.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxmetric import losses
      >>> emb = jnp.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]])
      >>> labels = jnp.array([0, 0, 1, 1])
      >>> loss, info = losses.supcon_loss(emb, labels, temperature=0.5)
      >>> print(f"{loss:.4f}", info["num_anchors"], info["active_fraction"])
      0.4302 4.0 1.0
      >>> # One positive per anchor: NT-Xent's loss; with more they differ.
      >>> loss, info = losses.supcon_loss(emb, jnp.array([0, 0, 0, 1]), temperature=0.5)
      >>> print(f"{loss:.4f}", info["num_anchors"])
      1.1625 3.0
    """
    check_choice("reduction", reduction, reductions.ANY_REDUCTION)
    check_number("temperature", temperature, positive=True)
    b, s, d, pos, neg = _cosine_batch(embeddings, labels, valid, axis_name, ref_embeddings,
                                      ref_labels, ref_valid)
    logits = s / temperature
    num_pos = reductions.count(pos, 1)
    has_pos = num_pos > 0
    log_denominator = masked_logsumexp(logits, pos | neg, axis=1)
    mean_pos_logit = jnp.sum(jnp.where(pos, logits, 0.0), axis=1) / jnp.maximum(num_pos, 1.0)
    anchor_loss = jnp.where(has_pos, log_denominator - mean_pos_logit, 0.0)
    # > 0 (a non-zero gradient) unless the positive is the anchor's only pair
    active = has_pos & (reductions.count(pos | neg, 1) > 1)
    groups = (Terms(anchor_loss, has_pos.astype(jnp.float32), active.astype(jnp.float32)),)
    loss, ((_, num_anchors, num_active),) = reductions.reduce(groups, reduction, axis_name)

    info = batch_lib.pair_distance_info(d, pos, neg, axis_name)
    info |= {
        "num_anchors": num_anchors,
        "num_active_anchors": num_active,
        "active_fraction": safe_mean(num_active, num_anchors),
    }
    if reduction == "none":
        info.update(reductions.anchor_info(groups))
    exact = ("num_pos_pairs", "num_neg_pairs", "num_anchors")
    return batch_lib.propagate_nonfinite(b, loss, info, exact)


def ntxent_loss(
    embeddings: ArrayLike,
    labels: ArrayLike,
    *,
    temperature: float = 0.07,
    reduction: str = "mean",
    valid: ArrayLike | None = None,
    axis_name=None,
    ref_embeddings: ArrayLike | None = None,
    ref_labels: ArrayLike | None = None,
    ref_valid: ArrayLike | None = None,
) -> tuple[jax.Array, Info]:
    r"""NT-Xent, the normalised temperature-scaled cross entropy (Chen et al. 2020;
    Sohn 2016), with positives from the labels.

    One term per positive pair :math:`(i, p)`, a softmax over that positive and the
    anchor's negatives :math:`N(i)`, with cosine similarities :math:`s`:

    .. math::  \ell_{ip} = -\log \frac{e^{s_{ip}/\tau}}
                                      {e^{s_{ip}/\tau} + \sum_{n \in N(i)} e^{s_{in}/\tau}}
               = \operatorname{softplus}\Bigl(\operatorname{LSE}_{n \in N(i)}
                 \frac{s_{in}}{\tau} - \frac{s_{ip}}{\tau}\Bigr)

    (0 for an anchor without negatives). With one positive per anchor (two views of
    each instance, the instance as the label) this is SimCLR's loss. It is
    pytorch-metric-learning's ``NTXentLoss`` given labels (which averages over the
    positive pairs too; it adds 1e-45-sized constants inside its log).

    Args:
      embeddings: (B, D) float embeddings, normalised inside (any float dtype;
        computed in float32).
      labels: (B,) integer labels (classes, or instance ids for SimCLR).
      temperature: :math:`\tau > 0`.
      reduction: ``"mean"`` over the positive pairs (the paper, PML), ``"mean_nonzero"``
        over those with a non-zero loss, ``"sum"``, or ``"none"``: (R,) each anchor's
        sum over its positive pairs.
      valid: optional bool (B,) mask of real rows; padded rows may hold anything.
      axis_name: mapped axis of the global batch (module docstring).
      ref_embeddings, ref_labels, ref_valid: optional reference set (M, D), (M,),
        bool (M,): anchors from the batch, positives and negatives from the reference
        (the same arrays on every device under ``axis_name``).

    Returns:
      ``(loss, info)``: float32 scalar (``"none"``: (R,)); info holds
      ``num_pos_pairs``, ``num_neg_pairs``, ``num_active_pos_pairs`` (non-zero terms:
      the positive pairs of anchors with a negative), ``active_fraction`` (active /
      positive pairs), ``mean_pos_distance``, ``mean_neg_distance`` (cosine distance
      :math:`1 - s`), and with ``"none"`` ``anchor_num_selected`` and
      ``anchor_num_active``. A NaN or inf in a valid row makes the loss and all
      entries but the pair counts NaN.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxmetric import losses
      >>> emb = jnp.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]])
      >>> labels = jnp.array([0, 0, 1, 1])
      >>> loss, info = losses.ntxent_loss(emb, labels, temperature=0.5)
      >>> print(f"{loss:.4f}", info["num_pos_pairs"], info["active_fraction"])
      0.4302 4.0 1.0
      >>> loss, info = losses.ntxent_loss(emb, jnp.array([0, 0, 0, 1]), temperature=0.5)
      >>> print(f"{loss:.4f}", info["num_pos_pairs"])
      0.5777 6.0
    """
    check_choice("reduction", reduction, reductions.ANY_REDUCTION)
    check_number("temperature", temperature, positive=True)
    b, s, d, pos, neg = _cosine_batch(embeddings, labels, valid, axis_name, ref_embeddings,
                                      ref_labels, ref_valid)
    logits = s / temperature
    has_neg = jnp.any(neg, axis=1, keepdims=True)
    log_negatives = masked_logsumexp(logits, neg, axis=1)[:, None]
    terms = jnp.where(pos & has_neg, jax.nn.softplus(log_negatives - logits), 0.0)
    groups = (Terms(jnp.sum(terms, axis=1), reductions.count(pos, 1),
                    reductions.count(pos & has_neg, 1)),)
    loss, ((_, num_pos, num_active),) = reductions.reduce(groups, reduction, axis_name)

    info = batch_lib.pair_distance_info(d, pos, neg, axis_name)
    info |= {
        "num_active_pos_pairs": num_active,
        "active_fraction": safe_mean(num_active, num_pos),
    }
    if reduction == "none":
        info.update(reductions.anchor_info(groups))
    return batch_lib.propagate_nonfinite(b, loss, info, ("num_pos_pairs", "num_neg_pairs"))
