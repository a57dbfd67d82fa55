r"""Pair losses that weight each pair by how hard it is: Multi-Similarity, Circle and
generalised Lifted Structure.

Each loss is a sum over an anchor's positive pairs :math:`P(i)` and negative pairs
:math:`N(i)` (the anchor itself and padded rows excluded) in which a pair's share of the
gradient grows with its violation: through a log-sum-exp (the first three), or the
margin loss (:mod:`jaxmetric.losses.margin`) weights them by a hinge around a learned
boundary instead.

**Similarities and distances.** Multi-Similarity and Circle score pairs by the cosine
similarity of the L2-normalised rows,

.. math::  s_{ij} = \frac{x_i \cdot x_j}{\max(\|x_i\|, \epsilon)\,\max(\|x_j\|, \epsilon)},
           \qquad \epsilon = \mathtt{utils.NORM\_EPS},

computed inside (``s = 1 - d`` of :func:`jaxmetric.distances.cross_cosine_distances`),
so they are right for non-normalised embeddings too. The lifted structure and margin
losses take a ``distance`` (:data:`jaxmetric.distances.DISTANCES` or a callable), the
Euclidean one by default as in their papers, on the embeddings as given: the papers (and
pytorch-metric-learning's default ``LpDistance(normalize_embeddings=True)``) use
unit-norm embeddings, which jaxmetric's model heads produce; normalise them first
otherwise.

**Multi-Similarity** (Wang et al. 2019). Pair mining first (on the similarities,
without gradient): a positive pair is kept if it is less similar than the anchor's most
similar negative plus :math:`\epsilon`, a negative pair if it is more similar than the
anchor's least similar positive minus :math:`\epsilon`,

.. math::  \tilde P(i) = \{p : s_{ip} - \epsilon < \max_{n \in N(i)} s_{in}\}, \qquad
           \tilde N(i) = \{n : s_{in} + \epsilon > \min_{p \in P(i)} s_{ip}\},

then, with :math:`\lambda` the ``base``,

.. math::  \ell_i = \frac{1}{\alpha} \log\Bigl(1 + \sum_{p \in \tilde P(i)}
                    e^{-\alpha (s_{ip} - \lambda)}\Bigr)
                  + \frac{1}{\beta} \log\Bigl(1 + \sum_{n \in \tilde N(i)}
                    e^{\beta (s_{in} - \lambda)}\Bigr).

**Circle** (Sun et al. 2020, pair-wise labels). With :math:`O_p = 1 + m`,
:math:`O_n = -m`, :math:`\Delta_p = 1 - m`, :math:`\Delta_n = m` and the self-paced
weights :math:`\alpha_{ip} = [O_p - s_{ip}]_+`, :math:`\alpha_{in} = [s_{in} - O_n]_+`
(constants for the gradient: computed on the similarities without gradient, as the
paper's reference code and pytorch-metric-learning do),

.. math::  \ell_i = \log\Bigl(1 + \sum_{n \in N(i)} e^{\gamma \alpha_{in}(s_{in} -
                    \Delta_n)} \sum_{p \in P(i)} e^{-\gamma \alpha_{ip}(s_{ip} -
                    \Delta_p)}\Bigr)
                  = \operatorname{softplus}\bigl(\operatorname{LSE}_n + \operatorname{LSE}_p\bigr).

**Generalised lifted structure** (Hermans et al. 2017, eq. 5, with
pytorch-metric-learning's positive margin :math:`m_+`), with distances :math:`D`:

.. math::  \ell_i = \Bigl[\log \sum_{p \in P(i)} e^{D_{ip} - m_+}
                    + \log \sum_{n \in N(i)} e^{m - D_{in}}\Bigr]_+ .

**Empty sets.** A log-sum-exp over no pair is :math:`-\infty`: an anchor without a
positive or without a negative has no Circle or lifted-structure term, and
Multi-Similarity's ``log(1 + ...)`` over no mined pair is 0. Every log-sum-exp is
:func:`jaxmetric.losses.reductions.masked_logsumexp` (float32, finite with zero gradients on
empty sets and masked-out entries).

**The batch** (padding with ``valid``, the global batch under ``axis_name``, the
reference set ``ref_embeddings`` / ``ref_labels`` / ``ref_valid``, NaN in NaN out) is
that of :mod:`jaxmetric.losses.pair_batch`, as for :func:`jaxmetric.losses.contrastive_loss`; under
``axis_name`` the loss and the gradient reaching each shard equal those of one device
on the concatenated batch. The margin loss's :math:`\beta` is a replicated parameter
like the network's: inside ``jax.shard_map`` (varying axes checked, the default) JAX
sums its gradient over the devices itself, under ``jax.pmap`` each device holds its
contribution, to ``psum`` (what :func:`jaxmetric.train.step.train_step` does for every
parameter).

**Reduction** (:mod:`jaxmetric.losses.reductions`): Multi-Similarity, Circle and lifted
structure have one term per anchor, the margin loss one per pair; each loss's docstring
says which terms ``"mean"`` averages over; ``"mean_nonzero"`` averages the non-zero
ones (pytorch-metric-learning's ``AvgNonZeroReducer``), ``"sum"`` adds them, ``"none"``
gives each anchor's sum.

References:
  X. Wang, X. Han, W. Huang, D. Dong, M. R. Scott, "Multi-Similarity Loss with General
  Pair Weighting for Deep Metric Learning", CVPR 2019.
  Y. Sun et al., "Circle Loss: A Unified Perspective of Pair Similarity Optimization",
  CVPR 2020.
  A. Hermans, L. Beyer, B. Leibe, "In Defense of the Triplet Loss for Person
  Re-Identification", arXiv:1703.07737, 2017 (generalised lifted structure, eq. 5).
  """

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxmetric import distances
from jaxmetric.losses import pair_batch as batch_lib
from jaxmetric.losses import reductions
from jaxmetric.losses.reductions import Terms, masked_logsumexp, safe_mean
from jaxmetric.utils import check_choice, check_number

__all__ = [
    "circle_loss",
    "lifted_structure_loss",
    "multi_similarity_loss",
]

Info = dict[str, jax.Array]




# -------------------------------------------------------------------- Multi-Similarity


def multi_similarity_loss(
    embeddings: ArrayLike,
    labels: ArrayLike,
    *,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    mining_epsilon: float | None = 0.1,
    reduction: str = "mean",
    valid: ArrayLike | None = None,
    axis_name=None,
    ref_embeddings: ArrayLike | None = None,
    ref_labels: ArrayLike | None = None,
    ref_valid: ArrayLike | None = None,
) -> tuple[jax.Array, Info]:
    r"""Multi-Similarity loss with its pair mining (Wang et al. 2019).

    Per anchor, over its mined positives :math:`\tilde P(i)` and negatives
    :math:`\tilde N(i)` (module docstring), with cosine similarities :math:`s`:

    .. math::  \ell_i = \frac{1}{\alpha} \log\Bigl(1 + \sum_{p \in \tilde P(i)}
                        e^{-\alpha (s_{ip} - \lambda)}\Bigr)
                      + \frac{1}{\beta} \log\Bigl(1 + \sum_{n \in \tilde N(i)}
                        e^{\beta (s_{in} - \lambda)}\Bigr)

    The paper's loss is mining plus weighting; pytorch-metric-learning splits them
    into ``MultiSimilarityMiner(epsilon)`` and ``MultiSimilarityLoss``, and this equals
    the loss given the miner's pairs (the defaults are the paper's and PML's).
    ``mining_epsilon=None`` uses every pair: PML's ``MultiSimilarityLoss`` alone.

    Args:
      embeddings: (B, D) float embeddings, normalised inside (any float dtype;
        computed in float32).
      labels: (B,) integer class labels.
      alpha: :math:`\alpha > 0`, the positive pairs' scale.
      beta: :math:`\beta > 0`, the negative pairs' scale.
      base: :math:`\lambda`, the similarity the pairs are pushed past.
      mining_epsilon: the mining margin :math:`\epsilon \ge 0`, or None: no mining.
      reduction: ``"mean"`` over the valid anchors (the paper's :math:`1/m`),
        ``"mean_nonzero"`` over the anchors with a non-zero loss, ``"sum"``, or
        ``"none"``: (R,) each anchor's term.
      valid: optional bool (B,) mask of real rows; padded rows may hold anything.
      axis_name: mapped axis of the global batch (module docstring).
      ref_embeddings, ref_labels, ref_valid: optional reference set (M, D), (M,),
        bool (M,): anchors from the batch, positives and negatives from the reference
        (the same arrays on every device under ``axis_name``).

    Returns:
      ``(loss, info)``: float32 scalar (``"none"``: (R,)); info holds
      ``num_pos_pairs``, ``num_neg_pairs``, ``num_mined_pos_pairs``,
      ``num_mined_neg_pairs``, ``active_fraction`` (mined pairs / pairs: the pairs with
      a non-zero gradient), ``num_anchors`` (valid anchors), ``num_active_anchors``
      (with a mined pair), ``mean_pos_distance``, ``mean_neg_distance`` (cosine distance
      :math:`1 - s`), and with ``"none"`` ``anchor_num_selected`` and
      ``anchor_num_active``. A NaN or inf in a valid row makes the loss and all
      entries but ``num_pos_pairs``, ``num_neg_pairs`` and ``num_anchors`` NaN.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxmetric import losses
      >>> emb = jnp.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]])
      >>> labels = jnp.array([0, 0, 1, 1])
      >>> loss, info = losses.multi_similarity_loss(emb, labels)  # an easy batch
      >>> print(f"{loss:.4f}", info["num_mined_pos_pairs"], info["num_mined_neg_pairs"])
      0.0000 0.0 0.0
      >>> loss, info = losses.multi_similarity_loss(emb, labels, mining_epsilon=None)
      >>> print(f"{loss:.4f}", info["active_fraction"])
      0.2688 1.0
      >>> hard = jnp.array([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6], [0.0, 1.0]])
      >>> loss, info = losses.multi_similarity_loss(hard, labels)
      >>> print(f"{loss:.4f}", info["num_mined_pos_pairs"], info["num_mined_neg_pairs"])
      0.6791 4.0 6.0
    """
    check_choice("reduction", reduction, reductions.ANY_REDUCTION)
    check_number("alpha", alpha, positive=True)
    check_number("beta", beta, positive=True)
    check_number("base", base)
    if mining_epsilon is not None:
        check_number("mining_epsilon", mining_epsilon, minimum=0.0)
    b = batch_lib.gather(
        embeddings, labels, valid, axis_name, ref_embeddings=ref_embeddings,
        ref_labels=ref_labels, ref_valid=ref_valid)
    d = batch_lib.distance_matrix(b, "cosine")
    s = 1.0 - d
    pos, neg = batch_lib.pair_masks(b)

    if mining_epsilon is None:
        mined_pos, mined_neg = pos, neg
    else:
        ss = jax.lax.stop_gradient(s)
        most_similar_neg = jnp.max(jnp.where(neg, ss, -jnp.inf), axis=1, keepdims=True)
        least_similar_pos = jnp.min(jnp.where(pos, ss, jnp.inf), axis=1, keepdims=True)
        mined_pos = pos & (ss - mining_epsilon < most_similar_neg)
        mined_neg = neg & (ss + mining_epsilon > least_similar_pos)

    def soft_term(logits, mask, scale):  # (1/scale) log(1 + sum_mask exp(logits))
        has = jnp.any(mask, axis=1)
        lse = masked_logsumexp(logits, mask, axis=1)
        return jnp.where(has, jax.nn.softplus(lse), 0.0) / scale

    anchor_loss = (soft_term(-alpha * (s - base), mined_pos, alpha)
                   + soft_term(beta * (s - base), mined_neg, beta))
    anchor_loss = jnp.where(b.anchor_valid, anchor_loss, 0.0)
    has_mined = jnp.any(mined_pos | mined_neg, axis=1)
    groups = (Terms(anchor_loss, b.anchor_valid.astype(jnp.float32),
                    has_mined.astype(jnp.float32)),)
    loss, ((_, num_anchors, num_active),) = reductions.reduce(groups, reduction, axis_name)

    total = lambda x: reductions.total(x, axis_name)  # noqa: E731
    info = batch_lib.pair_distance_info(d, pos, neg, axis_name)
    num_mined_pos, num_mined_neg = total(mined_pos), total(mined_neg)
    info |= {
        "num_mined_pos_pairs": num_mined_pos,
        "num_mined_neg_pairs": num_mined_neg,
        "active_fraction": safe_mean(num_mined_pos + num_mined_neg,
                                     info["num_pos_pairs"] + info["num_neg_pairs"]),
        "num_anchors": num_anchors,
        "num_active_anchors": num_active,
    }
    exact = batch_lib.PAIR_COUNTS + ("num_anchors",)
    return batch_lib.finish(b, loss, info, groups, reduction, exact)


# ------------------------------------------------------------------------------ Circle


def circle_loss(
    embeddings: ArrayLike,
    labels: ArrayLike,
    *,
    m: float = 0.4,
    gamma: float = 80.0,
    reduction: str = "mean",
    valid: ArrayLike | None = None,
    axis_name=None,
    ref_embeddings: ArrayLike | None = None,
    ref_labels: ArrayLike | None = None,
    ref_valid: ArrayLike | None = None,
) -> tuple[jax.Array, Info]:
    r"""Circle loss with pair-wise labels (Sun et al. 2020).

    Per anchor with at least one positive and one negative, with cosine
    similarities :math:`s` and the self-paced weights of the module docstring:

    .. math::  \ell_i = \log\Bigl(1 + \sum_{n \in N(i)} e^{\gamma \alpha_{in}(s_{in} -
                        m)} \sum_{p \in P(i)} e^{-\gamma \alpha_{ip}(s_{ip} - 1 + m)}
                        \Bigr), \quad \alpha_{ip} = [1 + m - s_{ip}]_+,\;
                        \alpha_{in} = [s_{in} + m]_+

    The defaults (:math:`m = 0.4`, :math:`\gamma = 80`) are the paper's for
    fine-grained image retrieval and pytorch-metric-learning's ``CircleLoss``, which
    computes the same terms and averages the non-zero ones by default
    (``reduction="mean_nonzero"``; with the softplus every anchor with a term is
    non-zero, so this is ``"mean"``).

    Args:
      embeddings: (B, D) float embeddings, normalised inside (any float dtype;
        computed in float32).
      labels: (B,) integer class labels.
      m: the relaxation margin.
      gamma: :math:`\gamma > 0`, the scale.
      reduction: ``"mean"`` over the anchors with a positive and a negative,
        ``"mean_nonzero"``, ``"sum"``, or ``"none"``: (R,) each anchor's term (0
        without one).
      valid: optional bool (B,) mask of real rows; padded rows may hold anything.
      axis_name: mapped axis of the global batch (module docstring).
      ref_embeddings, ref_labels, ref_valid: optional reference set (M, D), (M,),
        bool (M,): anchors from the batch, positives and negatives from the reference
        (the same arrays on every device under ``axis_name``).

    Returns:
      ``(loss, info)``: float32 scalar (``"none"``: (R,)); info holds
      ``num_pos_pairs``, ``num_neg_pairs``, ``num_anchors`` (with a positive and a
      negative), ``num_active_pairs`` (pairs of those anchors with a non-zero weight
      :math:`\alpha`, i.e. a non-zero gradient; a negative with :math:`s \le -m` has
      none), ``active_fraction`` (active pairs / pairs), ``mean_pos_distance``,
      ``mean_neg_distance`` (cosine distance :math:`1 - s`), and with ``"none"``
      ``anchor_num_selected`` and ``anchor_num_active``. A NaN or inf in a valid row
      makes the loss and all entries but the pair and anchor counts NaN.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxmetric import losses
      >>> emb = jnp.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]])
      >>> labels = jnp.array([0, 0, 1, 1])
      >>> loss, info = losses.circle_loss(emb, labels, m=0.25, gamma=32.0)
      >>> print(f"{loss:.4f}", info["num_anchors"], info["active_fraction"])
      4.6201 4.0 0.8333333
    """
    check_choice("reduction", reduction, reductions.ANY_REDUCTION)
    check_number("m", m)
    check_number("gamma", gamma, positive=True)
    b = batch_lib.gather(
        embeddings, labels, valid, axis_name, ref_embeddings=ref_embeddings,
        ref_labels=ref_labels, ref_valid=ref_valid)
    d = batch_lib.distance_matrix(b, "cosine")
    s = 1.0 - d
    pos, neg = batch_lib.pair_masks(b)

    ss = jax.lax.stop_gradient(s)
    alpha_p = jax.nn.relu(1.0 + m - ss)
    alpha_n = jax.nn.relu(ss + m)
    lse_p = masked_logsumexp(-gamma * alpha_p * (s - (1.0 - m)), pos, axis=1)
    lse_n = masked_logsumexp(gamma * alpha_n * (s - m), neg, axis=1)
    has_term = jnp.any(pos, axis=1) & jnp.any(neg, axis=1)
    anchor_loss = jnp.where(has_term, jax.nn.softplus(lse_p + lse_n), 0.0)
    # softplus > 0: every term is active (even where float32 rounds it to 0)
    has_term = has_term.astype(jnp.float32)
    groups = (Terms(anchor_loss, has_term, has_term),)
    loss, ((_, num_anchors, _),) = reductions.reduce(groups, reduction, axis_name)

    weighted = ((pos & (alpha_p > 0)) | (neg & (alpha_n > 0))) & (has_term[:, None] > 0)
    info = batch_lib.pair_distance_info(d, pos, neg, axis_name)
    num_active = reductions.total(weighted, axis_name)
    info |= {
        "num_anchors": num_anchors,
        "num_active_pairs": num_active,
        "active_fraction": safe_mean(num_active,
                                     info["num_pos_pairs"] + info["num_neg_pairs"]),
    }
    exact = batch_lib.PAIR_COUNTS + ("num_anchors",)
    return batch_lib.finish(b, loss, info, groups, reduction, exact)


# ------------------------------------------------------------ generalised lifted structure


def lifted_structure_loss(
    embeddings: ArrayLike,
    labels: ArrayLike,
    *,
    neg_margin: float = 1.0,
    pos_margin: float = 0.0,
    distance: str | distances.DistanceFn = "l2",
    reduction: str = "mean",
    valid: ArrayLike | None = None,
    axis_name=None,
    ref_embeddings: ArrayLike | None = None,
    ref_labels: ArrayLike | None = None,
    ref_valid: ArrayLike | None = None,
) -> tuple[jax.Array, Info]:
    r"""Generalised lifted structure loss (Hermans et al. 2017, eq. 5).

    Per anchor with at least one positive and one negative, with distances
    :math:`D` (Euclidean by default):

    .. math::  \ell_i = \Bigl[\log \sum_{p \in P(i)} e^{D_{ip} - m_+}
                        + \log \sum_{n \in N(i)} e^{m - D_{in}}\Bigr]_+

    a smooth version of batch-hard mining: the log-sum-exps are soft maxima of the
    positive distances and of the negative margins. :math:`m_+ = 0` is the paper's
    loss; pytorch-metric-learning's ``GeneralizedLiftedStructureLoss`` adds ``pos_margin``
    and computes the same terms, but gives an empty set a log-sum-exp of 0 instead of
    :math:`-\infty` (an anchor without positives costs :math:`[\log \sum_n e^{m -
    D_{in}}]_+` there, nothing here) and averages over all anchors. Not Song et al.'s
    lifted structure loss (PML's ``LiftedStructureLoss``), which is per positive pair.

    Args:
      embeddings: (B, D) float embeddings (any float dtype; computed in float32).
      labels: (B,) integer class labels.
      neg_margin: :math:`m \ge 0`, in the distance's units.
      pos_margin: :math:`m_+ \ge 0`, in the distance's units.
      distance: ``"l2"`` (default), ``"squared_l2"``, ``"cosine"`` or a callable
        (:mod:`jaxmetric.distances`).
      reduction: ``"mean"`` over the anchors with a positive and a negative,
        ``"mean_nonzero"`` over those with a non-zero loss, ``"sum"``, or ``"none"``:
        (R,) each anchor's term (0 without one).
      valid: optional bool (B,) mask of real rows; padded rows may hold anything.
      axis_name: mapped axis of the global batch (module docstring).
      ref_embeddings, ref_labels, ref_valid: optional reference set (M, D), (M,),
        bool (M,): anchors from the batch, positives and negatives from the reference
        (the same arrays on every device under ``axis_name``).

    Returns:
      ``(loss, info)``: float32 scalar (``"none"``: (R,)); info holds
      ``num_pos_pairs``, ``num_neg_pairs``, ``num_anchors`` (with a positive and a
      negative), ``num_active_anchors`` (a non-zero loss, hence gradient),
      ``active_fraction`` (their ratio), ``mean_pos_distance``, ``mean_neg_distance``,
      and with ``"none"`` ``anchor_num_selected`` and ``anchor_num_active``. A NaN or
      inf in a valid row makes the loss and all entries but the pair and anchor counts
      NaN.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxmetric import losses
      >>> emb = jnp.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]])
      >>> labels = jnp.array([0, 0, 1, 1])
      >>> loss, info = losses.lifted_structure_loss(emb, labels)
      >>> print(f"{loss:.4f}", info["num_anchors"], info["active_fraction"])
      0.9731 4.0 1.0
    """
    check_choice("reduction", reduction, reductions.ANY_REDUCTION)
    check_number("neg_margin", neg_margin, minimum=0.0)
    check_number("pos_margin", pos_margin, minimum=0.0)
    distances.resolve(distance)
    b = batch_lib.gather(
        embeddings, labels, valid, axis_name, ref_embeddings=ref_embeddings,
        ref_labels=ref_labels, ref_valid=ref_valid)
    d = batch_lib.distance_matrix(b, distance)
    pos, neg = batch_lib.pair_masks(b)

    lse_p = masked_logsumexp(d - pos_margin, pos, axis=1)
    lse_n = masked_logsumexp(neg_margin - d, neg, axis=1)
    has_term = jnp.any(pos, axis=1) & jnp.any(neg, axis=1)
    anchor_loss = jnp.where(has_term, jax.nn.relu(lse_p + lse_n), 0.0)
    groups = (batch_lib.anchor_terms(anchor_loss, has_term),)
    loss, ((_, num_anchors, num_active),) = reductions.reduce(groups, reduction, axis_name)

    info = batch_lib.pair_distance_info(d, pos, neg, axis_name)
    info |= {
        "num_anchors": num_anchors,
        "num_active_anchors": num_active,
        "active_fraction": safe_mean(num_active, num_anchors),
    }
    exact = batch_lib.PAIR_COUNTS + ("num_anchors",)
    return batch_lib.finish(b, loss, info, groups, reduction, exact)
