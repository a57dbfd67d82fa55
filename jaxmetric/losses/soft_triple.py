r"""SoftTriple (Qian et al. 2019): a softmax classifier with ``K`` centers per class.

SoftTriple learns ``K`` centers :math:`w_{c1}, \dots, w_{cK}` per class and compares
each row with a class through a *soft maximum* of its cosines to the class's centers:
with :math:`s_{ick} = \cos(x_i, w_{ck})` (rows and centers L2-normalised,
:mod:`jaxmetric.losses.class_batch`) and :math:`\gamma > 0`,

.. math::
    S_{ic} = \sum_{k} q_{ick}\, s_{ick}, \qquad
    q_{ick} = \frac{e^{s_{ick} / \gamma}}{\sum_{k'} e^{s_{ick'} / \gamma}},

which tends to :math:`\max_k s_{ick}` as :math:`\gamma \to 0` and to the mean as
:math:`\gamma \to \infty`. The loss of a row is the cross-entropy of the scaled
similarities, with a margin :math:`\delta` taken off the own class:

.. math::
    \ell_i = -\log \frac{e^{\lambda (S_{i y_i} - \delta)}}
             {e^{\lambda (S_{i y_i} - \delta)} + \sum_{c \ne y_i} e^{\lambda S_{ic}}}

computed as a ``logsumexp`` of the ``(R, C)`` logits, as for the margin-softmax losses
(:mod:`jaxmetric.losses.margin_softmax`); with ``K = 1`` it is CosFace with scale
:math:`\lambda` and margin :math:`\delta`. The paper's regulariser merges centers of a
class that come close: with the unit centers :math:`\hat w`,

.. math::
    R = \frac{1}{C K (K - 1)} \sum_{c} \sum_{t < u}
        \sqrt{2 + \epsilon - 2\, \hat w_{ct} \cdot \hat w_{cu}}

(:math:`\|\hat w_{ct} - \hat w_{cu}\|` with :math:`\epsilon = 10^{-5}` as in the
authors' code, so the gradient is finite where two centers coincide; 0 for ``K = 1``),
and the loss is :math:`\frac{1}{N}\sum_i \ell_i + \tau R`. Each row carries
:math:`\tau R` in its term (:math:`\ell_i + \tau R`), so every reduction keeps the
contract of :mod:`jaxmetric.losses` (``"mean"`` is the paper's loss; ``"none"`` gives
each row's :math:`\ell_i + \tau R`), and under ``axis_name`` the regulariser's gradient
is counted once per row of the global batch like the rest.

*Defaults.* :math:`\lambda = 20`, :math:`\gamma = 0.1`, :math:`\delta = 0.01` and ``K =
10``, the paper's and pytorch-metric-learning's ``SoftTripleLoss`` (whose ``gamma=0.1``
is the same :math:`\gamma`, used as a factor ``1 / gamma``). PML's loss has no
regulariser, hence ``tau = 0`` by default (the loss of ``SoftTripleLoss``); the paper
uses :math:`\tau = 0.2`. Memory: the ``(R, C*K)`` cosines and, for :math:`R`, one
``(C, K, K)`` Gram tensor of the centers.

References:
  Q. Qian, L. Shang, B. Sun, J. Hu, H. Li, R. Jin, "SoftTriple Loss: Deep Metric
  Learning Without Triplet Sampling", ICCV 2019.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxmetric import distances
from jaxmetric.losses import class_batch
from jaxmetric.utils import check_number, check_positive_int

__all__ = ["CENTER_EPS", "center_spread", "soft_triple_loss"]

CENTER_EPS = 1e-5
""":math:`\\epsilon` under the square root of the regulariser (module docstring)."""

Info = dict[str, jax.Array]


def center_spread(centers: ArrayLike) -> jax.Array:
    r"""The regulariser :math:`R` of ``centers`` (C, K, D) (module docstring): the sum
    over every class of the (smoothed) distances between its unit centers, over
    :math:`C K (K - 1)`; 0 for ``K = 1``. float32 scalar.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxmetric.losses.soft_triple import center_spread
      >>> w = jnp.array([[[1.0, 0.0], [0.0, 1.0]]])  # one class, two orthogonal centers
      >>> print(f"{center_spread(w):.4f}")  # sqrt(2) / (1 * 2 * 1)
      0.7071
    """
    w = distances.l2_normalize(jnp.asarray(centers).astype(jnp.float32))
    num_classes, k, _ = w.shape
    if k < 2:
        return jnp.float32(0.0)
    gram = jnp.einsum("ckd,cjd->ckj", w, w, precision=jax.lax.Precision.HIGHEST)
    upper = jnp.triu(jnp.ones((k, k), bool), 1)
    dist = jnp.sqrt(jnp.maximum(2.0 - 2.0 * gram, 0.0) + CENTER_EPS)
    return jnp.sum(jnp.where(upper, dist, 0.0)) / (num_classes * k * (k - 1))


def soft_triple_loss(
    embeddings: ArrayLike,
    labels: ArrayLike,
    weights: ArrayLike,
    *,
    centers: int = 10,
    la: float = 20.0,
    gamma: float = 0.1,
    margin: float = 0.01,
    tau: float = 0.0,
    reduction: str = "mean",
    valid: ArrayLike | None = None,
    axis_name=None,
) -> tuple[jax.Array, Info]:
    r"""SoftTriple loss (Qian et al. 2019): ``K`` centers per class, a soft maximum.

    .. math::
        \ell_i = -\log \frac{e^{\lambda (S_{i y_i} - \delta)}}
                 {e^{\lambda (S_{i y_i} - \delta)} + \sum_{c \ne y_i} e^{\lambda S_{ic}}}
                 + \tau R, \qquad
        S_{ic} = \sum_k \mathrm{softmax}_k(s_{ick} / \gamma)\, s_{ick}

    (module docstring: the soft maximum, the regulariser :math:`R`). The same loss as
    PML's ``SoftTripleLoss`` with its defaults (``tau=0``).

    Args:
      embeddings: (B, D) float embeddings (any float dtype; computed in float32; need
        not be normalised).
      labels: (B,) integer class ids in ``[0, C)``.
      weights: the learnable centers, (C, K, D) float, or (C*K, D) with class ``c``'s
        centers in rows ``c*K`` to ``c*K + K - 1`` (PML's layout;
        :func:`jaxmetric.losses.margin_softmax.init_weights` with ``C*K`` rows).
      centers: ``K >= 1``, the centers per class.
      la: the scale :math:`\lambda > 0`.
      gamma: :math:`\gamma > 0`, the temperature of the soft maximum over the centers.
      margin: :math:`\delta \ge 0`, in cosine units.
      tau: :math:`\tau \ge 0`, the weight of the regulariser (the paper: 0.2).
      reduction: ``"mean"`` over the valid rows of the global batch, ``"sum"``, or
        ``"none"``: float32 (R,), each row's :math:`\ell_i + \tau R` (0 for padded
        rows; under ``axis_name`` this device's rows).
      valid: optional bool (B,) mask of real rows; padded rows may hold anything.
      axis_name: mapped axis of the data-parallel batch (as for
        :func:`jaxmetric.losses.arcface_loss`; the centers are replicated).

    Returns:
      ``(loss, info)``: float32 scalar (``"none"``: (R,)); info holds the entries of
      :func:`jaxmetric.losses.arcface_loss` for the similarities :math:`S_{ic}` (a row
      is active when :math:`S_{i y_i} - \delta` is not larger than every other
      :math:`S_{ic}`; the mean distances are :math:`1 - S_{ic}`) and ``regularizer``
      (:math:`\tau R`). Non-finite inputs and out-of-range labels under ``jit``: NaN
      loss and info but ``num_rows``, ``num_pos_pairs`` and ``num_neg_pairs``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxmetric import losses
      >>> emb = jnp.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]])
      >>> labels = jnp.array([0, 0, 1, 1])
      >>> centers = jnp.array([[[1.0, 0.2], [0.6, 0.8]], [[0.0, 1.0], [-1.0, 1.0]]])
      >>> loss, info = losses.soft_triple_loss(emb, labels, centers, centers=2, tau=0.2)
      >>> print(f"{loss:.4f}", info["num_rows"], f"{info['regularizer']:.4f}")
      0.0815 4.0 0.0740
    """
    centers = check_positive_int("centers", centers)
    check_number("la", la, positive=True)
    check_number("gamma", gamma, positive=True)
    check_number("margin", margin, minimum=0.0)
    check_number("tau", tau, minimum=0.0)

    def soft_max(cos):  # (R, C, K) -> (R, C)
        return jnp.sum(jax.nn.softmax(cos / gamma, axis=2) * cos, axis=2)

    cb = class_batch.gather(embeddings, labels, weights, valid, axis_name, name="weights",
                            centers=centers, pool=soft_max)
    num_classes = cb.cos.shape[1]
    reg = tau * center_spread(cb.vectors.reshape(num_classes, centers, -1))
    own = jnp.sum(jnp.where(cb.same, cb.cos, 0.0), axis=1)
    target = la * (own - margin)
    logits = jnp.where(cb.same, target[:, None], la * cb.cos)
    per_row = jax.nn.logsumexp(logits, axis=1) - target + reg
    active = own - margin <= class_batch.largest_other(cb, cb.cos)
    loss, info = class_batch.row_loss(cb, per_row, active, reduction, axis_name)
    info["regularizer"] = reg + cb.batch.nan_if_nonfinite  # the NaN rule, as for the rest
    return loss, info
