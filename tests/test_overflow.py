"""Rows of any finite norm: overflow-safe normalisation and distances, for every loss.

Squared in float32, a row of norm above ~1.8e19 overflows. The scale-invariant
(cosine) losses must give their scale-1 value for any finite input, with finite
gradients; the Euclidean ones the value of the formula on the scaled data (computed
here in float64) or a visible inf / NaN, never a wrong finite number; no loss a
finite value with a NaN gradient (:mod:`jaxmetric.distances`, module docstring).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxmetric import distances, losses
from jaxmetric.losses import registry

import oracles
import oracles_pair_losses

SCALES = (1.0, 1e10, 1e19, 1e20, 1e30)
B, D, C = 8, 5, 3
LABELS = np.array([0, 0, 1, 1, 2, 2, 0, 1], np.int32)
ROW = 2  # the row scaled alone
BETA = 1.2
COSINE = tuple(n for n in registry.NAMES if registry.get(n).distance is None)
EUCLIDEAN = tuple(n for n in registry.NAMES if registry.get(n).distance is not None)


def _data(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(B, D)).astype(np.float32),
            rng.normal(size=(C, D)).astype(np.float32))


def _kwargs(name):
    """The loss's training defaults (registry), as ``--loss NAME`` runs it."""
    entry = registry.get(name)
    kw = {}
    if entry.margin_arg and entry.margin is not None:
        kw[entry.margin_arg] = entry.margin
    if entry.distance:
        kw["distance"] = entry.distance
    return kw


def _loss(name, e, w, y=LABELS, **extra):
    entry = registry.get(name)
    kw = _kwargs(name) | extra
    if entry.learned == "beta":
        return entry.fn(e, y, BETA, **kw)
    if entry.learned:
        k = entry.num_centers(kw)
        if k > 1:  # K vectors per class: (C*K, D), as a run makes them
            w = np.random.default_rng(1).normal(size=(C * k, D)).astype(np.float32)
        return entry.fn(e, y, w, **kw)
    return entry.fn(e, y, **kw)


def _scaled(x, scale, mode):
    x = x.astype(np.float64)
    if mode == "batch":
        return x * scale
    x = x.copy()
    x[ROW] *= scale
    return x


def _expected(name, x64):
    """The Euclidean loss on float64 data (no overflow below norms of ~1e150)."""
    kw = _kwargs(name)
    if name == "contrastive":
        return oracles.contrastive(x64, LABELS, **kw)[0]
    if name == "triplet":
        return oracles.triplet(x64, LABELS, **kw)[0]
    if name == "margin":
        return oracles_pair_losses.margin(x64, LABELS, BETA, **kw)[0]
    assert name == "lifted_structure"  # the oracle's math.exp overflows: log-sum-exp here
    terms = []
    for _, dist, pos, neg in oracles_pair_losses.pair_rows(x64, LABELS, None, None, "l2"):
        if pos and neg:
            terms.append(max(np.logaddexp.reduce(dist[pos]) +
                             np.logaddexp.reduce(kw.get("neg_margin", 1.0) - dist[neg]), 0.0))
    return float(np.mean(terms))


@functools.cache
def _sweep(name):
    """``{(scale, mode): (loss, grad)}`` of one jitted ``value_and_grad``."""
    x, w = _data()
    fn = jax.jit(jax.value_and_grad(lambda e: _loss(name, e, w)[0]))
    out = {}
    for scale in SCALES:
        for mode in ("batch", "row"):
            loss, grad = fn(_scaled(x, scale, mode).astype(np.float32))
            out[scale, mode] = float(loss), np.asarray(grad)
    return out


@pytest.mark.parametrize("mode", ["batch", "row"])
@pytest.mark.parametrize("name", COSINE)
def test_cosine_losses_are_scale_invariant(name, mode):
    """The value at every scale is the scale-1 value; the gradient scales as 1 / scale
    (the loss is invariant, so d L(c x) / d(c x) = (1 / c) d L / d x)."""
    results = _sweep(name)
    loss1, grad1 = results[1.0, mode]
    top = np.abs(grad1).max()
    for scale in SCALES:
        loss, grad = results[scale, mode]
        np.testing.assert_allclose(loss, loss1, rtol=2e-5, err_msg=f"{name} {scale:g}")
        assert np.isfinite(grad).all(), (name, scale)
        if mode == "batch":
            grad = grad * scale
        else:  # only the scaled row's gradient shrinks
            grad = grad.copy()
            grad[ROW] *= scale
        np.testing.assert_allclose(grad, grad1, atol=2e-5 * top, err_msg=f"{name} {scale:g}")


@pytest.mark.parametrize("mode", ["batch", "row"])
@pytest.mark.parametrize("name", EUCLIDEAN)
def test_euclidean_losses_right_or_visibly_non_finite(name, mode):
    """The float64 value of the scaled data, or inf / NaN; finite gradients wherever
    the loss is finite. The "l2" losses (all but the triplet loss's squared default)
    stay finite and right up to 1e30."""
    x, _ = _data()
    for scale in SCALES:
        loss, grad = _sweep(name)[scale, mode]
        where = f"{name} {mode} x{scale:g}: {loss}"
        if np.isfinite(loss):
            np.testing.assert_allclose(loss, _expected(name, _scaled(x, scale, mode)),
                                       rtol=1e-4, err_msg=where)
            assert np.isfinite(grad).all(), where
        else:
            assert registry.get(name).distance == "squared_l2" or name == "contrastive", where
        if name in ("lifted_structure", "margin"):
            assert np.isfinite(loss), where


def test_eager_equals_jit_at_huge_scale():
    x, w = _data()
    e = _scaled(x, 1e30, "row").astype(np.float32)
    for name in ("supcon", "proxy_anchor", "lifted_structure"):
        eager = jax.value_and_grad(lambda e, n=name: _loss(n, e, w)[0])(e)
        loss, grad = _sweep(name)[1e30, "row"]
        np.testing.assert_allclose(float(eager[0]), loss, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(eager[1]), grad, rtol=1e-5, atol=1e-12)


def test_nonfinite_rows_still_give_nan():
    x, w = _data()
    for bad in (np.nan, np.inf, -np.inf):
        e = x.copy()
        e[ROW, 1] = bad
        for name in registry.NAMES:
            assert np.isnan(float(_loss(name, e, w)[0])), (name, bad)


# ------------------------------------------------------------------ the distances


def _plain_squared(a, b):
    """The unscaled Gram formula the distances used before."""
    dots = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(jnp.sum(a * a, 1)[:, None] - 2.0 * dots + jnp.sum(b * b, 1)[None, :],
                       0.0)


def test_ordinary_inputs_bit_for_bit_the_plain_formulas():
    """Powers of two are exact: where nothing overflows the values are unchanged."""
    rng = np.random.default_rng(3)
    a = (rng.normal(size=(33, 16)) * rng.uniform(0.01, 100, (33, 1))).astype(np.float32)
    a[4] = 0.0
    b = rng.normal(size=(17, 16)).astype(np.float32)
    sq = jax.jit(_plain_squared)(a, b)
    np.testing.assert_array_equal(jax.jit(distances.cross_squared_distances)(a, b), sq)
    np.testing.assert_array_equal(jax.jit(distances.cross_euclidean_distances)(a, b),
                                  jax.jit(distances.safe_sqrt)(sq))
    plain = jax.jit(lambda a: a * jax.lax.rsqrt(jnp.maximum(jnp.sum(a * a, 1, keepdims=True),
                                                            1e-12)))(a)
    np.testing.assert_array_equal(jax.jit(distances.l2_normalize)(a), plain)


def test_distances_of_mixed_magnitudes_match_float64():
    """Rows of norms 1e-30 ... 1e30 in one batch: a per-pair scale, so the small rows'
    distances do not underflow next to a large one."""
    rng = np.random.default_rng(4)
    mags = np.array([1e-30, 1e-10, 1.0, 1.0, 1e10, 1e19, 1e25, 1e30, 0.0])
    x = (rng.normal(size=(9, 6)) * mags[:, None]).astype(np.float32)
    x[3] = x[2] * 1.5
    x64 = x.astype(np.float64)
    want = np.sqrt(((x64[:, None] - x64[None]) ** 2).sum(-1))
    got = np.asarray(distances.pairwise_euclidean_distances(x))
    np.testing.assert_allclose(got, want, rtol=2e-6)
    got_sq = np.asarray(distances.pairwise_squared_distances(x))
    big = want ** 2 > np.finfo(np.float32).max
    assert np.isposinf(got_sq[big]).all()
    np.testing.assert_allclose(got_sq[~big], (want ** 2)[~big], rtol=5e-6,
                               atol=np.finfo(np.float32).tiny)  # 6e-60 underflows


@pytest.mark.parametrize("scale", SCALES)
def test_distance_gradients_at_scale(scale):
    """d||c a - c b|| / d(c a) does not depend on c; the squared distance's gradient
    is c times the scale-1 one; coincident rows (zero distance) have zero gradient."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(6, 4)).astype(np.float32)
    x[1] = x[0]
    weights = rng.uniform(size=(6, 6)).astype(np.float32)

    def grads(e):
        return [jax.grad(lambda e, f=f: jnp.sum(weights * f(e)))(e) for f in (
            distances.pairwise_euclidean_distances, distances.pairwise_squared_distances,
            distances.pairwise_cosine_distances)]

    grads = jax.jit(grads)
    g1 = grads(x)
    l2, sq, cos = grads((x.astype(np.float64) * scale).astype(np.float32))
    for g in (l2, sq, cos):
        assert np.isfinite(np.asarray(g)).all(), scale
    np.testing.assert_allclose(l2, g1[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(sq) / scale, g1[1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(cos) * scale, g1[2], rtol=1e-4, atol=1e-5)
    # Coincident rows, zero or huge: all distances 0, all gradients 0.
    for fill in (0.0, scale):
        z = np.full((4, 3), fill, np.float32)
        for g in jax.jit(lambda e: [jax.grad(lambda e, f=f: f(e).sum())(e) for f in (
                distances.pairwise_euclidean_distances,
                distances.pairwise_squared_distances)])(z):
            np.testing.assert_array_equal(g, 0.0)


def test_normalisation_keeps_zero_and_tiny_rows():
    """A zero row stays zero with gradient 1 / eps; rows below the floor are x / eps;
    huge rows are unit; bfloat16 in, float32 out."""
    x = np.array([[0.0, 0.0, 0.0], [1e-30, 0.0, -2e-30], [3e30, 0.0, 4e30],
                  [3.4e38, 3.4e38, 0.0]], np.float32)
    y = np.asarray(distances.l2_normalize(x))
    np.testing.assert_array_equal(y[0], 0.0)
    np.testing.assert_allclose(y[1], x[1] / 1e-6, rtol=1e-6)
    np.testing.assert_allclose(y[2], [0.6, 0.0, 0.8], rtol=1e-6)
    np.testing.assert_allclose(y[3], [2 ** -0.5, 2 ** -0.5, 0.0], rtol=1e-6)
    g = jax.grad(lambda e: distances.l2_normalize(e)[0].sum())(x)
    np.testing.assert_allclose(g[0], 1e6, rtol=1e-6)
    assert distances.l2_normalize(jnp.asarray(x[2:3], jnp.bfloat16)).dtype == jnp.float32


# ------------------------------------------------------------------ data parallel


def test_huge_row_under_shard_map_equals_single_device():
    """The named-axis path (all-gathered columns) at scale 1e30: loss and per-shard
    gradients equal one device's."""
    devices = jax.devices()[:8]
    if len(devices) < 8:
        pytest.skip("needs 8 (simulated) devices")
    rng = np.random.default_rng(6)
    x0 = rng.normal(size=(16, 4)).astype(np.float32)
    x = x0.copy()
    x[5] *= np.float32(1e30)
    y = rng.integers(0, 3, 16).astype(np.int32)
    fns = (losses.supcon_loss, losses.lifted_structure_loss, losses.contrastive_loss)

    def run(e, lab, axis_name=None):
        out = []
        for fn in fns:
            loss, g = jax.value_and_grad(lambda e, fn=fn: fn(e, lab, axis_name=axis_name)[0])(e)
            out.append((loss if axis_name is None else loss[None], g))
        return out

    single = jax.jit(run)(x, y)
    mesh = Mesh(np.array(devices), ("batch",))
    sharded = jax.jit(jax.shard_map(functools.partial(run, axis_name="batch"), mesh=mesh,
                                    in_specs=P("batch"), out_specs=P("batch")))(x, y)
    for fn, (loss1, g1), (loss8, g8) in zip(fns, single, sharded, strict=True):
        np.testing.assert_allclose(np.asarray(loss8), float(loss1), rtol=1e-6,
                                   err_msg=fn.__name__)
        np.testing.assert_allclose(g8, g1, rtol=1e-5, atol=1e-6 * float(np.abs(g1).max()),
                                   err_msg=fn.__name__)
    np.testing.assert_allclose(float(single[0][0]), float(losses.supcon_loss(x0, y)[0]),
                               rtol=2e-5)


# ------------------------------------------------------------------ margin: beta per class


def test_margin_per_class_beta_checks_labels():
    """Labels index the per-class beta as they index proxies: an eager ValueError, NaN
    (loss, info, mean_beta; not the pair counts) under jit; padded rows and a scalar
    beta take any label."""
    x, _ = _data()
    beta = jnp.array([1.0, 1.2, 0.9])
    valid = np.arange(B) != ROW
    run = jax.jit(lambda e, y, v: losses.margin_loss(e, y, beta, valid=v))
    clean = run(x, LABELS, valid)
    for bad in (-1, C, C + 5):
        y = LABELS.copy()
        y[ROW] = bad
        with pytest.raises(ValueError, match=rf"\[0, {C}\).*beta.*{bad}"):
            losses.margin_loss(x, y, beta)
        loss, info = run(x, y, np.ones(B, bool))
        assert np.isnan(loss), bad
        for k, v in info.items():
            assert np.isfinite(v) if k in ("num_pos_pairs", "num_neg_pairs") else np.isnan(v), k
        loss, info = run(x, y, valid)
        np.testing.assert_array_equal(loss, clean[0])
        np.testing.assert_array_equal(info["mean_beta"], clean[1]["mean_beta"])
        losses.margin_loss(x, y, beta, valid=valid)  # padded: fine eagerly too
        assert np.isfinite(losses.margin_loss(x, y, 1.2)[0])  # scalar beta: any label


def test_margin_bad_label_under_shard_map_is_nan_everywhere():
    devices = jax.devices()[:8]
    if len(devices) < 8:
        pytest.skip("needs 8 (simulated) devices")
    rng = np.random.default_rng(7)
    x = rng.normal(size=(16, 4)).astype(np.float32)
    y = rng.integers(0, 3, 16).astype(np.int32)
    y[9] = 3  # on device 4
    beta = jnp.array([1.0, 1.2, 0.9])
    mesh = Mesh(np.array(devices), ("batch",))
    loss = jax.jit(jax.shard_map(
        lambda e, lab: losses.margin_loss(e, lab, beta, axis_name="batch")[0][None],
        mesh=mesh, in_specs=P("batch"), out_specs=P("batch")))(x, y)
    assert np.isnan(np.asarray(loss)).all()
