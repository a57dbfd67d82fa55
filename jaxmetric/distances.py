r"""Pairwise distances between embeddings.

All functions compute in float32 whatever the input dtype (bfloat16 embeddings are
upcast first), clamp tiny negative round-off at zero, and use the Gram-matrix
construction of the lecture (Kak & Bouman, "Metric Learning", section 4):

    ||x - y||² = ||x||² - 2 x·y + ||y||²

so a (B, D) batch needs one (B, D) × (D, B) matrix product and no (B, B, D) tensor.
The product runs at ``Precision.HIGHEST`` so that accelerators do not silently use
reduced-precision (TF32 / bf16) passes for the float32 matmul.

**Overflow.** Squared in float32, a row of norm above ``sqrt(FLT_MAX) ≈ 1.8e19``
overflows: ``||x||² = inf`` and the Gram form gives ``inf - inf = NaN``; an L2
normalisation ``x * rsqrt(||x||²)`` gives ``x * 0``, a zero row, although the
direction is well defined. So every row is first divided by a power of two, its
*scale*

.. math::  s(x) = 2^{\lfloor \log_2 \max_k |x_k| \rfloor}, \qquad
           u = x / s, \quad 1 \le \max_k |u_k| < 2, \quad 1 \le \|u\|^2 < 4D,

(``_scale``, the exponent bits of :math:`\max_k |x_k|`: one max-abs reduction per
row; capped at :math:`2^{126}`, so :math:`\max_k |u_k| < 4` and :math:`\|u\|^2 < 16D`
for rows beyond 8.5e37). Dividing by a power of two is exact in floating point, and
every later product, sum and square root is rounded exactly as it would be at scale 1
(binary floating point is invariant under powers of two), so wherever the unscaled
arithmetic neither overflows nor underflows the results are *bit for bit* those of the
plain formulas; beyond, they stay right. The scale is piecewise constant in ``x``, so its derivative
is zero (almost everywhere) and it is held fixed (``stop_gradient``) when
differentiating: the gradients are those of the plain formulas too.

- *Normalisation* (:func:`l2_normalize`): ``x / ||x|| = u / ||u||``.
- *Squared Euclidean* (:func:`cross_squared_distances`): with the scales :math:`s_i`
  of :math:`a_i`, :math:`s_j` of :math:`b_j`, the pair's scale
  :math:`s_{ij} = \max(s_i, s_j)` and the ratios
  :math:`\rho_i = s_i / s_{ij} \le 1`, :math:`\rho_j = s_j / s_{ij} \le 1` (powers of
  two, one of them 1), :math:`(a_i - b_j) / s_{ij} = \rho_i u_i - \rho_j v_j` and

  .. math::  \|a_i - b_j\|^2 = s_{ij}^2\, t_{ij}, \qquad
             t_{ij} = \rho_i^2 \|u_i\|^2 - 2 \rho_i \rho_j\, u_i \cdot v_j
                      + \rho_j^2 \|v_j\|^2 \in [0, 64D],

  one Gram matrix :math:`u v^\top` of the scaled rows and (R, C) elementwise work.
  :math:`s_{ij} (s_{ij} t_{ij})` overflows to ``inf`` only where the true value is
  beyond float32's range (visible, never a wrong finite number). A per-*pair* scale,
  not one per batch: one large row does not push the others' terms into underflow.
- *Euclidean* (:func:`cross_euclidean_distances`): :math:`s_{ij} \sqrt{t_{ij}}`,
  finite up to distances of ``FLT_MAX`` (rows of norm ~1e38).
- Their *derivatives* are written out (``jax.custom_jvp``) so that no intermediate
  overflows either: autodiff of :math:`s^2 t` would multiply the cotangent by
  :math:`s^2` (``inf`` for :math:`s > 1.8e19`, and ``0 * inf = NaN`` on masked-out
  pairs). With :math:`p_{ij} = \frac{(a_i - b_j) \cdot (\dot a_i - \dot b_j)}{s_{ij}}
  = \rho_i\, u_i \cdot \dot a_i - \rho_i\, u_i \cdot \dot b_j
  - \rho_j\, v_j \cdot \dot a_i + \rho_j\, v_j \cdot \dot b_j` (two more matrix
  products of the scaled rows with the tangents, the same count as autodiff of the
  plain formula):

  .. math::  \dot{(d^2_{ij})} = 2 (a_i - b_j) \cdot (\dot a_i - \dot b_j)
             = 2 s_{ij}\, p_{ij}, \qquad
             \dot d_{ij} = \frac{(a_i - b_j) \cdot (\dot a_i - \dot b_j)}{d_{ij}}
             = \frac{p_{ij}}{\sqrt{t_{ij}}},

  both 0 where :math:`t_{ij} = 0` (coincident rows, clamped round-off): the Euclidean
  distance keeps its zero (finite) gradient at zero distance. In reverse mode the
  cotangent meets only :math:`2 s_{ij}` or :math:`1 / \sqrt{t_{ij}}` and the bounded
  :math:`\rho, u, v`, so a gradient overflows only where its true value would.

A NaN or ±inf in a row has scale ``inf``; its distances (and its normalised row) are NaN.

The losses take their distance by name from :data:`DISTANCES` (``"squared_l2"``,
``"l2"``, ``"cosine"``) or as any callable with the contract of the ``cross_*``
functions here: ``(anchors (R, D), batch (B, D)) -> (R, B)``, float, non-negative, and
finite with finite gradients at all-zero rows (padded rows are zeroed before the call).
"""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxmetric.utils import NORM_EPS

__all__ = [
    "DISTANCES",
    "DistanceFn",
    "resolve",
    "NORM_EPS",
    "l2_normalize",
    "cross_squared_distances",
    "cross_euclidean_distances",
    "cross_cosine_distances",
    "pairwise_squared_distances",
    "pairwise_euclidean_distances",
    "pairwise_cosine_distances",
    "cross_snr_distances",
    "SNR_VAR_EPS",
    "safe_sqrt",
]

_HIGHEST = jax.lax.Precision.HIGHEST
_EXPONENT_BITS = 0x7F800000  # of a float32
_FLOAT32_TINY = float(jnp.finfo(jnp.float32).tiny)  # 2^-126, the smallest normal
_MAX_SCALE = 2.0 ** 126  # its reciprocal is _FLOAT32_TINY


def _as_matrix(x, name: str) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D); got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array; got dtype {x.dtype}")
    return x.astype(jnp.float32)


def _scale(x, floor) -> jax.Array:
    r"""The power of two :math:`2^{\lfloor \log_2 \max(\max_k |x_k|, floor) \rfloor}`
    of each row of ``x`` (last axis), float32, without gradient (module docstring).

    The exponent bits of the max-abs: exact, no ``log2``. ``floor`` (a normal positive
    float32) keeps all-zero rows (and subnormal ones) at a finite, non-zero scale; the
    scale is capped at :math:`2^{126}`, whose reciprocal is still a normal number
    (compilers may divide by multiplying with the reciprocal, and :math:`2^{-127}`
    flushes to zero); a row holding a NaN or ±inf gets ``inf`` (NaN's exponent bits
    are all ones).
    """
    m = jnp.max(jnp.abs(jax.lax.stop_gradient(x)), axis=-1, initial=0.0)
    bits = jax.lax.bitcast_convert_type(jnp.maximum(m, floor), jnp.int32)
    s = jax.lax.bitcast_convert_type(bits & _EXPONENT_BITS, jnp.float32)
    return jnp.where(s < jnp.inf, jnp.minimum(s, _MAX_SCALE), s)


def l2_normalize(x, eps: float = NORM_EPS) -> jax.Array:
    r"""``x / max(||x||, eps)`` along the last axis, in float32, for any finite ``x``.

    The one L2 normalisation of the JAX code (the model's embedding head and the cosine
    distances use it); :func:`jaxmetric.evaluate.l2_normalize` is its NumPy twin with the
    same floor :data:`~jaxmetric.utils.NORM_EPS`, which keeps an all-zero row zero with
    finite gradients.

    Overflow-safe (module docstring): with the row's scale
    :math:`s = 2^{\lfloor \log_2 \max(\max_k |x_k|, 1) \rfloor} \ge 1` and
    :math:`u = x / s`,

    .. math::  \frac{x}{\max(\|x\|, \epsilon)} = \frac{u}{\max(\|u\|, \epsilon / s)}
               = u \cdot \operatorname{rsqrt}\bigl(\max(\|u\|^2, \epsilon^2 / s^2)\bigr)

    where :math:`\|u\|^2 < 16D` cannot overflow. Rows with :math:`\max_k |x_k| < 2` have
    :math:`s = 1`: the plain formula, zero rows and the floor included. Larger rows
    have :math:`\|u\|^2 \ge 1 > \epsilon^2 / s^2`: the floor is inactive, as it is
    for them unscaled, and the floor never ties with the norm (no half gradient at a
    ``max`` tie). The result is scale-invariant for every finite row (1e30 · x gives
    x's direction, with gradient 1e-30 times x's); a row with a NaN or ±inf gives NaN.
    """
    x = jnp.asarray(x).astype(jnp.float32)
    s = _scale(x, 1.0)[..., None]
    u = x / s
    sq = jnp.sum(jnp.square(u), axis=-1, keepdims=True)
    return u * jax.lax.rsqrt(jnp.maximum(sq, (eps * eps) / jnp.square(s)))


def safe_sqrt(x: jax.Array) -> jax.Array:
    """``sqrt(x)`` for ``x >= 0`` whose gradient is 0 (not inf/NaN) at ``x == 0``."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _check_pair(a, b) -> tuple[jax.Array, jax.Array]:
    a = _as_matrix(a, "a")
    b = _as_matrix(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"embedding sizes differ: a has D={a.shape[1]}, b has D={b.shape[1]}")
    return a, b


class _Gram(NamedTuple):
    """The scaled Gram form of ``||a_i - b_j||²`` (module docstring): ``s * s * t``."""

    s: jax.Array      # (R, C) pair scale s_ij = max(s_i, s_j), a power of two
    t: jax.Array      # (R, C) ||a_i - b_j||² / s_ij², clamped at 0
    u: jax.Array      # (R, D) a / s_i
    v: jax.Array      # (C, D) b / s_j
    rho_a: jax.Array  # (R, C) s_i / s_ij
    rho_b: jax.Array  # (R, C) s_j / s_ij


def _gram(a: jax.Array, b: jax.Array) -> _Gram:
    sa, sb = _scale(a, _FLOAT32_TINY), _scale(b, _FLOAT32_TINY)
    u, v = a / sa[:, None], b / sb[:, None]
    s = jnp.maximum(sa[:, None], sb[None, :])
    rho_a, rho_b = sa[:, None] / s, sb[None, :] / s
    sq_u = jnp.sum(u * u, axis=1)[:, None]
    sq_v = jnp.sum(v * v, axis=1)[None, :]
    dots = jnp.matmul(u, v.T, precision=_HIGHEST)
    # The plain (sq_a - 2 dots) + sq_b, every term divided by s_ij² (exactly).
    t = (rho_a * rho_a) * sq_u - (2.0 * (rho_a * rho_b)) * dots + (rho_b * rho_b) * sq_v
    return _Gram(s, jnp.maximum(t, 0.0), u, v, rho_a, rho_b)


def _gram_tangent(g: _Gram, da: jax.Array, db: jax.Array) -> jax.Array:
    """``p_ij = (a_i - b_j)·(da_i - db_j) / s_ij`` (R, C) (module docstring)."""
    u_da = jnp.sum(g.u * da, axis=1)[:, None]
    v_db = jnp.sum(g.v * db, axis=1)[None, :]
    u_db = jnp.matmul(g.u, db.T, precision=_HIGHEST)
    da_v = jnp.matmul(da, g.v.T, precision=_HIGHEST)
    return g.rho_a * (u_da - u_db) + g.rho_b * (v_db - da_v)


@jax.custom_jvp
def _squared(a: jax.Array, b: jax.Array) -> jax.Array:
    g = _gram(a, b)
    return g.s * (g.s * g.t)


@_squared.defjvp
def _squared_jvp(primals, tangents):
    g = _gram(*primals)
    coef = jnp.where(g.t > 0, 2.0 * g.s, 0.0)
    return g.s * (g.s * g.t), coef * _gram_tangent(g, *tangents)


@jax.custom_jvp
def _euclidean(a: jax.Array, b: jax.Array) -> jax.Array:
    g = _gram(a, b)
    return g.s * jnp.sqrt(g.t)


@_euclidean.defjvp
def _euclidean_jvp(primals, tangents):
    g = _gram(*primals)
    positive = g.t > 0
    coef = jnp.where(positive, jax.lax.rsqrt(jnp.where(positive, g.t, 1.0)), 0.0)
    return g.s * jnp.sqrt(g.t), coef * _gram_tangent(g, *tangents)


def cross_squared_distances(a: ArrayLike, b: ArrayLike) -> jax.Array:
    """Squared Euclidean distances between rows of ``a`` (N, D) and ``b`` (M, D).

    Returns a float32 (N, M) matrix ``d[i, j] = ||a_i - b_j||²``, clamped at 0. Rows
    of any finite norm (module docstring): ``inf`` only where ``||a_i - b_j||²`` itself
    exceeds float32's range, never ``inf - inf``; the gradient is 0 where the distance
    is (clamped) zero and finite wherever its true value is.
    """
    return _squared(*_check_pair(a, b))


def cross_euclidean_distances(a: ArrayLike, b: ArrayLike) -> jax.Array:
    """Euclidean distances ``||a_i - b_j||`` (float32, (N, M)); finite gradient at 0.

    Computed as ``s_ij * sqrt(t_ij)`` (module docstring), not as the square root of
    :func:`cross_squared_distances`: finite for rows up to norm ~1e38, where the
    squared distance overflows above ~1.8e19.
    """
    return _euclidean(*_check_pair(a, b))


def cross_cosine_distances(a: ArrayLike, b: ArrayLike, eps: float = NORM_EPS) -> jax.Array:
    r"""Cosine distances ``1 - cos(a_i, b_j)`` (float32, (N, M)), in [0, 2].

    .. math::  d_{ij} = 1 - \frac{a_i \cdot b_j}{\max(\|a_i\|, \epsilon)\,
                                  \max(\|b_j\|, \epsilon)}

    0 for vectors pointing the same way, 1 for orthogonal ones, 2 for opposite ones.
    Only directions count, so unit and non-unit embeddings alike are compared by angle
    (for unit vectors it is half the squared Euclidean distance). Rows are normalised
    with :func:`l2_normalize` (norm floor ``eps``): an all-zero row stays zero, has
    cosine similarity 0 with everything (distance 1) and finite gradients (of order
    1 / eps). Round-off is clipped into [0, 2]; a NaN or inf row gives NaN.
    """
    a = l2_normalize(_as_matrix(a, "a"), eps)
    b = l2_normalize(_as_matrix(b, "b"), eps)
    return jnp.clip(1.0 - jnp.matmul(a, b.T, precision=_HIGHEST), 0.0, 2.0)


def _zero_diagonal(d: jax.Array) -> jax.Array:
    return jnp.where(jnp.eye(d.shape[0], dtype=bool), 0.0, d)


def pairwise_squared_distances(x: ArrayLike) -> jax.Array:
    """Squared Euclidean distance matrix of a (B, D) batch: float32 (B, B), zero diagonal."""
    return _zero_diagonal(cross_squared_distances(x, x))


def pairwise_euclidean_distances(x: ArrayLike) -> jax.Array:
    """Euclidean distance matrix of a (B, D) batch: float32 (B, B), zero diagonal.

    The square root has a zero (finite) gradient where two embeddings coincide.
    :func:`cross_euclidean_distances` of ``x`` with itself, not the square root of the
    squared distances: finite (and right) for rows far beyond norm 1.8e19.
    """
    return _zero_diagonal(cross_euclidean_distances(x, x))


def pairwise_cosine_distances(x: ArrayLike) -> jax.Array:
    """Cosine distance matrix ``1 - cos`` of a (B, D) batch: float32 (B, B)."""
    return _zero_diagonal(cross_cosine_distances(x, x))


SNR_VAR_EPS = 1e-12
"""Floor on the anchor's variance in :func:`cross_snr_distances` (a constant row)."""


def cross_snr_distances(a: ArrayLike, b: ArrayLike) -> jax.Array:
    r"""Signal-to-noise ratio distances of Yuan et al. 2019 (float32, (N, M)).

    The anchor :math:`a_i` is the signal and the difference :math:`b_j - a_i` the
    noise; the distance is the inverse of their signal-to-noise ratio,

    .. math::  d_{ij} = \frac{\operatorname{var}(b_j - a_i)}{\operatorname{var}(a_i)}
               = \frac{\|\bar a_i - \bar b_j\|^2}{\max(\|\bar a_i\|^2, \epsilon)},

    with :math:`\operatorname{var}(v) = \frac{1}{D}\sum_k (v_k - \mu(v))^2` over the
    entries of a vector and :math:`\bar v = v - \mu(v)` the row minus its mean (the
    :math:`1/D` cancels). Like pytorch-metric-learning's ``SNRDistance`` (with its
    default ``normalize_embeddings=True``), the rows are L2-normalised first
    (:func:`l2_normalize`), so the distance depends on directions only and is right for
    rows of any finite norm; it is not symmetric (the anchor's variance divides). The
    numerator is :func:`cross_squared_distances` of the centred rows (zero gradient at
    zero distance). :math:`\epsilon` = :data:`SNR_VAR_EPS` keeps a constant row (zero
    variance, e.g. a zeroed padded row) finite, with finite gradients.
    """
    a = l2_normalize(_as_matrix(a, "a"))
    b = l2_normalize(_as_matrix(b, "b"))
    a = a - jnp.mean(a, axis=1, keepdims=True)
    b = b - jnp.mean(b, axis=1, keepdims=True)
    var_a = jnp.maximum(jnp.sum(a * a, axis=1), SNR_VAR_EPS)
    return cross_squared_distances(a, b) / var_a[:, None]


DistanceFn = Callable[[jax.Array, jax.Array], jax.Array]
"""``(anchors (R, D), batch (B, D)) -> (R, B)`` non-negative distances."""

DISTANCES: MappingProxyType[str, DistanceFn] = MappingProxyType({
    "squared_l2": cross_squared_distances,
    "l2": cross_euclidean_distances,
    "cosine": cross_cosine_distances,
})
"""The distances the losses accept by name."""


def resolve(distance: str | DistanceFn) -> DistanceFn:
    """The cross-distance function of a :data:`DISTANCES` name, or ``distance`` itself
    if it is callable (the contract is in the module docstring)."""
    if callable(distance):
        return distance
    if isinstance(distance, str) and distance in DISTANCES:
        return DISTANCES[distance]
    raise ValueError(
        f"unknown distance {distance!r}; expected one of {', '.join(DISTANCES)} or a "
        "callable (anchors (R, D), batch (B, D)) -> (R, B)"
    )
