"""Distance-weighted sampling (jaxmetric.mining.distance_weighted_negatives) and the
margin loss on its draws (margin_loss(sampling="distance_weighted")): the draws follow
the paper's weights, the loss is the triplet sum of the drawn negatives, the draws do
not depend on the number of devices, and a run passes a fresh key every step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmetric import distances, losses, mining
from jaxmetric.losses import pair_batch
from jaxmetric.train.config import TrainConfig
from jaxmetric.train.objective import check_loss_values, make_loss_fn

import oracles_pair_losses as oracles
import pair_loss_checks as checks
from pair_loss_checks import Case

KEY = jax.random.key(3)
BETA = np.linspace(0.9, 1.3, 4).astype(np.float32)


def _weights(d, neg, dim, cutoff=0.5, nonzero_loss_cutoff=1.4):
    """The paper's weights 1 / q(d), float64, normalised per row (0 where not drawn)."""
    d = np.asarray(d, np.float64)
    c = np.maximum(d, cutoff)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = c ** (2.0 - dim) * (1.0 - c * c / 4.0) ** (-(dim - 3.0) / 2.0)
    w = np.where(neg & (d < nonzero_loss_cutoff) & (c < 2.0), w, 0.0)
    return w / w.sum(axis=1, keepdims=True)


def test_draws_follow_the_weights():
    """20,000 draws of one anchor's negative: frequencies within 4 standard errors of
    the weights; positives, far negatives and antipodal rows are never drawn."""
    d = np.array([[0.1, 0.3, 0.6, 0.9, 1.2, 1.39, 1.41, 2.0, 0.8]], np.float32)
    neg = np.array([[True, True, True, True, True, True, True, True, False]])
    dim = 8
    want = _weights(d, neg, dim)[0]

    @jax.jit
    def draw(keys):
        return jax.vmap(lambda k: mining.distance_weighted_negatives(
            k, d, neg, jnp.zeros(1, jnp.int32), dim=dim)[0][0, 0])(keys)

    n = 20_000
    picks = np.asarray(draw(jax.random.split(jax.random.key(0), n)))
    freq = np.bincount(picks, minlength=d.shape[1]) / n
    assert freq[6:].sum() == 0.0  # beyond 1.4, antipodal, the positive
    se = np.sqrt(want * (1 - want) / n)
    np.testing.assert_array_less(np.abs(freq - want), 4 * se + 1e-12)
    far = neg & (d > 1.4)
    _, has = mining.distance_weighted_negatives(KEY, d, far, jnp.zeros(1, jnp.int32), dim=dim)
    assert not bool(has[0])  # negatives only beyond the nonzero-loss cutoff: none drawn


def _oracle_on_draws(x, labels, beta, key, *, margin=0.2, nu=0.0, reduction="mean_nonzero"):
    """The margin loss of the drawn triplets, float64 loops over (anchor, positive)
    with the negatives the sampler draws for the same key."""
    b = pair_batch.gather(x, labels)
    unit = np.sqrt(2.0 * np.asarray(distances.cross_cosine_distances(b.anchors, b.batch)))
    pos, neg = (np.asarray(m) for m in pair_batch.pair_masks(b))
    index, has = (np.asarray(a) for a in mining.distance_weighted_negatives(
        key, unit, neg, b.anchor_index, dim=x.shape[1]))
    _, dist, _, _ = zip(*oracles.pair_rows(x, labels, None, None, "l2"), strict=True)
    per_anchor, hinges = [], []
    for i in range(len(x)):
        total = 0.0
        for p in np.flatnonzero(pos[i]) if has[i] else []:
            n = index[i, p]
            assert neg[i, n], "drew a non-negative"
            bi = float(beta[labels[i]])
            pair = [max(margin + dist[i][p] - bi, 0.0), max(margin - dist[i][n] + bi, 0.0)]
            hinges += pair
            total += sum(pair) + nu * bi  # the regulariser once per triplet
        per_anchor.append(total)
    if reduction == "none":
        return np.array(per_anchor)
    if reduction == "sum":
        return sum(per_anchor)
    if reduction == "mean":  # over the terms: two hinges per triplet
        return sum(per_anchor) / max(len(hinges), 1)
    return sum(per_anchor) / max(sum(v > 0 for v in hinges), 1)


REDUCTIONS = ("mean_nonzero", "mean", "sum", "none")


def test_loss_is_the_sum_over_the_drawn_triplets():
    rng = np.random.default_rng(70)
    x = checks.unit(rng, 16, 6)
    labels = rng.integers(0, 4, 16)

    @jax.jit
    def every_reduction(key):
        return {r: losses.margin_loss(x, labels, BETA, sampling="distance_weighted", key=key,
                                      nu=0.01, reduction=r) for r in REDUCTIONS}

    results, others = every_reduction(KEY), every_reduction(jax.random.key(4))
    for r in REDUCTIONS:
        loss, info = results[r]
        want = _oracle_on_draws(x, labels, BETA, KEY, nu=0.01, reduction=r)
        np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6, err_msg=r)
        assert not np.allclose(others[r][0], loss), r  # another key, other negatives
    num_pos = sum(len(p) for _, _, p, _ in oracles.pair_rows(x, labels, None, None, "l2"))
    assert float(results["mean"][1]["num_triplets"]) == num_pos  # every anchor drew one


def test_draws_do_not_depend_on_the_devices():
    """shard_map and pmap over 8 devices, each drawing for its own anchors: the loss,
    info and gradients (embeddings and the per-class beta) of one device."""
    case = Case(losses.margin_loss, {"beta": BETA, "sampling": "distance_weighted",
                                     "key": KEY, "nu": 0.05}, oracles.margin, "l2")
    results = checks.run_data_parallel([case], grad_kwargs=("beta",))
    checks.check_data_parallel(results, 0)


def test_gradients_finite_and_padding_ignored():
    rng = np.random.default_rng(71)
    x = checks.unit(rng, 12, 5)
    labels = rng.integers(0, 3, 12)
    valid = np.arange(12) != 4
    bad = x.copy()
    bad[4] = np.nan

    @jax.jit
    def f(e, valid):
        return jax.value_and_grad(lambda e: losses.margin_loss(
            e, labels, 1.2, sampling="distance_weighted", key=KEY, valid=valid)[0])(e)

    clean, garbage = f(x, valid), f(bad, valid)
    np.testing.assert_array_equal(clean[0], garbage[0])
    np.testing.assert_array_equal(clean[1], garbage[1])
    assert np.isfinite(clean[1]).all()
    same = np.tile(x[:1], (12, 1))  # all distances zero: clipped at the cutoff
    loss, g = f(same, np.ones(12, bool))
    assert np.isfinite(float(loss)) and np.isfinite(np.asarray(g)).all()


def test_bad_arguments():
    x, y = jnp.ones((4, 3)), jnp.array([0, 0, 1, 1])
    with pytest.raises(ValueError, match="give a PRNG key"):
        losses.margin_loss(x, y, 1.2, sampling="distance_weighted")
    with pytest.raises(ValueError, match="leave pairs='all'"):
        losses.margin_loss(x, y, 1.2, sampling="distance_weighted", key=KEY,
                           pairs="triplets")
    with pytest.raises(ValueError, match="unknown sampling"):
        losses.margin_loss(x, y, 1.2, sampling="uniform", key=KEY)
    with pytest.raises(ValueError, match="nonzero_loss_cutoff must be > 0"):
        losses.margin_loss(x, y, 1.2, sampling="distance_weighted", key=KEY,
                           nonzero_loss_cutoff=0.0)


def test_a_run_passes_a_key():
    """--loss margin --loss-options sampling=distance_weighted: the config accepts it,
    the loss function takes the step's key (different keys, different draws) and the
    key itself is not a loss option."""
    config = TrainConfig(loss="margin", loss_options="sampling=distance_weighted")
    check_loss_values(config)
    loss_fn = make_loss_fn(config)
    rng = np.random.default_rng(72)
    x, y = checks.unit(rng, 16, 8), rng.integers(0, 4, 16)
    a, _ = loss_fn(x, y, params=BETA, key=jax.random.key(0))
    b, _ = loss_fn(x, y, params=BETA, key=jax.random.key(1))
    assert np.isfinite(a) and not np.allclose(a, b)
    with pytest.raises(ValueError, match="give a PRNG key"):
        loss_fn(x, y, params=BETA)
    with pytest.raises(ValueError, match="has no option 'key'"):
        TrainConfig(loss="margin", loss_options="key=1")
