"""The data-parallel mesh: one axis, :data:`AXIS`, over the devices."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

__all__ = ["AXIS", "make_mesh"]

AXIS = "batch"
"""Name of the data-parallel mesh axis (and of the synchronised-BatchNorm axis)."""


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """1-D data-parallel mesh ``("batch",)`` over ``devices``.

    The default is ``jax.devices()``: every device of every process (the local devices
    in a single-process run), ordered by process, so that process ``p`` holds a
    contiguous slice of each global batch.
    """
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("make_mesh needs at least one device")
    return Mesh(np.array(devices), (AXIS,))
