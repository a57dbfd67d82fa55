r"""Margin-softmax losses: a cosine classifier whose own-class logit carries a margin.

ArcFace and CosFace train the embeddings as the input of a ``C``-class softmax
classifier without bias whose logits are scaled cosines, and make the own class win
by a margin: in angle (ArcFace) or in cosine (CosFace). Normalized Softmax is the same
classifier without a margin; Sub-center ArcFace gives every class ``K`` weight vectors
and takes the closest. All take ``embeddings (B, D)``, integer ``labels (B,)`` in
``[0, C)`` and the learnable class ``weights (C, D)`` (``(C, K, D)`` or ``(C*K, D)``
for Sub-center ArcFace; :func:`init_weights`), and return ``(loss, info)``; all are
pure and work under ``jit``, ``vmap`` and ``grad`` (with respect to the embeddings and
the weights).
Rows and weights are L2-normalised inside (:mod:`jaxmetric.losses.class_batch`), so the
losses are right for non-normalised inputs; :math:`\cos\theta_{ic}` below is the
cosine of row ``i`` and class ``c``. ``valid`` and ``axis_name`` work as in
:mod:`jaxmetric.losses`; there are no pairs of rows and so no reference set.

With scale ``s`` and the margin-carrying own-class logit :math:`\psi(\theta)`:

.. math::
    \ell_i = -\log \frac{e^{s\,\psi(\theta_{i y_i})}}
                       {e^{s\,\psi(\theta_{i y_i})} + \sum_{c \ne y_i} e^{s \cos\theta_{ic}}}
           = \log\Bigl(e^{s\,\psi(\theta_{i y_i})} + \sum_{c \ne y_i}
                 e^{s \cos\theta_{ic}}\Bigr) - s\,\psi(\theta_{i y_i}),

computed as a ``logsumexp`` of the ``(R, C)`` logits with the own entry replaced, and
averaged over the valid rows of the global batch (``reduction``). Its gradient with
respect to the logits is ``softmax - onehot``, as for any softmax cross-entropy; the
margin only enters through :math:`\psi` and its derivative.

**CosFace** (Wang et al. 2018): :math:`\psi(\theta) = \cos\theta - m`, ``m = 0.35``,
``s = 64``; the same as PML's ``CosFaceLoss``.

**ArcFace** (Deng et al. 2019): :math:`\psi(\theta) = \cos(\theta + m)`, ``m = 0.5``
radians, ``s = 64``. Computing it as ``cos(arccos(c) + m)`` has an infinite gradient at
:math:`|c| = 1` (the derivative of ``arccos``), so the angle addition formula is used
with a floored sine (the form of the insightface code):

.. math::
    \cos(\theta + m) = \cos\theta \cos m - \sin\theta \sin m, \qquad
    \sin\theta = \sqrt{\max(1 - \cos^2\theta,\ \epsilon)}

exact for :math:`\theta \in [0, \pi]` (where :math:`\sin\theta \ge 0`) up to the floor
:math:`\epsilon` = :data:`SIN_EPS`, whose derivative
:math:`\partial\psi/\partial\cos\theta = \cos m + \sin m \cos\theta / \sin\theta` is
finite everywhere (in float32, :math:`1 - \cos^2\theta` is either 0, where the floor
holds and the second part of the derivative is 0, or at least about
:math:`10^{-7}`, so the derivative stays below about 3000).

*When* :math:`\theta + m > \pi`, :math:`\cos(\theta + m)` grows again with
:math:`\theta` and the "margin" becomes a bonus. ``large_angle`` chooses what to do:

- ``"plain"`` (default): :math:`\cos(\theta + m)` everywhere, the paper's Eq. (3) and
  its pseudo-code. Rows so far from their own class (more than 151° with
  ``m = 0.5``) are rare once training has started.
- ``"threshold"``: :math:`\cos\theta - m \sin m` for :math:`\theta > \pi - m` (a
  CosFace-like margin that keeps :math:`\psi` decreasing), insightface's default and
  pytorch-metric-learning's ``ArcFaceLoss``.
- ``"easy"``: :math:`\cos\theta` (no margin) for :math:`\cos\theta \le 0`,
  insightface's ``easy_margin``.

PML's ``ArcFaceLoss`` takes its margin in degrees (default 28.6° = 0.4992 rad); here it
is in radians.

**Normalized Softmax** (Zhai & Wu 2019): :math:`\psi(\theta) = \cos\theta` and
:math:`s = 1 / T` with a temperature ``T = 0.05``: the softmax cross-entropy of a
linear classifier without bias on the normalised embeddings and weights, the loss of
pytorch-metric-learning's ``NormalizedSoftmaxLoss``. A low temperature plays the role
of ArcFace's large scale: it keeps the softmax from saturating at cosines in [-1, 1].

**Sub-center ArcFace** (Deng et al. 2020): class ``c`` has ``K`` weight vectors (the
sub-centers, ``K = 3``) and a row's cosine to the class is the largest over them,

.. math::  \cos\theta_{ic} = \max_{k} \cos(x_i, w_{ck}),

after which the loss is ArcFace's (the same :math:`\psi` and ``large_angle``). A noisy
or atypical row of a class can then sit near a sub-center of its own instead of
pulling the dominant one. The gradient of the maximum reaches only the closest
sub-center of every class (in a tie, JAX's ``max`` shares it). PML's
``SubCenterArcFaceLoss`` is this loss with ``large_angle="threshold"``.

References:
  J. Deng, J. Guo, N. Xue, S. Zafeiriou, "ArcFace: Additive Angular Margin Loss for
  Deep Face Recognition", CVPR 2019.
  H. Wang, Y. Wang, Z. Zhou, X. Ji, D. Gong, J. Zhou, Z. Li, W. Liu, "CosFace: Large
  Margin Cosine Loss for Deep Face Recognition", CVPR 2018.
  A. Zhai, H.-Y. Wu, "Classification is a Strong Baseline for Deep Metric Learning",
  BMVC 2019.
  J. Deng, J. Guo, T. Liu, M. Gong, S. Zafeiriou, "Sub-center ArcFace: Boosting Face
  Recognition by Large-Scale Noisy Web Faces", ECCV 2020.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxmetric.losses import class_batch
from jaxmetric.utils import check_choice, check_number, check_positive_int

__all__ = ["LARGE_ANGLE", "SIN_EPS", "arcface_loss", "cosface_loss", "init_weights",
           "normalized_softmax_loss", "subcenter_arcface_loss"]

LARGE_ANGLE: tuple[str, ...] = ("plain", "threshold", "easy")
"""ArcFace's treatments of :math:`\\theta + m > \\pi` (module docstring)."""

SIN_EPS = 1e-12
"""Floor on :math:`\\sin^2\\theta` in ArcFace's angle addition (module docstring)."""

Info = dict[str, jax.Array]


def init_weights(rng: jax.Array, num_classes: int, dim: int, *, std: float = 1.0,
                 dtype=jnp.float32) -> jax.Array:
    r"""Initial class weights: ``(num_classes, dim)`` entries drawn from
    :math:`N(0, \mathrm{std}^2)`.

    ``std=1`` is PyTorch's ``normal_``, the default of PML's ``ArcFaceLoss`` and
    ``CosFaceLoss``; the insightface code uses ``std=0.01``. The losses compare
    directions only, so ``std`` sets how far an optimizer step turns a weight vector,
    not the loss.

    Example:
      >>> import jax
      >>> from jaxmetric.losses.margin_softmax import init_weights
      >>> init_weights(jax.random.key(0), 10, 64).shape
      (10, 64)
    """
    num_classes = check_positive_int("num_classes", num_classes)
    dim = check_positive_int("dim", dim)
    check_number("std", std, positive=True)
    return (std * jax.random.normal(rng, (num_classes, dim), jnp.float32)).astype(dtype)


def _margin_softmax(cb: class_batch.ClassBatch, own_psi, scale, reduction, axis_name):
    """``(loss, info)`` of the scaled cosine logits with ``own_psi`` (R,) as the own
    class's (unscaled) logit; a row is active when ``own_psi`` does not beat every
    other class's cosine."""
    target = scale * own_psi
    logits = jnp.where(cb.same, target[:, None], scale * cb.cos)
    per_row = jax.nn.logsumexp(logits, axis=1) - target
    active = own_psi <= class_batch.largest_other(cb, cb.cos)
    return class_batch.row_loss(cb, per_row, active, reduction, axis_name)


def _own_cos(cb: class_batch.ClassBatch) -> jax.Array:
    """(R,) cosine of each row to its own class (0 for a label out of range)."""
    return jnp.sum(jnp.where(cb.same, cb.cos, 0.0), axis=1)


def arcface_loss(
    embeddings: ArrayLike,
    labels: ArrayLike,
    weights: ArrayLike,
    *,
    margin: float = 0.5,
    scale: float = 64.0,
    large_angle: str = "plain",
    reduction: str = "mean",
    valid: ArrayLike | None = None,
    axis_name=None,
) -> tuple[jax.Array, Info]:
    r"""ArcFace, the additive angular margin loss (Deng et al. 2019).

    .. math::
        \ell_i = -\log \frac{e^{s \cos(\theta_{i y_i} + m)}}
                 {e^{s \cos(\theta_{i y_i} + m)} + \sum_{c \ne y_i} e^{s \cos\theta_{ic}}}

    computed stably (module docstring: the angle addition, ``large_angle``).

    Args:
      embeddings: (B, D) float embeddings (any float dtype; computed in float32; need
        not be normalised).
      labels: (B,) integer class ids in ``[0, C)``.
      weights: (C, D) float, one learnable weight vector per class
        (:func:`init_weights`).
      margin: the angular margin ``m`` in radians, in ``[0, pi/2]`` (PML's
        ``ArcFaceLoss`` takes degrees: ``margin=28.6`` there is 0.4992 here).
      scale: the logit scale ``s > 0``.
      large_angle: ``"plain"`` (the paper), ``"threshold"`` (insightface's default,
        PML) or ``"easy"`` (insightface's ``easy_margin``): :data:`LARGE_ANGLE`.
      reduction: ``"mean"`` over the valid rows of the global batch (the paper, PML),
        ``"sum"``, or ``"none"``: float32 (R,), each row's :math:`\ell_i` (0 for padded
        rows; under ``axis_name`` this device's rows).
      valid: optional bool (B,) mask of real rows; padded rows may hold anything.
      axis_name: mapped axis of the data-parallel batch: the loss is the
        single-device loss of the global batch and the gradient reaching each shard
        is exact. The weights are replicated: inside ``jax.shard_map``
        (``check_vma=True``) their gradient comes out summed over devices; under
        ``jax.pmap`` each device gets its contribution, to ``psum``.

    Returns:
      ``(loss, info)``: float32 scalar (``"none"``: (R,)); info holds ``num_rows``
      (valid rows), ``num_active_rows`` (rows whose own-class logit with the margin,
      :math:`\psi(\theta_{i y_i})`, is not larger than every other class's
      :math:`\cos\theta_{ic}`: the margin is not yet met), ``active_fraction`` (their
      share), ``num_pos_pairs``, ``num_neg_pairs``, ``mean_pos_distance`` and
      ``mean_neg_distance`` (mean :math:`1 - \cos\theta` to the own / the other
      classes' weights), and with ``"none"`` ``anchor_num_selected`` and
      ``anchor_num_active``. A NaN or inf in a valid row or in the weights, or (under
      ``jit``) a label out of range, makes the loss and all but ``num_rows``,
      ``num_pos_pairs`` and ``num_neg_pairs`` NaN.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxmetric import losses
      >>> emb = jnp.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]])
      >>> labels = jnp.array([0, 0, 1, 1])
      >>> weights = jnp.array([[1.0, 0.2], [0.0, 1.0], [-1.0, 0.0]])
      >>> loss, info = losses.arcface_loss(emb, labels, weights, scale=16.0)
      >>> print(f"{loss:.4f}", info["num_rows"], info["active_fraction"])
      0.9603 4.0 0.5
    """
    _check_arcface(margin, scale, large_angle)
    cb = class_batch.gather(embeddings, labels, weights, valid, axis_name, name="weights")
    psi = _arcface_psi(_own_cos(cb), margin, large_angle)
    return _margin_softmax(cb, psi, scale, reduction, axis_name)


def _check_arcface(margin, scale, large_angle) -> None:
    check_number("margin", margin, minimum=0.0, maximum=math.pi / 2)
    check_number("scale", scale, positive=True)
    check_choice("large_angle", large_angle, LARGE_ANGLE)


def _arcface_psi(c, margin, large_angle) -> jax.Array:
    r"""ArcFace's own-class logit :math:`\psi` of the own cosines ``c`` (R,) (module
    docstring: the angle addition with a floored sine, ``large_angle``)."""
    sin = jnp.sqrt(jnp.maximum(1.0 - c * c, SIN_EPS))
    psi = c * jnp.cos(margin) - sin * jnp.sin(margin)
    if large_angle == "threshold":  # theta > pi - m  <=>  cos(theta) < cos(pi - m)
        psi = jnp.where(c >= -jnp.cos(margin), psi, c - margin * jnp.sin(margin))
    elif large_angle == "easy":
        psi = jnp.where(c > 0.0, psi, c)
    return psi


def cosface_loss(
    embeddings: ArrayLike,
    labels: ArrayLike,
    weights: ArrayLike,
    *,
    margin: float = 0.35,
    scale: float = 64.0,
    reduction: str = "mean",
    valid: ArrayLike | None = None,
    axis_name=None,
) -> tuple[jax.Array, Info]:
    r"""CosFace, the large margin cosine loss (Wang et al. 2018).

    .. math::
        \ell_i = -\log \frac{e^{s (\cos\theta_{i y_i} - m)}}
                 {e^{s (\cos\theta_{i y_i} - m)} + \sum_{c \ne y_i} e^{s \cos\theta_{ic}}}

    The same loss as PML's ``CosFaceLoss`` with its defaults.

    Args:
      embeddings: (B, D) float embeddings (any float dtype; computed in float32; need
        not be normalised).
      labels: (B,) integer class ids in ``[0, C)``.
      weights: (C, D) float, one learnable weight vector per class
        (:func:`init_weights`).
      margin: the cosine margin ``m >= 0``.
      scale: the logit scale ``s > 0``.
      reduction, valid, axis_name: as for :func:`arcface_loss`.

    Returns:
      ``(loss, info)`` with the entries of :func:`arcface_loss`; a row is active when
      :math:`\cos\theta_{i y_i} - m` does not beat every other class's cosine.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxmetric import losses
      >>> emb = jnp.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]])
      >>> labels = jnp.array([0, 0, 1, 1])
      >>> weights = jnp.array([[1.0, 0.2], [0.0, 1.0], [-1.0, 0.0]])
      >>> loss, info = losses.cosface_loss(emb, labels, weights, scale=16.0)
      >>> print(f"{loss:.4f}", info["num_rows"], info["active_fraction"])
      0.9088 4.0 0.5
    """
    check_number("margin", margin, minimum=0.0)
    check_number("scale", scale, positive=True)
    cb = class_batch.gather(embeddings, labels, weights, valid, axis_name, name="weights")
    return _margin_softmax(cb, _own_cos(cb) - margin, scale, reduction, axis_name)


def normalized_softmax_loss(
    embeddings: ArrayLike,
    labels: ArrayLike,
    weights: ArrayLike,
    *,
    temperature: float = 0.05,
    reduction: str = "mean",
    valid: ArrayLike | None = None,
    axis_name=None,
) -> tuple[jax.Array, Info]:
    r"""Normalized Softmax, a cosine classifier with a temperature (Zhai & Wu 2019).

    .. math::
        \ell_i = -\log \frac{e^{\cos\theta_{i y_i} / T}}{\sum_{c} e^{\cos\theta_{ic} / T}}

    the cross-entropy of the logits :math:`\cos\theta_{ic} / T` of the L2-normalised
    row and class weights (module docstring). The same loss as PML's
    ``NormalizedSoftmaxLoss`` with its defaults.

    Args:
      embeddings: (B, D) float embeddings (any float dtype; computed in float32; need
        not be normalised).
      labels: (B,) integer class ids in ``[0, C)``.
      weights: (C, D) float, one learnable weight vector per class
        (:func:`init_weights`).
      temperature: ``T > 0``; the logits are the cosines divided by it.
      reduction, valid, axis_name: as for :func:`arcface_loss`.

    Returns:
      ``(loss, info)`` with the entries of :func:`arcface_loss`; a row is active when
      its own class's cosine is not larger than every other class's.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxmetric import losses
      >>> emb = jnp.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]])
      >>> labels = jnp.array([0, 0, 1, 1])
      >>> weights = jnp.array([[1.0, 0.2], [0.0, 1.0], [-1.0, 0.0]])
      >>> loss, info = losses.normalized_softmax_loss(emb, labels, weights, temperature=0.5)
      >>> print(f"{loss:.4f}", info["num_rows"], info["active_fraction"])
      0.3644 4.0 0.0
    """
    check_number("temperature", temperature, positive=True)
    cb = class_batch.gather(embeddings, labels, weights, valid, axis_name, name="weights")
    return _margin_softmax(cb, _own_cos(cb), 1.0 / temperature, reduction, axis_name)


def subcenter_arcface_loss(
    embeddings: ArrayLike,
    labels: ArrayLike,
    weights: ArrayLike,
    *,
    centers: int = 3,
    margin: float = 0.5,
    scale: float = 64.0,
    large_angle: str = "plain",
    reduction: str = "mean",
    valid: ArrayLike | None = None,
    axis_name=None,
) -> tuple[jax.Array, Info]:
    r"""Sub-center ArcFace: ArcFace on the closest of ``K`` sub-centers per class
    (Deng et al. 2020).

    .. math::
        \cos\theta_{ic} = \max_{k} \cos(x_i, w_{ck}), \qquad
        \ell_i = -\log \frac{e^{s \cos(\theta_{i y_i} + m)}}
                 {e^{s \cos(\theta_{i y_i} + m)} + \sum_{c \ne y_i} e^{s \cos\theta_{ic}}}

    (module docstring). ``large_angle="threshold"`` is PML's ``SubCenterArcFaceLoss``
    (whose margin is in degrees: 28.6 there is 0.4992 here).

    Args:
      embeddings: (B, D) float embeddings (any float dtype; computed in float32; need
        not be normalised).
      labels: (B,) integer class ids in ``[0, C)``.
      weights: (C, K, D) float, or (C*K, D) with class ``c``'s sub-centers in rows
        ``c*K`` to ``c*K + K - 1`` (:func:`init_weights` with ``C*K`` rows).
      centers: ``K >= 1``, the sub-centers per class (``K = 1`` is ArcFace).
      margin, scale, large_angle, reduction, valid, axis_name: as for
        :func:`arcface_loss`.

    Returns:
      ``(loss, info)`` with the entries of :func:`arcface_loss`, of the pooled cosines
      (the mean distances are :math:`1 - \cos\theta_{ic}` to the closest sub-center).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxmetric import losses
      >>> emb = jnp.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]])
      >>> labels = jnp.array([0, 0, 1, 1])
      >>> weights = jnp.array([[[1.0, 0.2], [0.6, 0.8]], [[0.0, 1.0], [-1.0, 1.0]]])
      >>> loss, info = losses.subcenter_arcface_loss(emb, labels, weights, centers=2,
      ...                                            scale=16.0)
      >>> print(f"{loss:.4f}", info["num_rows"], info["active_fraction"])
      0.1043 4.0 0.0
    """
    centers = check_positive_int("centers", centers)
    _check_arcface(margin, scale, large_angle)
    cb = class_batch.gather(embeddings, labels, weights, valid, axis_name, name="weights",
                            centers=centers, pool=lambda cos: jnp.max(cos, axis=2))
    psi = _arcface_psi(_own_cos(cb), margin, large_angle)
    return _margin_softmax(cb, psi, scale, reduction, axis_name)
