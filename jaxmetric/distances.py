"""Pairwise distances between embeddings.

All functions compute in float32 whatever the input dtype (bfloat16 embeddings are
upcast first), clamp tiny negative round-off at zero, and use the Gram-matrix
construction of the lecture (Kak & Bouman, "Metric Learning", section 4):

    ||x - y||² = ||x||² - 2 x·y + ||y||²

so a (B, D) batch needs one (B, D) × (D, B) matrix product and no (B, B, D) tensor.
The product runs at ``Precision.HIGHEST`` so that accelerators do not silently use
reduced-precision (TF32 / bf16) passes for the float32 matmul.

The losses take their distance by name from :data:`DISTANCES` (``"squared_l2"``,
``"l2"``, ``"cosine"``) or as any callable with the contract of the ``cross_*``
functions here: ``(anchors (R, D), batch (B, D)) -> (R, B)``, float, non-negative, and
finite with finite gradients at all-zero rows (padded rows are zeroed before the call).
"""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType

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
    "safe_sqrt",
]

_HIGHEST = jax.lax.Precision.HIGHEST


def _as_matrix(x, name: str) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D); got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array; got dtype {x.dtype}")
    return x.astype(jnp.float32)


def l2_normalize(x, eps: float = NORM_EPS) -> jax.Array:
    """``x / max(||x||, eps)`` along the last axis, in float32.

    The one L2 normalisation of the JAX code (the model's embedding head and the cosine
    distances use it); :func:`jaxmetric.evaluate.l2_normalize` is its NumPy twin with the
    same floor :data:`~jaxmetric.utils.NORM_EPS`, which keeps an all-zero row zero with
    finite gradients.
    """
    x = jnp.asarray(x).astype(jnp.float32)
    sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def safe_sqrt(x: jax.Array) -> jax.Array:
    """``sqrt(x)`` for ``x >= 0`` whose gradient is 0 (not inf/NaN) at ``x == 0``."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def cross_squared_distances(a: ArrayLike, b: ArrayLike) -> jax.Array:
    """Squared Euclidean distances between rows of ``a`` (N, D) and ``b`` (M, D).

    Returns a float32 (N, M) matrix ``d[i, j] = ||a_i - b_j||²``, clamped at 0.
    """
    a = _as_matrix(a, "a")
    b = _as_matrix(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"embedding sizes differ: a has D={a.shape[1]}, b has D={b.shape[1]}")
    sq_a = jnp.sum(a * a, axis=1)
    sq_b = jnp.sum(b * b, axis=1)
    dots = jnp.matmul(a, b.T, precision=_HIGHEST)
    return jnp.maximum(sq_a[:, None] - 2.0 * dots + sq_b[None, :], 0.0)


def cross_euclidean_distances(a: ArrayLike, b: ArrayLike) -> jax.Array:
    """Euclidean distances ``||a_i - b_j||`` (float32, (N, M)); finite gradient at 0."""
    return safe_sqrt(cross_squared_distances(a, b))


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
    """
    return safe_sqrt(pairwise_squared_distances(x))


def pairwise_cosine_distances(x: ArrayLike) -> jax.Array:
    """Cosine distance matrix ``1 - cos`` of a (B, D) batch: float32 (B, B)."""
    return _zero_diagonal(cross_cosine_distances(x, x))


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
