"""Tests for jaxmetric.train.augment: crop/flip/normalise against a NumPy reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmetric.data import CIFAR10_MEAN, CIFAR10_STD
from jaxmetric.train.augment import (
    RESIZED_CROP_RATIO,
    RESIZED_CROP_SCALE,
    augment_resized,
    center_crop,
    resized_crop,
    sample_crop_flip,
    sample_resized_crop,
)
from jaxmetric.train.augment import augment as augment_with_stats
from jaxmetric.train.augment import normalize as normalize_with_stats

MEAN = np.asarray(CIFAR10_MEAN, np.float32)
STD = np.asarray(CIFAR10_STD, np.float32)
# Most tests use CIFAR-10's statistics; the functions themselves have no default.
normalize = functools.partial(normalize_with_stats, mean=CIFAR10_MEAN, std=CIFAR10_STD)
augment = functools.partial(augment_with_stats, mean=CIFAR10_MEAN, std=CIFAR10_STD)


def np_normalize(images):
    return (images.astype(np.float32) / 255.0 - MEAN) / STD


def np_augment(images, offsets, flips, pad):
    """Reference: zero-pad, crop at the given offsets, mirror where flips, normalise."""
    b, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = np.empty_like(images)
    for i in range(b):
        r, c = offsets[i]
        crop = padded[i, r : r + h, c : c + w]
        out[i] = crop[:, ::-1] if flips[i] else crop
    return np_normalize(out)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)


def test_normalize_matches_formula(images):
    out = normalize(jnp.asarray(images))
    assert out.shape == images.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np_normalize(images), rtol=1e-6, atol=1e-6)
    black = normalize(jnp.zeros((1, 1, 1, 3), jnp.uint8))
    np.testing.assert_allclose(np.asarray(black).ravel(), -MEAN / STD, rtol=1e-6)


def test_normalize_bfloat16_and_custom_stats(images):
    out = normalize(
        jnp.asarray(images), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), dtype=jnp.bfloat16
    )
    assert out.dtype == jnp.bfloat16
    expected = images.astype(np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=1e-2)


def test_statistics_are_required(images):
    with pytest.raises(TypeError):
        normalize_with_stats(jnp.asarray(images))
    with pytest.raises(TypeError):
        augment_with_stats(jax.random.PRNGKey(0), jnp.asarray(images))


def test_normalize_rejects_bad_input(images):
    with pytest.raises(ValueError, match="uint8"):
        normalize(jnp.asarray(images, jnp.float32))
    with pytest.raises(ValueError, match="uint8"):
        normalize(jnp.asarray(images[0]))
    with pytest.raises(ValueError, match="one value per channel"):
        normalize(jnp.asarray(images), mean=(0.5, 0.5))


def test_augment_matches_numpy_reference(images):
    key = jax.random.PRNGKey(3)
    offsets, flips = (np.asarray(a) for a in sample_crop_flip(key, len(images), 4))
    # The draw must exercise both branches and several offsets, or the test proves little.
    assert flips.any() and not flips.all()
    assert len({tuple(o) for o in offsets}) > 4 and (offsets != 4).any()
    out = augment(key, jnp.asarray(images), pad=4)
    assert out.shape == images.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(out), np_augment(images, offsets, flips, 4), rtol=1e-6, atol=1e-6
    )


def test_padding_is_black():
    white = jnp.full((64, 32, 32, 3), 255, jnp.uint8)
    key = jax.random.PRNGKey(1)
    offsets, _ = sample_crop_flip(key, 64, 4)
    out = np.asarray(augment(key, white, flip=False))
    zero, full = -MEAN / STD, (1.0 - MEAN) / STD
    for i, (r, c) in enumerate(np.asarray(offsets)):
        inside = np.zeros((32, 32), bool)
        inside[max(0, 4 - r) : 36 - r, max(0, 4 - c) : 36 - c] = True
        np.testing.assert_allclose(
            out[i][inside], np.broadcast_to(full, out[i][inside].shape), rtol=1e-6
        )
        np.testing.assert_allclose(
            out[i][~inside], np.broadcast_to(zero, out[i][~inside].shape), rtol=1e-6
        )


def test_flip_only_and_identity(images):
    key = jax.random.PRNGKey(5)
    x = jnp.asarray(images)
    np.testing.assert_allclose(
        np.asarray(augment(key, x, pad=0, flip=False)), np_normalize(images), atol=1e-6
    )
    _, flips = sample_crop_flip(key, len(images), 0)
    flipped = np.asarray(augment(key, x, pad=0))
    expected = np.where(np.asarray(flips)[:, None, None, None], images[:, :, ::-1], images)
    np.testing.assert_allclose(flipped, np_normalize(expected), atol=1e-6)


def test_draw_statistics():
    offsets, flips = sample_crop_flip(jax.random.PRNGKey(0), 20000, 4)
    offsets, flips = np.asarray(offsets), np.asarray(flips)
    assert offsets.dtype == np.int32 and offsets.shape == (20000, 2) and flips.dtype == bool
    assert abs(flips.mean() - 0.5) < 0.02
    assert offsets.min() == 0 and offsets.max() == 8
    freq = np.bincount(offsets.ravel(), minlength=9) / offsets.size
    np.testing.assert_allclose(freq, 1 / 9, atol=0.01)
    # Rows and columns are drawn independently.
    assert abs(np.corrcoef(offsets[:, 0], offsets[:, 1])[0, 1]) < 0.03
    with pytest.raises(ValueError, match="pad"):
        sample_crop_flip(jax.random.PRNGKey(0), 4, -1)


def test_jit_determinism_and_key_dependence(images):
    x = jnp.asarray(images)
    jitted = jax.jit(functools.partial(augment, pad=4, flip=True))
    k1, k2 = jax.random.PRNGKey(7), jax.random.PRNGKey(8)
    a, b = jitted(k1, x), jitted(k1, x)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(np.asarray(a), np.asarray(augment(k1, x)), atol=1e-6)
    assert not np.allclose(np.asarray(a), np.asarray(jitted(k2, x)))
    static = jax.jit(augment_with_stats, static_argnames=("pad", "flip", "dtype"))
    out = static(k1, x, mean=CIFAR10_MEAN, std=CIFAR10_STD, pad=2, dtype=jnp.bfloat16)
    assert out.dtype == jnp.bfloat16 and out.shape == x.shape


# ------------------------------------------------------- random-resized crop, centre crop


def test_center_crop_takes_the_middle():
    images = np.arange(2 * 7 * 6 * 1, dtype=np.uint8).reshape(2, 7, 6, 1)
    out = np.asarray(center_crop(jnp.asarray(images), 4))
    np.testing.assert_array_equal(out, images[:, 1:5, 1:5])
    with pytest.raises(ValueError, match="does not fit"):
        center_crop(jnp.asarray(images), 7)


def test_resized_crop_boxes_lie_inside_with_the_drawn_area_and_ratio():
    boxes = np.asarray(sample_resized_crop(jax.random.key(0), 4096, 60, 80))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 60 + 1e-3).all() and (left + w <= 80 + 1e-3).all()
    area = h * w / (60 * 80)
    ratio = w / h
    # Boxes that fit are drawn from the scale and ratio ranges; the rest are the
    # fallback (here: the whole image, whose ratio 4/3 is in range).
    drawn = ~np.isclose(area, 1.0)
    assert drawn.mean() > 0.9
    assert (area[drawn] >= RESIZED_CROP_SCALE[0] - 1e-5).all()
    assert (ratio >= RESIZED_CROP_RATIO[0] - 1e-4).all()
    assert (ratio <= RESIZED_CROP_RATIO[1] + 1e-4).all()
    assert 0.3 < area.mean() < 0.7  # U(0.08, 1), slightly reduced by the fit test
    # A tall image whose ratio is out of range falls back to a centred 3:4 box.
    boxes = np.asarray(sample_resized_crop(jax.random.key(1), 64, 100, 10, scale=(1.0, 1.0)))
    np.testing.assert_allclose(boxes, np.tile([[100 / 2 - 40 / 6, 0, 40 / 3, 10]], (64, 1)),
                               rtol=1e-5)


def test_resized_crop_resamples_exactly_on_the_pixel_grid():
    images = np.random.default_rng(0).integers(0, 256, (3, 12, 10, 2), dtype=np.uint8)
    # A whole-pixel box of the output size: the plain slice.
    boxes = jnp.asarray([[2, 3, 6, 6], [0, 0, 6, 6], [6, 4, 6, 6]], jnp.float32)
    out = np.asarray(resized_crop(jnp.asarray(images), boxes, 6))
    np.testing.assert_array_equal(out[0], images[0, 2:8, 3:9])
    np.testing.assert_array_equal(out[2], images[2, 6:12, 4:10])
    # Shrinking, enlarging and sub-pixel boxes: Pillow's antialiased bilinear resize of
    # the same box, to within rounding.
    from PIL import Image

    for (top, left, h, w), size in (((0, 0, 8, 8), 4), ((1.5, 2, 6, 5), 7), ((2, 1, 9, 7), 5)):
        boxes = jnp.asarray([[top, left, h, w]] * 3, jnp.float32)
        out = np.asarray(resized_crop(jnp.asarray(images), boxes, size)).astype(int)
        ref = np.stack([np.stack([np.asarray(Image.fromarray(images[i, :, :, c]).resize(
            (size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h)))
            for c in range(2)], axis=-1) for i in range(3)]).astype(int)
        assert np.abs(out - ref).max() <= 1, (top, left, h, w)


def test_augment_resized_shape_flip_and_normalisation():
    images = np.random.default_rng(1).integers(0, 256, (8, 20, 24, 1), dtype=np.uint8)
    out = augment_resized(jax.random.key(3), jnp.asarray(images), size=16, mean=(0.5,),
                          std=(0.25,), scale=(1.0, 1.0), ratio=(1.2, 1.2))
    assert out.shape == (8, 16, 16, 1) and out.dtype == jnp.float32
    # scale 1 and the image's own ratio: every crop is the whole image, resized.
    whole = resized_crop(jnp.asarray(images), jnp.tile(jnp.asarray([[0, 0, 20, 24]],
                                                                    jnp.float32), (8, 1)), 16)
    expected = (np.asarray(whole, np.float32) / 255 - 0.5) / 0.25
    got = np.asarray(out)
    flipped = [np.allclose(got[i], expected[i, :, ::-1], atol=1e-5)
               and not np.allclose(got[i], expected[i], atol=1e-5) for i in range(8)]
    same = [np.allclose(got[i], expected[i], atol=1e-5) for i in range(8)]
    assert all(f or s for f, s in zip(flipped, same, strict=True))
    assert 0 < sum(flipped) < 8
    jitted = jax.jit(augment_resized, static_argnames=("size", "mean", "std", "dtype"))
    assert jitted(jax.random.key(3), jnp.asarray(images), size=16, mean=(0.5,),
                  std=(0.25,)).shape == (8, 16, 16, 1)


def test_no_flip_keeps_the_crops_and_never_mirrors():
    """``flip=False`` (``--no-flip``): the same crops as with the flip, none mirrored."""
    import jax
    import numpy as np

    from jaxmetric.train.state import InputSpec
    from jaxmetric.train.step import _augment_per_example

    rng = np.random.default_rng(0)
    images = jax.numpy.asarray(rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8))
    inputs = InputSpec(shape=(8, 8, 3), mean=(0.5,) * 3, std=(0.25,) * 3)
    key = jax.random.key(3)
    flipped = np.asarray(_augment_per_example(key, images, 0, inputs, jax.numpy.float32))
    plain = np.asarray(_augment_per_example(key, images, 0, inputs, jax.numpy.float32,
                                            flip=False))
    same = [np.array_equal(a, b) for a, b in zip(plain, flipped, strict=True)]
    mirrored = [np.array_equal(a, b[:, ::-1]) for a, b in zip(plain, flipped, strict=True)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True))
    assert 0 < sum(mirrored) < len(plain)  # the flip did mirror some; plain mirrored none


def test_no_flip_flag():
    from experiments import cifar10

    parser = cifar10.build_parser()
    config = cifar10.config_from_args(parser.parse_args(["--loss", "triplet", "--no-flip"]),
                                      parser)
    assert config.flip is False and config.augment is True
