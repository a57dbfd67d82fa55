"""The data-parallel mesh: one axis, :data:`AXIS`, over the devices.

On a machine without an accelerator JAX makes one CPU device, and XLA:CPU runs one
program at a time on it, threading inside the big operations only (measured on two
cores: ~1.05 CPU seconds per wall second for the homebrew step). :func:`use_cpu_devices`
splits the CPU into several XLA devices: the data-parallel step then runs one shard per
device at the same time, with the same result (the losses see the global batch,
BatchNorm statistics are synchronised).

The command line does this by default (:func:`default_cpu_devices`): as many CPU devices
as the machine has cores, or the largest divisor of the batch size below that (the
global batch must split evenly over the devices). Measured on two cores with the
homebrew CPU recipe, one device reached about 0.6x the images/s of PyTorch +
pytorch-metric-learning on the same cores, two devices 0.9-1.1x
(docs/benchmarks/peer-training.md). With a GPU or TPU the CPU devices are unused.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

__all__ = ["AXIS", "available_cores", "default_cpu_devices", "make_mesh", "use_cpu_devices"]

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


def use_cpu_devices(count: int) -> None:
    """Make JAX's CPU backend ``count`` devices (``jax_num_cpu_devices``).

    Call it before anything runs on a device (JAX fixes its devices at the first
    operation): otherwise a ``RuntimeError`` says so, unless there are already
    ``count`` CPU devices. It changes only the CPU backend;
    with a GPU or TPU the mesh is still made of those.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"the number of CPU devices must be an int >= 1; got {count!r}")
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError as e:
        if len(jax.local_devices(backend="cpu")) == count:
            return  # already so
        raise RuntimeError(f"cannot make {count} CPU devices: JAX has already set up its "
                           "devices; call use_cpu_devices before any JAX operation") from e


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the system has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_cpu_devices(batch_size: int, cores: int | None = None) -> int:
    """The number of CPU devices to split the CPU into for ``batch_size``: the largest
    divisor of ``batch_size`` not above ``cores`` (default :func:`available_cores`), so
    every core runs one shard of the data-parallel step and the batch splits evenly."""
    cores = available_cores() if cores is None else cores
    if batch_size < 1 or cores < 1:
        raise ValueError(f"batch_size and cores must be >= 1; got {batch_size}, {cores}")
    return max(d for d in range(1, min(cores, batch_size) + 1) if batch_size % d == 0)
