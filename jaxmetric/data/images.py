"""The one image decoder of every source (CIFAR trees and archives, image folders, tfds).

:func:`decode_image` reads a JPEG or PNG (bytes or a path) with Pillow into a uint8
``(size, size, channels)`` array:

* ``channels`` 3 (RGB; a grayscale image is copied to three channels, so a folder that
  mixes them -- as CUB-200-2011 does -- works) or 1 (Pillow's ``"L"``, ITU-R 601-2
  luma);
* ``resize=True`` (image folders, tfds): :func:`fit_image`, the shorter side resized to
  ``size`` and the centred square kept (``PIL.ImageOps.fit``, bilinear, antialiased when
  shrinking), so images of any size and aspect become one array;
* ``resize=False`` (the CIFAR-10 sources): an image that is not ``size x size`` is an
  error naming the file -- a CIFAR copy is used as it is, never resampled.

A file Pillow cannot decode (corrupt, truncated, not an image) raises
:class:`~jaxmetric.data.DataError` naming it. :func:`stored_size` is the side images are
stored at for a model input of ``image_size``: the input itself for small images, the
ImageNet "resize 256, crop 224" ratio from :data:`LARGE_IMAGE` up.
"""

from __future__ import annotations

import io
import pathlib

import numpy as np

from jaxmetric.data.types import DataError
from jaxmetric.utils import check_positive_int

__all__ = ["CHANNELS", "IMAGE_EXTENSIONS", "LARGE_IMAGE", "RESIZE_RATIO", "decode_image",
           "fit_image", "is_image_name", "stored_size"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
CHANNELS = (1, 3)
LARGE_IMAGE = 64
"""Input sizes from this one up get the random-resized crop; smaller ones the pad crop."""
RESIZE_RATIO = 8 / 7
"""Stored side / input side for large images (256 / 224)."""


def is_image_name(name: str) -> bool:
    """A visible file with one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def stored_size(image_size: int) -> int:
    """The side length images are stored at for model inputs of ``image_size``."""
    image_size = check_positive_int("image_size", image_size)
    return image_size if image_size < LARGE_IMAGE else round(image_size * RESIZE_RATIO)


def fit_image(image, size: int, channels: int) -> np.ndarray:
    """A Pillow image as uint8 ``(size, size, channels)``: converted (``"RGB"`` or
    ``"L"``), the shorter side resized to ``size`` and the centred square kept
    (``PIL.ImageOps.fit``, bilinear with Pillow's antialiasing)."""
    from PIL import Image, ImageOps

    image = image.convert("RGB" if channels == 3 else "L")
    if image.size != (size, size):
        image = ImageOps.fit(image, (size, size), method=Image.Resampling.BILINEAR)
    out = np.asarray(image, dtype=np.uint8)
    return out.reshape(size, size, channels)


def decode_image(source: bytes | pathlib.Path, name: str | None = None, *, size: int,
                 channels: int = 3, resize: bool = True) -> np.ndarray:
    """Decodes one JPEG/PNG (its bytes, or a path) into uint8 ``(size, size, channels)``
    (see the module docstring); ``name`` names the file in errors (default: the path).

    Raises:
      DataError: the file is corrupt or truncated, or (``resize=False``) not
        ``size x size``.
    """
    from PIL import Image  # Pillow is an optional dependency ("data" extra)

    name = str(source) if name is None else name
    opened = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        with Image.open(opened, formats=("JPEG", "PNG")) as image:
            if not resize and image.size != (size, size):
                raise DataError(
                    f"{name}: image is {image.size[0]}x{image.size[1]} pixels, expected "
                    f"{size}x{size} (resize the data set first)")
            return fit_image(image, size, channels)  # decodes the whole file
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(
            f"{name}: cannot decode image, the file is corrupt or truncated ({e})") from e
