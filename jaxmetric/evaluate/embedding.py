"""Embedding a dataset: a (jitted) function run in fixed-shape batches, then L2-normalised.

:func:`embed` feeds ``embed_fn`` batches of exactly ``batch_size`` rows, so a jitted
function compiles once, and returns unit-norm float32 rows (:func:`l2_normalize`, the
NumPy twin of :func:`jaxmetric.distances.l2_normalize` with the same norm floor
:data:`jaxmetric.utils.NORM_EPS`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from jaxmetric.utils import NORM_EPS, check_positive_int, progress_bar

__all__ = ["embed", "l2_normalize"]


def l2_normalize(x: np.ndarray, *, eps: float = NORM_EPS) -> np.ndarray:
    r"""Row-wise L2 normalisation, :math:`x_i / \max(\|x_i\|_2, \epsilon)`, in float32.

    Args:
      x: ``(N, D)`` array.
      eps: floor on the norm (default :data:`jaxmetric.utils.NORM_EPS`, as in the model
        head); an all-zero row stays zero instead of becoming NaN.

    Returns:
      ``(N, D)`` float32 array; rows with a norm of at least ``eps`` have unit norm.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"l2_normalize expects a 2-D array (N, D); got shape {x.shape}")
    norms = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    return (x / np.maximum(norms, eps)).astype(np.float32)


def embed(
    embed_fn: Callable[[Any], Any],
    images,
    *,
    batch_size: int = 1024,
    progress: bool = True,
    desc: str = "embed",
) -> np.ndarray:
    """Embed a dataset batch by batch and L2-normalise the result.

    Every call of ``embed_fn`` sees exactly ``batch_size`` rows: the last, partial batch is
    padded by repeating its final row (so a jitted function compiles once and never sees
    all-zero padding), and the padded outputs are dropped.

    Args:
      embed_fn: ``batch (batch_size, ...) -> (batch_size, D)``, typically jitted and
        possibly running across devices (then ``batch_size`` must suit the device count).
        Any array type ``np.asarray`` understands may be returned.
      images: array-like of shape ``(N, ...)`` supporting ``len`` and slicing along the
        first axis (numpy array, memmap, ...). Slices are passed to ``embed_fn`` as numpy.
      batch_size: rows per call.
      progress: show a tqdm progress bar.
      desc: progress bar label.

    Returns:
      ``(N, D)`` float32 numpy array with unit-norm rows (see :func:`l2_normalize`).
    """
    batch_size = check_positive_int("batch_size", batch_size)
    if not hasattr(images, "shape") or len(images.shape) < 1:
        images = np.asarray(images)
        if images.ndim < 1:
            raise ValueError("images must have a leading batch axis (N, ...)")
    n = int(images.shape[0])
    if n == 0:
        raise ValueError("images is empty (N = 0); nothing to embed")

    outputs = []
    dim = None
    bar = progress_bar(total=n, desc=desc, unit="img", disable=not progress, leave=False)
    try:
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            batch = np.asarray(images[start:stop])
            valid = stop - start
            if valid < batch_size:
                pad = np.repeat(batch[-1:], batch_size - valid, axis=0)
                batch = np.concatenate([batch, pad], axis=0)
            out = np.asarray(embed_fn(batch))
            if out.ndim != 2 or out.shape[0] != batch_size:
                raise ValueError(
                    f"embed_fn must return shape (batch_size, D) = ({batch_size}, D) for a "
                    f"batch of shape {batch.shape}; got {out.shape}"
                )
            if dim is None:
                dim = out.shape[1]
            elif out.shape[1] != dim:
                raise ValueError(
                    f"embed_fn returned dimension {out.shape[1]} after {dim} earlier"
                )
            outputs.append(np.asarray(out[:valid], dtype=np.float32))
            bar.update(valid)
    finally:
        bar.close()
    return l2_normalize(np.concatenate(outputs, axis=0))

