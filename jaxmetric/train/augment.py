"""Training-time augmentation and normalisation, in JAX, on device.

The standard recipe for small images (CIFAR's): pad each image by 4 black pixels, take a
random crop of the original size, flip it horizontally with probability 1/2
(torchvision's ``RandomCrop(size, padding=4)`` and ``RandomHorizontalFlip()``), then
normalise each channel with the data set's mean and standard deviation. The statistics
are arguments, with no default: they belong to the data (``Dataset.normalization``, the
published values for CIFAR-10 in :mod:`jaxmetric.data`). Everything is vectorised over
the batch (per-example offsets via ``vmap`` of ``lax.dynamic_slice``), so it jit-compiles
to a few fused kernels and runs next to the train step; no Python loop over examples.

For images stored larger than the network's input (photographs: CUB-200-2011, Cars196,
...), the ImageNet recipe instead: :func:`augment_resized` takes a random-resized crop
(torchvision's ``RandomResizedCrop``, Szegedy et al. 2015: a box of a random fraction of
the area and a random aspect ratio, resampled to the input size) and a random flip in
training, and :func:`center_crop` cuts the centre of the input size at evaluation (the
images having been resized on load, see :mod:`jaxmetric.data.folders`).

``pad``, ``flip``, ``size``, ``scale``, ``ratio`` and ``dtype`` change the computation
and must be static under jit, e.g.
``jax.jit(augment, static_argnames=("pad", "flip", "dtype"))``.

References:
  Szegedy et al. "Going Deeper with Convolutions". CVPR 2015 (the random-resized crop).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

__all__ = ["RESIZED_CROP_RATIO", "RESIZED_CROP_SCALE", "augment", "augment_resized",
           "center_crop", "normalize", "resized_crop", "sample_crop_flip",
           "sample_resized_crop"]

RESIZED_CROP_SCALE = (0.08, 1.0)
"""Range of the crop's area as a fraction of the image's (torchvision's default)."""
RESIZED_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
"""Range of the crop's aspect ratio width / height, sampled log-uniformly."""
RESIZED_CROP_ATTEMPTS = 10
"""Boxes drawn per image before falling back to the centred one (torchvision's 10)."""


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
      ``(offsets, flips)``: ``offsets`` int32 (batch, 2), the (row, column) of each
      crop's top-left corner in the padded image, uniform in ``[0, 2 * pad]``;
      ``flips`` bool (batch,), True where the crop is mirrored left-right (probability
      1/2).
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


def center_crop(images: jax.Array, size: int) -> jax.Array:
    """The central ``size x size`` pixels of uint8 images (B, H, W, C); when ``H - size``
    is odd the extra row goes below (torchvision's ``CenterCrop`` rounds the same way)."""
    _check_images(images, "center_crop")
    _, height, width, _ = images.shape
    if not 1 <= size <= min(height, width):
        raise ValueError(f"center_crop: size {size} does not fit in {height}x{width} images")
    top, left = (height - size) // 2, (width - size) // 2
    return images[:, top:top + size, left:left + size, :]


def sample_resized_crop(
    rng: jax.Array,
    batch: int,
    height: int,
    width: int,
    *,
    scale: tuple[float, float] = RESIZED_CROP_SCALE,
    ratio: tuple[float, float] = RESIZED_CROP_RATIO,
) -> jax.Array:
    """Random crop boxes ``(top, left, box_height, box_width)``, float32 (batch, 4), in
    pixels of an ``height x width`` image.

    torchvision's ``RandomResizedCrop`` draw, vectorised: each of
    ``RESIZED_CROP_ATTEMPTS`` tries draws an area ``a ~ U(scale) * H * W`` and an aspect
    ratio ``r`` log-uniform in ``ratio``, giving ``w = sqrt(a r)``, ``h = sqrt(a / r)``;
    the first try that fits (``h <= H``, ``w <= W``) is placed uniformly at random in the
    image. When none fits, the largest centred box whose ratio lies in ``ratio`` is
    taken (the whole image when its own ratio does). Unlike torchvision the box is not
    rounded to whole pixels: :func:`resized_crop` resamples sub-pixel boxes exactly.
    """
    lo, hi = float(scale[0]), float(scale[1])
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"scale must satisfy 0 < low <= high <= 1; got {scale}")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"ratio must satisfy 0 < low <= high; got {ratio}")
    area_key, ratio_key, top_key, left_key = jax.random.split(rng, 4)
    shape = (batch, RESIZED_CROP_ATTEMPTS)
    area = jax.random.uniform(area_key, shape, minval=lo, maxval=hi) * (height * width)
    log_r = jax.random.uniform(ratio_key, shape, minval=math.log(ratio[0]),
                               maxval=math.log(ratio[1]))
    w_try, h_try = jnp.sqrt(area * jnp.exp(log_r)), jnp.sqrt(area / jnp.exp(log_r))
    fits = (w_try <= width) & (h_try <= height)
    first = jnp.argmax(fits, axis=1)[:, None]
    found = jnp.any(fits, axis=1)
    own = width / height
    if own < ratio[0]:
        fallback_w, fallback_h = width, width / ratio[0]
    elif own > ratio[1]:
        fallback_w, fallback_h = height * ratio[1], height
    else:
        fallback_w, fallback_h = width, height
    h = jnp.where(found, jnp.take_along_axis(h_try, first, axis=1)[:, 0], fallback_h)
    w = jnp.where(found, jnp.take_along_axis(w_try, first, axis=1)[:, 0], fallback_w)
    top = jax.random.uniform(top_key, (batch,)) * (height - h)
    left = jax.random.uniform(left_key, (batch,)) * (width - w)
    top = jnp.where(found, top, (height - h) / 2)
    left = jnp.where(found, left, (width - w) / 2)
    return jnp.stack([top, left, h, w], axis=1).astype(jnp.float32)


def resized_crop(images: jax.Array, boxes: jax.Array, size: int) -> jax.Array:
    """Each box of each uint8 image resampled to ``size x size`` (bilinear, antialiased
    when shrinking: ``jax.image.scale_and_translate``), rounded back to uint8.

    A box ``(top, left, h, w)`` maps image coordinates ``(y, x)`` to
    ``((y - top) * size / h, (x - left) * size / w)``.
    """
    _check_images(images, "resized_crop")
    if boxes.shape != (images.shape[0], 4):
        raise ValueError(f"resized_crop: boxes must be ({images.shape[0]}, 4); got {boxes.shape}")
    channels = images.shape[-1]

    def one(image, box):
        top, left, h, w = box[0], box[1], box[2], box[3]
        scale = jnp.stack([size / h, size / w])
        translation = jnp.stack([-top * size / h, -left * size / w])
        out = jax.image.scale_and_translate(
            image.astype(jnp.float32), (size, size, channels), (0, 1), scale, translation,
            method="linear", antialias=True)
        return jnp.clip(jnp.round(out), 0, 255).astype(jnp.uint8)

    return jax.vmap(one)(images, boxes)


def augment_resized(
    rng: jax.Array,
    images: jax.Array,
    *,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    scale: tuple[float, float] = RESIZED_CROP_SCALE,
    ratio: tuple[float, float] = RESIZED_CROP_RATIO,
    flip: bool = True,
    dtype=jnp.float32,
) -> jax.Array:
    """Random-resized crop to ``size x size``, random horizontal flip, normalisation.

    Args:
      rng: a PRNG key; the boxes are :func:`sample_resized_crop` of its first split, the
        flips (probability 1/2) come from the second.
      images: uint8 (B, H, W, C), stored at least ``size`` on each side.
      size: output side length.
      mean, std: per-channel statistics for :func:`normalize`.
      scale, ratio: see :func:`sample_resized_crop`.
      flip: whether to mirror a random half of the images.
      dtype: output dtype.

    Returns:
      (B, size, size, C) array of ``dtype``.
    """
    _check_images(images, "augment_resized")
    batch, height, width, _ = images.shape
    box_key, flip_key = jax.random.split(rng)
    boxes = sample_resized_crop(box_key, batch, height, width, scale=scale, ratio=ratio)
    images = resized_crop(images, boxes, size)
    if flip:
        flips = jax.random.bernoulli(flip_key, 0.5, (batch,))
        images = jnp.where(flips[:, None, None, None], images[:, :, ::-1, :], images)
    return normalize(images, mean, std, dtype)
