r"""Proxy losses: each class has one learned proxy; rows are compared with the proxies.

Both losses take ``embeddings (B, D)``, integer ``labels (B,)`` in ``[0, C)`` and the
learnable ``proxies (C, D)`` (one per class; :func:`init_proxies` makes them) and
return ``(loss, info)``. They are pure and work under ``jit``, ``vmap`` and ``grad``
(with respect to the embeddings and the proxies). Rows and proxies are compared by
the cosine similarity of their L2-normalised vectors (:mod:`jaxmetric.losses.class_batch`),

.. math::  s_{ic} = \frac{x_i \cdot p_c}{\max(\|x_i\|, \epsilon)\,\max(\|p_c\|, \epsilon)},

so both losses are right for non-normalised embeddings and proxies; the proxies'
norms never matter. There are no pairs of rows, so neither loss takes a reference
set; ``valid`` and ``axis_name`` work as in :mod:`jaxmetric.losses`.

**Proxy-Anchor** (Kim et al. 2020). Every proxy is an anchor; with :math:`P^+` the
proxies that have at least one positive (a valid row of their class) in the *global*
batch, :math:`X_c^+` / :math:`X_c^-` the valid rows of class ``c`` / of other classes,
margin :math:`\delta` and scale :math:`\alpha`:

.. math::
    \ell = \frac{1}{|P^+|} \sum_{c \in P^+}
             \log\Bigl(1 + \sum_{i \in X_c^+} e^{-\alpha (s_{ic} - \delta)}\Bigr)
         + \frac{1}{C} \sum_{c=1}^{C}
             \log\Bigl(1 + \sum_{i \in X_c^-} e^{\alpha (s_{ic} + \delta)}\Bigr)

The loss is normalised per proxy, not per row, as in the paper (and PML's
``ProxyAnchorLoss``, whose ``DivisorReducer`` divides by the same two numbers): there is
no per-row term and so no ``reduction`` argument. A proxy without positives adds
``log 1 = 0`` to the first sum; with no valid row at all the loss is 0.

*Derivation of the computation.* Write :math:`z_{ic}` for the exponent of a pair
(:math:`-\alpha(s_{ic} - \delta)` for positives, :math:`\alpha(s_{ic} + \delta)` for
negatives) and :math:`S_c = \sum_i e^{z_{ic}}` for a proxy's sum over its pairs. The
gradient of one term is a softmax over the proxy's pairs plus the "1":

.. math::  \frac{\partial}{\partial z_{ic}} \log(1 + S_c) = \frac{e^{z_{ic}}}{1 + S_c},
           \qquad \frac{\partial z_{ic}}{\partial s_{ic}} = \mp\alpha,

so every pair pulls (positives) or pushes (negatives) with a weight that grows with
its violation of the margin, relative to the proxy's other pairs. :math:`S_c` is a sum
over the global batch, so under ``axis_name`` each device sums its own rows and the
per-proxy sums are added over devices *before* the log
(:func:`jaxmetric.losses.reductions.over_devices`); likewise :math:`|P^+|` counts a proxy
with a positive on any device. Exponents reach :math:`\alpha(1 + \delta)` (35 with the
defaults; more for a larger :math:`\alpha`), so the sums are shifted by
:math:`M_c = \max(0, \max_i z_{ic})` (the maximum over the global batch, without
gradient):

.. math::  \log(1 + S_c) = M_c + \log\Bigl(e^{-M_c} + \sum_i e^{z_{ic} - M_c}\Bigr),

whose argument lies in :math:`[1, B + 1]`: no overflow, no ``log 0``, and the same
value and gradient for any constant :math:`M_c`. Pairs outside a proxy's set enter as
:math:`e^{-\infty} = 0` (masked before the ``exp``, so their gradient is 0, not NaN).

**Proxy-NCA** (Movshovitz-Attias et al. 2017). NCA with the proxies as the only
points: with :math:`d_{ic} = \|\hat x_i - \hat p_c\|^2 = 2 - 2 s_{ic}` (the squared
Euclidean distance of the normalised vectors) and the scale ``t``
(``softmax_scale``), the paper's loss of a row compares its own proxy with the
*other* proxies:

.. math::
    \ell_i = -\log \frac{e^{-t\, d_{i y_i}}}{\sum_{c \ne y_i} e^{-t\, d_{ic}}}
           = t\, d_{i y_i} + \log \sum_{c \ne y_i} e^{-t\, d_{ic}}

(it can be negative: the ratio of the own term to the others' is not a probability).
Its gradient with respect to :math:`d_{ic}` is :math:`t` for the own proxy and
:math:`-t\,\mathrm{softmax}_{c \ne y_i}(-t\, d_{ic})` for the others.
pytorch-metric-learning's ``ProxyNCALoss`` (and Proxy-NCA++, Teh et al. 2020) put the
own proxy in the denominator too, :math:`\ell_i = -\log \mathrm{softmax}_c(-t\,
d_{ic})_{y_i} \ge 0`; ``positive_in_denominator=True`` gives that form. The paper's
form needs at least two proxies.

References:
  S. Kim, D. Kim, M. Cho, S. Kwak, "Proxy Anchor Loss for Deep Metric Learning",
  CVPR 2020.
  Y. Movshovitz-Attias, A. Toshev, T. K. Leung, S. Ioffe, S. Singh, "No Fuss Distance
  Metric Learning using Proxies", ICCV 2017.
  E. W. Teh, T. DeVries, G. W. Taylor, "ProxyNCA++: Revisiting and Revitalizing Proxy
  Neighborhood Component Analysis", ECCV 2020.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxmetric.losses import class_batch, reductions
from jaxmetric.losses import pair_batch as batch_lib
from jaxmetric.losses.reductions import safe_mean
from jaxmetric.utils import check_number, check_positive_int

__all__ = ["init_proxies", "proxy_anchor_loss", "proxy_nca_loss"]

Info = dict[str, jax.Array]


def init_proxies(rng: jax.Array, num_classes: int, dim: int, *, std: float | None = None,
                 dtype=jnp.float32) -> jax.Array:
    r"""Initial proxies: ``(num_classes, dim)`` entries drawn from :math:`N(0, \sigma^2)`.

    ``std=None`` gives :math:`\sigma = \sqrt{2 / C}`, PyTorch's
    ``kaiming_normal_(mode="fan_out")`` on a ``(C, D)`` tensor: what the Proxy-Anchor
    authors' code and PML's ``ProxyAnchorLoss`` use. PML's ``ProxyNCALoss`` draws from
    :math:`N(0, 1)` (``std=1.0``). The losses compare directions only, so ``std`` sets
    how far an optimizer step turns a proxy, not the loss.

    Example:
      >>> import jax
      >>> from jaxmetric.losses.proxy import init_proxies
      >>> init_proxies(jax.random.key(0), 10, 64).shape
      (10, 64)
    """
    num_classes = check_positive_int("num_classes", num_classes)
    dim = check_positive_int("dim", dim)
    if std is None:
        std = math.sqrt(2.0 / num_classes)
    check_number("std", std, positive=True)
    return (std * jax.random.normal(rng, (num_classes, dim), jnp.float32)).astype(dtype)


# ------------------------------------------------------------------------ Proxy-Anchor


def _log1p_sum_exp(z, mask, axis_name) -> jax.Array:
    """float32 (C,): ``log(1 + sum_i exp(z[i, c]))`` over the rows in ``mask`` of the
    global batch, per column ``c``, shifted for stability (module docstring)."""
    z = jnp.where(mask, z, -jnp.inf)
    shift = jax.lax.stop_gradient(jnp.maximum(jnp.max(z, axis=0), 0.0))
    if axis_name is not None:
        shift = jax.lax.pmax(shift, axis_name)
    sums = reductions.over_devices(jnp.sum(jnp.exp(z - shift), axis=0), axis_name)
    return shift + jnp.log(jnp.exp(-shift) + sums)


def proxy_anchor_loss(
    embeddings: ArrayLike,
    labels: ArrayLike,
    proxies: ArrayLike,
    *,
    margin: float = 0.1,
    alpha: float = 32.0,
    valid: ArrayLike | None = None,
    axis_name=None,
) -> tuple[jax.Array, Info]:
    r"""Proxy-Anchor loss (Kim et al. 2020), on cosine similarities.

    .. math::
        \ell = \frac{1}{|P^+|} \sum_{c \in P^+}
                 \log\Bigl(1 + \sum_{i \in X_c^+} e^{-\alpha (s_{ic} - \delta)}\Bigr)
             + \frac{1}{C} \sum_{c}
                 \log\Bigl(1 + \sum_{i \in X_c^-} e^{\alpha (s_{ic} + \delta)}\Bigr)

    over the valid rows of the global batch (module docstring: the sums, the shift and
    the gradient). The same loss as PML's ``ProxyAnchorLoss`` with its defaults.

    Args:
      embeddings: (B, D) float embeddings (any float dtype; computed in float32; need
        not be normalised).
      labels: (B,) integer class ids in ``[0, C)``.
      proxies: (C, D) float, one learnable proxy per class (:func:`init_proxies`).
      margin: :math:`\delta \ge 0`, in cosine units: positives are pulled above
        :math:`\delta`, negatives pushed below :math:`-\delta`.
      alpha: the scale :math:`\alpha > 0`.
      valid: optional bool (B,) mask of real rows; padded rows may hold anything.
      axis_name: mapped axis of the data-parallel batch (:mod:`jaxmetric.losses`): the
        loss is the single-device loss of the global batch and the gradient reaching
        each shard is exact. The proxies are replicated: inside ``jax.shard_map``
        (``check_vma=True``) their gradient comes out summed over devices (the
        single-device gradient); under ``jax.pmap`` each device gets its own
        contribution, to ``psum``.

    Returns:
      ``(loss, info)``: a float32 scalar; info holds ``num_pos_pairs`` (valid rows,
      each with its own proxy), ``num_neg_pairs`` (valid rows times the other
      proxies), ``num_proxies_with_positives`` (:math:`|P^+|`),
      ``num_active_pos_pairs`` / ``num_active_neg_pairs`` (pairs on the wrong side of
      their margin, :math:`s < \delta` / :math:`s > -\delta`: those whose exponent is
      positive, i.e. weigh more than the "1"), ``active_fraction`` (active pairs / all
      pairs), ``mean_pos_distance`` and ``mean_neg_distance`` (mean :math:`1 - s` over
      the positive / negative pairs). A NaN or inf in a valid row or in the proxies,
      or (under ``jit``) a label out of range, makes the loss and all but the three
      counts of pairs and proxies NaN.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxmetric import losses
      >>> emb = jnp.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]])
      >>> labels = jnp.array([0, 0, 1, 1])
      >>> proxies = jnp.array([[1.0, 0.2], [0.0, 1.0], [-1.0, 0.0]])
      >>> loss, info = losses.proxy_anchor_loss(emb, labels, proxies)
      >>> print(f"{loss:.4f}", info["num_proxies_with_positives"], info["num_neg_pairs"])
      18.0919 2.0 8.0
    """
    check_number("margin", margin, minimum=0.0)
    check_number("alpha", alpha, positive=True)
    cb = class_batch.gather(embeddings, labels, proxies, valid, axis_name)
    s = cb.cos
    pos_z = alpha * (margin - s)
    neg_z = alpha * (s + margin)
    pos_terms = _log1p_sum_exp(pos_z, cb.own, axis_name)
    neg_terms = _log1p_sum_exp(neg_z, cb.other, axis_name)
    per_proxy_pos = reductions.over_devices(reductions.count(cb.own, axis=0), axis_name)
    with_pos = jax.lax.stop_gradient(reductions.count(per_proxy_pos > 0))
    num_classes = s.shape[1]
    loss = safe_mean(jnp.sum(pos_terms), with_pos) + jnp.sum(neg_terms) / num_classes

    total = lambda x: reductions.total(x, axis_name)  # noqa: E731
    info = class_batch.pair_info(cb, axis_name)
    active_pos = total(cb.own & (pos_z > 0))
    active_neg = total(cb.other & (neg_z > 0))
    info |= {
        "num_proxies_with_positives": with_pos,
        "num_active_pos_pairs": active_pos,
        "num_active_neg_pairs": active_neg,
        "active_fraction": safe_mean(active_pos + active_neg,
                                     info["num_pos_pairs"] + info["num_neg_pairs"]),
    }
    exact = ("num_pos_pairs", "num_neg_pairs", "num_proxies_with_positives")
    return batch_lib.propagate_nonfinite(cb.batch, loss, info, exact)


# --------------------------------------------------------------------------- Proxy-NCA


def proxy_nca_loss(
    embeddings: ArrayLike,
    labels: ArrayLike,
    proxies: ArrayLike,
    *,
    softmax_scale: float = 1.0,
    positive_in_denominator: bool = False,
    reduction: str = "mean",
    valid: ArrayLike | None = None,
    axis_name=None,
) -> tuple[jax.Array, Info]:
    r"""Proxy-NCA loss (Movshovitz-Attias et al. 2017).

    .. math::
        \ell_i = t\, d_{i y_i} + \log \sum_{c \ne y_i} e^{-t\, d_{ic}},
        \qquad d_{ic} = \|\hat x_i - \hat p_c\|^2 = 2 - 2 s_{ic}

    the paper's NCA over the proxies with the own proxy left out of the denominator;
    ``positive_in_denominator=True`` sums over every proxy,
    :math:`\ell_i = -\log \mathrm{softmax}_c(-t\, d_{ic})_{y_i}` (PML's
    ``ProxyNCALoss``, Proxy-NCA++). Module docstring: the gradient.

    Args:
      embeddings: (B, D) float embeddings (any float dtype; computed in float32; need
        not be normalised).
      labels: (B,) integer class ids in ``[0, C)``.
      proxies: (C, D) float, one learnable proxy per class (:func:`init_proxies`);
        ``C >= 2`` unless ``positive_in_denominator``.
      softmax_scale: the scale ``t > 0`` (an inverse temperature; Proxy-NCA++ uses
        large ones, e.g. 1 / 0.11 on its unit-sphere distances).
      positive_in_denominator: False (the paper) or True (PML, Proxy-NCA++).
      reduction: ``"mean"`` over the valid rows of the global batch, ``"sum"``, or
        ``"none"``: float32 (R,), each row's :math:`\ell_i` (0 for padded rows; under
        ``axis_name`` this device's rows).
      valid: optional bool (B,) mask of real rows; padded rows may hold anything.
      axis_name: mapped axis of the data-parallel batch (as for
        :func:`proxy_anchor_loss`).

    Returns:
      ``(loss, info)``: float32 scalar (``"none"``: (R,)); info holds ``num_rows``
      (valid rows), ``num_active_rows`` (rows whose own proxy is not strictly the
      nearest, :math:`d_{i y_i} \ge \min_{c \ne y_i} d_{ic}`: the rows a nearest-proxy
      classifier gets wrong), ``active_fraction`` (their share), ``num_pos_pairs``,
      ``num_neg_pairs``, ``mean_pos_distance`` and ``mean_neg_distance`` (mean cosine
      distance :math:`1 - s = d / 2` to the own / the other proxies), and with
      ``"none"`` ``anchor_num_selected`` and ``anchor_num_active``. Non-finite inputs
      and out-of-range labels under ``jit``: as for :func:`proxy_anchor_loss` (exact:
      ``num_rows``, ``num_pos_pairs``, ``num_neg_pairs``).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxmetric import losses
      >>> emb = jnp.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]])
      >>> labels = jnp.array([0, 0, 1, 1])
      >>> proxies = jnp.array([[1.0, 0.2], [0.0, 1.0], [-1.0, 0.0]])
      >>> loss, info = losses.proxy_nca_loss(emb, labels, proxies)
      >>> print(f"{loss:.4f}", info["num_rows"], info["active_fraction"])
      -0.9379 4.0 0.0
      >>> pml_form, _ = losses.proxy_nca_loss(emb, labels, proxies,
      ...                                    positive_in_denominator=True)
      >>> print(f"{pml_form:.4f}")
      0.3644
    """
    check_number("softmax_scale", softmax_scale, positive=True)
    cb = class_batch.gather(embeddings, labels, proxies, valid, axis_name,
                            min_classes=1 if positive_in_denominator else 2)
    d = jnp.clip(2.0 - 2.0 * cb.cos, 0.0, 4.0)
    logits = -softmax_scale * d
    own_logit = jnp.sum(jnp.where(cb.same, logits, 0.0), axis=1)
    denominator = logits if positive_in_denominator else jnp.where(cb.same, -jnp.inf, logits)
    per_row = jax.nn.logsumexp(denominator, axis=1) - own_logit
    active = own_logit <= class_batch.largest_other(cb, logits)
    return class_batch.row_loss(cb, per_row, active, reduction, axis_name)
