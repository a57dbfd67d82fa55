"""Training-time augmentation and normalisation, in JAX, on device.

The standard recipe for small images (CIFAR's): pad each image by 4 black pixels, take a
random crop of the original size, flip it horizontally with probability 1/2
(torchvision's ``RandomCrop(size, padding=4)`` and ``RandomHorizontalFlip()``), then
normalise each channel with the data set's mean and standard deviation. The statistics
are arguments, with no default: they belong to the data (``Dataset.normalization``, the
published values for CIFAR-10 in :mod:`jaxmetric.data`). Everything is vectorised over
the batch (per-example offsets via ``vmap`` of ``lax.dynamic_slice``), so it jit-compiles
to a few fused kernels and runs next to the train step; no Python loop over examples.

``pad``, ``flip`` and ``dtype`` change the computation and must be static under jit,
e.g. ``jax.jit(augment, static_argnames=("pad", "flip", "dtype"))``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

__all__ = ["augment", "normalize", "sample_crop_flip"]


def _check_images(images: jax.Array, where: str) -> None:
    if images.ndim != 4 or images.dtype != jnp.uint8:
        raise ValueError(
            f"{where} expects uint8 images (batch, height, width, channels), "
            f"got {images.dtype} {images.shape}"
        )


def normalize(
    images: jax.Array,
    mean: Sequence[float],
    std: Sequence[float],
    dtype=jnp.float32,
) -> jax.Array:
    """uint8 images (B, H, W, C) -> ``(x / 255 - mean) / std`` per channel, in ``dtype``.

    ``mean`` and ``std`` are per-channel statistics in [0, 1] units (e.g.
    ``dataset.normalization``).

    The arithmetic is done in float32 and cast at the end, so a bfloat16 ``dtype`` only
    rounds the result.
    """
    _check_images(images, "normalize")
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    if mean.shape != (images.shape[-1],) or std.shape != (images.shape[-1],):
        raise ValueError(
            f"normalize: mean {mean.shape} and std {std.shape} need one value per channel "
            f"({images.shape[-1]})"
        )
    x = images.astype(jnp.float32) * (1.0 / 255.0)
    return ((x - mean) / std).astype(dtype)


def sample_crop_flip(rng: jax.Array, batch: int, pad: int) -> tuple[jax.Array, jax.Array]:
    """The random draws of :func:`augment`.

    Returns:
      offsets: int32 (batch, 2), the (row, column) of each crop's top-left corner in the
        padded image, uniform in ``[0, 2 * pad]``.
      flips: bool (batch,), True where the crop is mirrored left-right (probability 1/2).
    """
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    offset_key, flip_key = jax.random.split(rng)
    offsets = jax.random.randint(offset_key, (batch, 2), 0, 2 * pad + 1, dtype=jnp.int32)
    flips = jax.random.bernoulli(flip_key, 0.5, (batch,))
    return offsets, flips


def augment(
    rng: jax.Array,
    images: jax.Array,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    pad: int = 4,
    flip: bool = True,
    dtype=jnp.float32,
) -> jax.Array:
    """Random crop of the zero-padded image, random horizontal flip, normalisation.

    Args:
      rng: a PRNG key; the draws are :func:`sample_crop_flip` ``(rng, B, pad)``.
      images: uint8 (B, H, W, C).
      mean, std: per-channel statistics for :func:`normalize`.
      pad: black border added on every side before cropping back to (H, W); 0 = no crop.
      flip: whether to mirror a random half of the images.
      dtype: output dtype.

    Returns:
      (B, H, W, C) array of ``dtype``.
    """
    _check_images(images, "augment")
    batch, height, width, channels = images.shape
    offsets, flips = sample_crop_flip(rng, batch, pad)
    if pad:
        padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))  # zeros: black

        def crop(image, offset):
            return jax.lax.dynamic_slice(
                image, (offset[0], offset[1], 0), (height, width, channels)
            )

        images = jax.vmap(crop)(padded, offsets)
    if flip:
        images = jnp.where(flips[:, None, None, None], images[:, :, ::-1, :], images)
    return normalize(images, mean, std, dtype)
