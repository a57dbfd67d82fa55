r"""Every loss of jaxmetric, one family per module, behind one contract.

Each loss takes a batch of embeddings ``(B, D)`` and integer labels ``(B,)`` and returns
``(loss, info)``: a float32 scalar (or, with ``reduction="none"``, one value per anchor)
and a dict of float32 values to watch while training (pair / triplet counts, the active
fraction, mean distances). Every loss is pure and works under ``jit``, ``vmap`` and
``grad``; the families and what they learn:

==================  =================================================================
module              losses
==================  =================================================================
``contrastive``     :func:`contrastive_loss` (Hadsell et al. 2006), every pair;
                    :func:`snr_contrastive_loss` (Yuan et al. 2019), on SNR distances
``triplet``         :func:`triplet_loss` (FaceNet), mined triplets (:mod:`jaxmetric.mining`)
``softmax``         :func:`supcon_loss`, :func:`ntxent_loss`
``weighted_pair``   :func:`multi_similarity_loss`, :func:`circle_loss`,
                    :func:`lifted_structure_loss`
``margin``          :func:`margin_loss` (Wu et al. 2017), a learned boundary beta,
                    optionally on distance-weighted samples
``proxy``           :func:`proxy_anchor_loss`, :func:`proxy_nca_loss`
``margin_softmax``  :func:`arcface_loss`, :func:`cosface_loss`,
                    :func:`normalized_softmax_loss`, :func:`subcenter_arcface_loss`
``soft_triple``     :func:`soft_triple_loss` (Qian et al. 2019), K centers per class
``fastap``          :func:`fastap_loss` (Cakir et al. 2019), histogram-binned AP
``smooth_ap``       :func:`smooth_ap_loss` (Brown et al. 2020), sigmoid-ranked AP
==================  =================================================================

The shared inputs live beside them: :mod:`~jaxmetric.losses.pair_batch` (a batch of
anchors against columns, for the pair losses), :mod:`~jaxmetric.losses.class_batch`
(embeddings against learned class vectors), :mod:`~jaxmetric.losses.reductions` (sums
over the global batch) and :mod:`~jaxmetric.losses.xbm` (the cross-batch memory).
:mod:`~jaxmetric.losses.registry` maps each loss's name to its function and its
training defaults.

The contract every loss keeps:

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
in the loss by itself depends on accidents of the arithmetic: a NaN distance of a pair
the masks leave out is dropped by ``where``, a comparison ``d > 0`` is false for NaN,
+inf distances vanish in ``relu(m - d) = 0`` and are never the ``min`` picked as the
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

**Large finite inputs.** The normalisation and the distances scale each row by a power
of two before squaring (:mod:`jaxmetric.distances`), so no row of finite norm is
mistaken for a zero or a NaN one: the cosine losses (SupCon, NT-Xent, Multi-Similarity,
Circle, the proxy and margin-softmax losses, SoftTriple, FastAP, Smooth-AP and the SNR
contrastive loss, which all normalise the rows) give the same value for ``c * x`` as for
``x`` at every finite ``c > 0``, with finite gradients; the ``"l2"`` distance is right up
to ~3e38 and ``"squared_l2"`` up to squared distances of ~3e38 (distances of ~1.8e19),
beyond which it is ``inf``: a Euclidean loss is then right or visibly inf / NaN, and a
finite loss comes with a finite gradient (``tests/test_overflow.py``).

References:
  A. Kak, C. Bouman, "Metric Learning", Purdue lecture slides (sections 2-4); each
  family's module names its papers.
"""

from jaxmetric.losses import registry
from jaxmetric.losses.contrastive import contrastive_loss, snr_contrastive_loss
from jaxmetric.losses.fastap import fastap_loss
from jaxmetric.losses.margin import MARGIN_PAIRS, MARGIN_SAMPLING, margin_loss
from jaxmetric.losses.margin_softmax import (
    arcface_loss,
    cosface_loss,
    normalized_softmax_loss,
    subcenter_arcface_loss,
)
from jaxmetric.losses.proxy import proxy_anchor_loss, proxy_nca_loss
from jaxmetric.losses.reductions import REDUCTIONS
from jaxmetric.losses.smooth_ap import smooth_ap_loss
from jaxmetric.losses.soft_triple import soft_triple_loss
from jaxmetric.losses.softmax import ntxent_loss, supcon_loss
from jaxmetric.losses.triplet import MINING_MODES, SOFT_MINING_MODES, triplet_loss
from jaxmetric.losses.weighted_pair import (
    circle_loss,
    lifted_structure_loss,
    multi_similarity_loss,
)

__all__ = [
    "MARGIN_SAMPLING",
    "MARGIN_PAIRS",
    "MINING_MODES",
    "REDUCTIONS",
    "SOFT_MINING_MODES",
    "arcface_loss",
    "circle_loss",
    "contrastive_loss",
    "cosface_loss",
    "fastap_loss",
    "lifted_structure_loss",
    "margin_loss",
    "multi_similarity_loss",
    "normalized_softmax_loss",
    "ntxent_loss",
    "proxy_anchor_loss",
    "proxy_nca_loss",
    "registry",
    "smooth_ap_loss",
    "snr_contrastive_loss",
    "soft_triple_loss",
    "subcenter_arcface_loss",
    "supcon_loss",
    "triplet_loss",
]
