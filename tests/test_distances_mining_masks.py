import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmetric import distances, mining

import oracles


@pytest.mark.parametrize("b,d", [(1, 3), (6, 3), (33, 16)])
def test_squared_and_euclidean_match_loops(b, d):
    x = np.random.default_rng(b).normal(size=(b, d)).astype(np.float32)
    np.testing.assert_allclose(
        distances.pairwise_squared_distances(x), oracles.distance_matrix(x, "squared_l2"),
        atol=1e-5,
    )
    np.testing.assert_allclose(
        distances.pairwise_euclidean_distances(x), oracles.distance_matrix(x, "l2"), atol=1e-5
    )


def test_cosine_matches_loops_non_unit_and_zero_rows():
    """1 - cos for rows of any norm, in [0, 2]; a zero row is at distance 1 from all."""
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(9, 5)) * rng.uniform(0.01, 100, (9, 1))).astype(np.float32)
    x[3] = 0.0
    x[5] = -2.5 * x[0]  # opposite direction: distance 2
    d = np.asarray(distances.pairwise_cosine_distances(x))
    ref = oracles.distance_matrix(x, "cosine")
    np.fill_diagonal(ref, 0.0)
    np.testing.assert_allclose(d, ref, atol=1e-6)
    assert d.min() >= 0.0 and d.max() <= 2.0
    np.testing.assert_allclose(d[0, 5], 2.0, atol=1e-6)
    np.testing.assert_array_equal(np.delete(d[3], 3), 1.0)
    # Unit rows: half the squared Euclidean distance.
    u = x[[0, 1, 2]] / np.linalg.norm(x[[0, 1, 2]], axis=1, keepdims=True)
    np.testing.assert_allclose(distances.cross_cosine_distances(u, x[[4, 6]]),
                               distances.cross_squared_distances(u, x[[4, 6]] / np.linalg.norm(
                                   x[[4, 6]], axis=1, keepdims=True)) / 2, atol=1e-6)


def test_cosine_zero_rows_finite_gradient_nan_rows_nan():
    x = jnp.array([[0.0, 0.0, 0.0], [1.0, 2.0, 2.0], [3.0, 0.0, -1.0]])
    g = jax.grad(lambda e: distances.cross_cosine_distances(e, x).sum())(x)
    assert np.isfinite(np.asarray(g)).all()
    bad = x.at[1, 0].set(jnp.nan)
    d = np.asarray(distances.cross_cosine_distances(bad, x))
    assert np.isnan(d[1]).all() and np.isfinite(d[[0, 2]]).all()


def test_resolve_names_and_callables():
    assert tuple(distances.DISTANCES) == ("squared_l2", "l2", "cosine")
    assert distances.resolve("l2") is distances.cross_euclidean_distances
    fn = lambda a, b: distances.cross_squared_distances(a, b)  # noqa: E731
    assert distances.resolve(fn) is fn
    with pytest.raises(ValueError, match="unknown distance 'euclidean'"):
        distances.resolve("euclidean")
    with pytest.raises(TypeError):
        distances.DISTANCES["mine"] = fn


def test_lecture_example():
    # The six 3-D embeddings of the lecture's distance-matrix slides.
    x = np.array(
        [[0, 0.1, 0], [0.1, 0.1, 0.2], [0.4, 0.3, 0.1], [0, 0, 0.4], [0.3, 0, 0], [0.1, 0, 0.7]],
        np.float32,
    )
    expected = np.array(
        [
            [0.00, 0.05, 0.21, 0.17, 0.10, 0.51],
            [0.05, 0.00, 0.14, 0.06, 0.09, 0.26],
            [0.21, 0.14, 0.00, 0.34, 0.11, 0.54],
            [0.17, 0.06, 0.34, 0.00, 0.25, 0.10],
            [0.10, 0.09, 0.11, 0.25, 0.00, 0.53],
            [0.51, 0.26, 0.54, 0.10, 0.53, 0.00],
        ]
    )
    np.testing.assert_allclose(distances.pairwise_squared_distances(x), expected, atol=1e-6)


def test_cross_and_cosine():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 4)).astype(np.float32)
    b = rng.normal(size=(7, 4)).astype(np.float32)
    ref = ((a[:, None] - b[None]) ** 2).sum(-1)
    np.testing.assert_allclose(distances.cross_squared_distances(a, b), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(distances.cross_euclidean_distances(a, b), np.sqrt(ref), rtol=1e-5)
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    bn = b / np.linalg.norm(b, axis=1, keepdims=True)
    np.testing.assert_allclose(distances.cross_cosine_distances(a, b), 1 - an @ bn.T, atol=1e-6)
    cos = distances.pairwise_cosine_distances(a)
    np.testing.assert_allclose(np.diag(cos), 0.0)


def test_float32_under_bfloat16_and_clamped():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4)), jnp.bfloat16)
    for fn in (distances.pairwise_squared_distances, distances.pairwise_euclidean_distances):
        out = fn(x)
        assert out.dtype == jnp.float32
        assert float(out.min()) >= 0.0
    # Large nearly-equal vectors: round-off would make ||x-y||² slightly negative.
    y = np.full((4, 64), 100.0, np.float32)
    assert float(distances.pairwise_squared_distances(y).min()) == 0.0


def test_euclidean_gradient_finite_at_zero():
    x = jnp.zeros((4, 3))
    g = jax.grad(lambda e: distances.pairwise_euclidean_distances(e).sum())(x)
    assert np.isfinite(np.asarray(g)).all()
    g = jax.grad(lambda e: distances.pairwise_euclidean_distances(e).sum())(jnp.ones((4, 3)))
    assert np.isfinite(np.asarray(g)).all()


def test_distance_bad_input():
    with pytest.raises(ValueError, match="shape"):
        distances.pairwise_squared_distances(jnp.ones(3))
    with pytest.raises(TypeError, match="floating"):
        distances.pairwise_squared_distances(jnp.ones((3, 2), jnp.int32))
    with pytest.raises(ValueError, match="sizes differ"):
        distances.cross_squared_distances(jnp.ones((3, 2)), jnp.ones((3, 4)))


def _loop_masks(labels, valid):
    b = len(labels)
    pos = np.zeros((b, b), bool)
    neg = np.zeros((b, b), bool)
    trip = np.zeros((b, b, b), bool)
    for i, j in itertools.product(range(b), repeat=2):
        ok = valid[i] and valid[j]
        pos[i, j] = ok and i != j and labels[i] == labels[j]
        neg[i, j] = ok and labels[i] != labels[j]
    for a, p, n in itertools.product(range(b), repeat=3):
        trip[a, p, n] = (
            len({a, p, n}) == 3
            and valid[a] and valid[p] and valid[n]
            and labels[a] == labels[p] and labels[a] != labels[n]
        )
    return pos, neg, trip


@pytest.mark.parametrize("seed", range(4))
def test_masks_match_loops(seed):
    rng = np.random.default_rng(seed)
    b = int(rng.integers(2, 12))
    labels = rng.integers(0, 3, b)
    valid = rng.random(b) > 0.2
    pos, neg, trip = _loop_masks(labels, valid)
    np.testing.assert_array_equal(mining.positive_mask(labels, jnp.asarray(valid)), pos)
    np.testing.assert_array_equal(mining.negative_mask(labels, jnp.asarray(valid)), neg)
    np.testing.assert_array_equal(mining.triplet_mask(labels, jnp.asarray(valid)), trip)


def test_lecture_label_example():
    labels = jnp.array([0, 1, 0, 3, 4, 3])
    pos = np.argwhere(np.triu(np.asarray(mining.positive_mask(labels))))
    assert [tuple(p) for p in pos] == [(0, 2), (3, 5)]
    # Triplets (anchor, positive, negative) of the lecture's loop listing, both orders.
    trip = mining.triplet_mask(labels)
    assert int(trip.sum()) == 2 * 2 * 4


def test_mask_bad_input():
    with pytest.raises(TypeError, match="integers"):
        mining.positive_mask(jnp.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="valid"):
        mining.negative_mask(jnp.array([0, 1]), jnp.array([True]))
