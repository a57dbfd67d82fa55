"""Small helpers for code that runs inside ``jax.shard_map`` / ``jax.pmap``."""

from __future__ import annotations

import jax

__all__ = ["varying_axes"]


def varying_axes(x) -> frozenset:
    """Mesh axes along which ``x`` is typed as varying (empty outside shard_map).

    Inside ``jax.shard_map`` with ``check_vma=True`` every value carries the set of
    manual axes it may differ over; ``pmap`` and ``check_vma=False`` carry none.
    """
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.9
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", ()))  # jax 0.6 - 0.8
