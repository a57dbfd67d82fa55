r"""How a loss's terms become one number: global sums, counts and the reductions.

A metric-learning loss is a sum of terms grouped per anchor (row ``i`` of the batch):
one term per pair ``(i, j)``, per triplet ``(i, p, n)``, or a single term per anchor
(the softmax-style losses). Each group ``g`` of terms is given per anchor as
:class:`Terms`: the float32 ``(R,)`` sums, numbers of terms and numbers of non-zero
(*active*) terms. With :math:`S_g`, :math:`N_g`, :math:`A_g` their sums over the
global batch:

- ``"mean"``: :math:`\sum_g S_g / \max(\sum_g N_g, 1)`, the mean over all terms;
- ``"mean_nonzero"``: :math:`\sum_g S_g / \max(A_g, 1)`, the mean over the non-zero
  terms *per group*, added (pytorch-metric-learning's ``AvgNonZeroReducer``);
- ``"sum"``: :math:`\sum_g S_g`;
- ``"none"``: float32 ``(R,)``, each anchor's sum over its own terms (all groups).

**Over devices.** Inside ``jax.shard_map`` / ``jax.pmap`` every device holds its own
anchors, so the global sums are local sums ``psum``-ed over ``axis_name``
(:func:`total`, :func:`over_devices`); the returned value is the same on every device
and its gradient is exact (see :func:`over_devices` for why it is safe to
differentiate).

**Counts** are summed in int32 per anchor (at most ``B`` or ``B²/4`` terms, exact) and
in float32 over anchors (exact to 2²⁴, then rounded; an int32 total of triplets would
overflow near B = 2,900 with ten classes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxmetric.parallel import varying_axes

__all__ = [
    "REDUCTIONS",
    "ANY_REDUCTION",
    "Terms",
    "anchor_info",
    "count",
    "masked_logsumexp",
    "over_devices",
    "reduce",
    "row_terms",
    "safe_mean",
    "total",
]

REDUCTIONS: tuple[str, ...] = ("mean", "mean_nonzero", "sum")
"""The reductions to a scalar loss; every loss also accepts ``"none"`` (per anchor)."""

ANY_REDUCTION: tuple[str, ...] = REDUCTIONS + ("none",)


class Terms(NamedTuple):
    """One group of loss terms summed per anchor: float32 (R,) each."""

    loss: jax.Array      # sum of the anchor's terms
    selected: jax.Array  # number of terms
    active: jax.Array    # number of non-zero terms


def over_devices(x, axis_name) -> jax.Array:
    """``x`` summed element-wise over the devices of ``axis_name`` (float32, same shape);
    ``x`` itself when ``axis_name`` is None.

    Each device differentiates only its own part: the ``all_gather`` of the inputs
    already routes every device's cotangents back to their owner. Inside
    ``jax.shard_map`` with varying-axis checking (the default) ``psum`` transposes that
    way by itself; under ``jax.pmap`` (or ``check_vma=False``) it would transpose to a
    second ``psum`` and scale gradients by the device count, so there the cross-device
    part of the value is added without gradient. Use it for any per-class or per-proxy
    sum that must cover the global batch before a non-linearity (a log, a softmax).
    """
    x = jnp.asarray(x).astype(jnp.float32)
    if axis_name is None:
        return x
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    if set(names) <= varying_axes(x):
        return jax.lax.psum(x, axis_name)
    return x + jax.lax.stop_gradient(jax.lax.psum(x, axis_name) - x)


def total(x, axis_name) -> jax.Array:
    """Sum over all elements, then over the devices of ``axis_name``; float32 scalar
    (see :func:`over_devices`)."""
    return over_devices(jnp.sum(jnp.asarray(x).astype(jnp.float32)), axis_name)


def count(mask, axis=None) -> jax.Array:
    """Number of True entries, exact in int32, as float32."""
    return jnp.sum(mask, axis=axis, dtype=jnp.int32).astype(jnp.float32)


def safe_mean(s, n) -> jax.Array:
    """``s / max(n, 1)``: 0 for an empty set instead of NaN."""
    return s / jnp.maximum(n, 1.0)


def row_terms(terms, mask) -> Terms:
    """Per-anchor sums of the (R, B) ``terms`` (zero outside ``mask``)."""
    return Terms(jnp.sum(terms, axis=1), count(mask, 1), count(terms > 0, 1))


def reduce(groups: Sequence[Terms], reduction: str, axis_name):
    """The loss of ``groups`` under ``reduction`` (module docstring) and their totals.

    Returns ``(loss, totals)``: ``loss`` a float32 scalar, or (R,) for ``"none"``;
    ``totals[g] = (S_g, N_g, A_g)`` the global sum, number and number of active terms
    of group ``g``, float32 scalars.
    """
    totals = [tuple(total(x, axis_name) for x in g) for g in groups]
    if reduction == "none":
        loss = sum(g.loss for g in groups)
    elif reduction == "sum":
        loss = sum(s for s, _, _ in totals)
    elif reduction == "mean":
        loss = safe_mean(sum(s for s, _, _ in totals), sum(n for _, n, _ in totals))
    elif reduction == "mean_nonzero":
        loss = sum(safe_mean(s, a) for s, _, a in totals)
    else:
        raise ValueError(f"reduction must be one of {ANY_REDUCTION}; got {reduction!r}")
    return loss, totals


def anchor_info(groups: Sequence[Terms]) -> dict[str, jax.Array]:
    """``"none"`` reduction's per-anchor counts: terms and active terms of each anchor."""
    return {
        "anchor_num_selected": sum(g.selected for g in groups),
        "anchor_num_active": sum(g.active for g in groups),
    }


def masked_logsumexp(x, mask, axis: int = -1, *, fill=0.0) -> jax.Array:
    r""":math:`\log \sum_{j:\,\mathrm{mask}_j} e^{x_j}` along ``axis`` (float32), and
    ``fill`` where the mask selects nothing.

    Safe to differentiate: entries outside the mask get a zero gradient whatever finite
    value they hold (no ``0 * inf`` from an overflowing ``exp``), and an empty set gives
    ``fill`` with zero, finite gradients (no ``log 0``). The maximum is subtracted first
    (without gradient), so large logits (a low temperature, a large scale) do not
    overflow.
    """
    x = jnp.asarray(x).astype(jnp.float32)
    mask = jnp.asarray(mask, bool)
    has = jnp.any(mask, axis=axis, keepdims=True)
    masked = jnp.where(mask, x, -jnp.inf)
    top = jax.lax.stop_gradient(jnp.where(has, jnp.max(masked, axis=axis, keepdims=True), 0.0))
    s = jnp.sum(jnp.exp(masked - top), axis=axis, keepdims=True)
    out = jnp.where(has, top + jnp.log(jnp.where(has, s, 1.0)), jnp.float32(fill))
    return jnp.squeeze(out, axis)
