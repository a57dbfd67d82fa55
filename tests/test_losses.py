import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.sharding import Mesh, PartitionSpec as P

from jaxmetric import losses, masks

import oracles

WINDOW_MODES = ("all", "hard", "semihard", "easy")


def _unit(rng, b, d=4):
    x = rng.normal(size=(b, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _check_triplet(x, labels, valid=None, **kw):
    loss, info = jax.jit(functools.partial(losses.triplet_loss, **kw))(x, labels, valid=valid)
    ref, n_sel, n_act = oracles.triplet(x, labels, valid=valid, **kw)
    np.testing.assert_allclose(float(loss), ref, rtol=2e-4, atol=2e-5)
    assert float(info["num_selected_triplets"]) == n_sel
    assert float(info["num_active_triplets"]) == n_act


@pytest.mark.parametrize("mining", losses.MINING_MODES)
@pytest.mark.parametrize("reduction", losses.REDUCTIONS)
@pytest.mark.parametrize("squared", [True, False])
def test_triplet_matches_loops(mining, reduction, squared):
    rng = np.random.default_rng(hash((mining, reduction, squared)) % 2**32)
    for b in (3, 9, 20):
        x = _unit(rng, b)
        labels = rng.integers(0, 3, b)
        _check_triplet(x, labels, margin=0.3, mining=mining, squared=squared, reduction=reduction)


@pytest.mark.parametrize("reduction", losses.REDUCTIONS)
@pytest.mark.parametrize("power,pos_margin", [(2, 0.0), (1, 0.0), (2, 0.25)])
def test_contrastive_matches_loops(reduction, power, pos_margin):
    rng = np.random.default_rng(power)
    for b in (2, 7, 20):
        x = _unit(rng, b)
        labels = rng.integers(0, 3, b)
        kw = dict(margin=0.9, pos_margin=pos_margin, power=power, reduction=reduction)
        loss, _ = jax.jit(functools.partial(losses.contrastive_loss, **kw))(x, labels)
        np.testing.assert_allclose(float(loss), oracles.contrastive(x, labels, **kw), rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize(
    "labels",
    [np.zeros(6, int), np.arange(6), np.array([0, 0, 1, 2, 3, 4]), np.array([5, 5, 5, 5, 9, 9])],
    ids=["one-class", "all-distinct", "one-pair", "two-classes"],
)
@pytest.mark.parametrize("mining", losses.MINING_MODES)
def test_triplet_label_layouts(labels, mining):
    x = _unit(np.random.default_rng(1), len(labels))
    _check_triplet(x, labels, margin=0.2, mining=mining)
    loss, info = losses.triplet_loss(x, labels, mining=mining)
    assert np.isfinite(float(loss))
    if len(set(labels.tolist())) in (1, len(labels)):  # no positives or no negatives
        assert float(loss) == 0.0 and float(info["num_valid_triplets"]) == 0.0


def test_contrastive_label_layouts():
    x = _unit(np.random.default_rng(2), 6)
    for labels in (np.zeros(6, int), np.arange(6)):
        loss, info = losses.contrastive_loss(x, labels)
        np.testing.assert_allclose(float(loss), oracles.contrastive(x, labels), rtol=1e-5)
        assert np.isfinite(float(info["mean_pos_distance"]))


@pytest.mark.parametrize("mining", losses.MINING_MODES)
def test_padding_equals_unpadded(mining):
    rng = np.random.default_rng(3)
    x = _unit(rng, 12)
    labels = rng.integers(0, 3, 12)
    loss, info = losses.triplet_loss(x, labels, mining=mining)
    # Pad with garbage rows that share labels with real ones.
    xp = np.concatenate([x, rng.normal(size=(5, 4)).astype(np.float32)])
    lp = np.concatenate([labels, labels[:5]])
    valid = np.arange(17) < 12
    loss_p, info_p = losses.triplet_loss(xp, lp, mining=mining, valid=valid)
    np.testing.assert_allclose(float(loss_p), float(loss), rtol=1e-5, atol=1e-7)
    assert float(info_p["num_selected_triplets"]) == float(info["num_selected_triplets"])
    closs, _ = losses.contrastive_loss(x, labels)
    closs_p, _ = losses.contrastive_loss(xp, lp, valid=valid)
    np.testing.assert_allclose(float(closs_p), float(closs), rtol=1e-6)
    _check_triplet(xp, lp, valid=valid, mining=mining)


@pytest.mark.parametrize("mining", WINDOW_MODES)
def test_matches_lecture_triplet_mask(mining):
    """Selected-triplet counts agree with the lecture's B×B×B mask."""
    rng = np.random.default_rng(4)
    x = _unit(rng, 16)
    labels = rng.integers(0, 4, 16)
    d = np.asarray(jax.vmap(lambda a: jnp.sum((x - a) ** 2, axis=1))(x))
    dap, dan = d[:, :, None], d[:, None, :]
    window = {
        "all": np.ones_like(dap + dan, bool),
        "hard": dan <= dap,
        "semihard": (dap < dan) & (dan < dap + 0.2),
        "easy": dan >= dap + 0.2,
    }[mining]
    m = np.asarray(masks.triplet_mask(labels)) & window
    _, info = losses.triplet_loss(x, labels, mining=mining, margin=0.2)
    assert float(info["num_selected_triplets"]) == m.sum()


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(2, 14),
    n_classes=st.integers(1, 5),
    margin=st.sampled_from([0.0, 0.1, 0.5, 2.0]),
    mining=st.sampled_from(losses.MINING_MODES),
    quantise=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_triplet(b, n_classes, margin, mining, quantise, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, 3)).astype(np.float32)
    if quantise:  # many exactly tied distances and coincident points
        x = np.round(x)
    labels = rng.integers(0, n_classes, b)
    loss, info = losses.triplet_loss(x, labels, margin=margin, mining=mining)
    ref, n_sel, n_act = oracles.triplet(x, labels, margin=margin, mining=mining)
    np.testing.assert_allclose(float(loss), ref, rtol=2e-4, atol=2e-4)
    assert float(info["num_selected_triplets"]) == n_sel
    assert float(info["num_active_triplets"]) == n_act


@settings(max_examples=20, deadline=None)
@given(b=st.integers(2, 14), n_classes=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_property_contrastive(b, n_classes, seed):
    rng = np.random.default_rng(seed)
    x = np.round(rng.normal(size=(b, 3))).astype(np.float32)
    labels = rng.integers(0, n_classes, b)
    loss, _ = losses.contrastive_loss(x, labels, margin=1.5)
    np.testing.assert_allclose(float(loss), oracles.contrastive(x, labels, margin=1.5), rtol=2e-4, atol=2e-5)


def _numeric_grad(f, x, eps=1e-3):
    g = np.zeros_like(x, dtype=np.float64)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        g[idx] = (f(xp) - f(xm)) / (2 * eps)
    return g


@pytest.mark.parametrize("mining", losses.MINING_MODES)
def test_triplet_grad_matches_finite_differences(mining):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(8, 3)).astype(np.float64)
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    f64 = lambda e: oracles.triplet(e, labels, margin=0.5, mining=mining)[0]  # noqa: E731
    g = jax.grad(lambda e: losses.triplet_loss(e, labels, margin=0.5, mining=mining)[0])(
        x.astype(np.float32)
    )
    np.testing.assert_allclose(np.asarray(g), _numeric_grad(f64, x), atol=2e-3)


def test_contrastive_grad_matches_finite_differences():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(7, 3)).astype(np.float64) * 0.4
    labels = np.array([0, 0, 1, 1, 1, 2, 2])
    for power in (1, 2):
        f64 = lambda e: oracles.contrastive(e, labels, margin=1.0, power=power)  # noqa: E731
        g = jax.grad(lambda e: losses.contrastive_loss(e, labels, margin=1.0, power=power)[0])(
            x.astype(np.float32)
        )
        np.testing.assert_allclose(np.asarray(g), _numeric_grad(f64, x), atol=2e-3)


@pytest.mark.parametrize("fill", [0.0, 0.5])
def test_finite_gradients_with_coincident_embeddings(fill):
    x = jnp.full((6, 4), fill)
    labels = jnp.array([0, 0, 1, 1, 2, 2])
    for mining in losses.MINING_MODES:
        for squared in (True, False):
            g = jax.grad(
                lambda e: losses.triplet_loss(e, labels, mining=mining, squared=squared)[0]
            )(x)
            assert np.isfinite(np.asarray(g)).all(), (mining, squared)
    for power in (1, 2):
        g = jax.grad(lambda e: losses.contrastive_loss(e, labels, power=power)[0])(x)
        assert np.isfinite(np.asarray(g)).all()
    # Two coincident points among spread ones.
    y = jnp.asarray(_unit(np.random.default_rng(0), 6)).at[1].set(_unit(np.random.default_rng(0), 6)[0])
    g = jax.grad(lambda e: losses.contrastive_loss(e, labels)[0] + losses.triplet_loss(e, labels, squared=False)[0])(y)
    assert np.isfinite(np.asarray(g)).all()


def test_bfloat16_inputs():
    rng = np.random.default_rng(7)
    x = _unit(rng, 24, 16)
    labels = rng.integers(0, 4, 24)
    xb = jnp.asarray(x, jnp.bfloat16)
    x_rounded = np.asarray(xb.astype(jnp.float32))
    for mining in ("all", "semihard", "batch_hard"):
        loss, info = losses.triplet_loss(xb, labels, mining=mining)
        assert loss.dtype == jnp.float32 and info["mean_pos_distance"].dtype == jnp.float32
        ref, _, _ = oracles.triplet(x_rounded, labels, mining=mining)
        np.testing.assert_allclose(float(loss), ref, rtol=1e-3, atol=1e-4)
    loss, _ = losses.contrastive_loss(xb, labels)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), oracles.contrastive(x_rounded, labels), rtol=1e-3)
    g = jax.grad(lambda e: losses.triplet_loss(e, labels)[0])(xb)
    assert g.dtype == jnp.bfloat16 and np.isfinite(np.asarray(g, np.float32)).all()


def test_vmap_over_independent_batches():
    rng = np.random.default_rng(8)
    x = np.stack([_unit(rng, 10) for _ in range(3)])
    labels = rng.integers(0, 3, (3, 10))
    for fn in (
        functools.partial(losses.triplet_loss, mining="semihard"),
        functools.partial(losses.triplet_loss, mining="semihard_facenet"),
        losses.contrastive_loss,
    ):
        batched, _ = jax.jit(jax.vmap(fn))(x, labels)
        for i in range(3):
            np.testing.assert_allclose(batched[i], fn(x[i], labels[i])[0], rtol=1e-5, atol=1e-7)


def test_large_batch_against_float64():
    """B = 4096: exact sum over ~1.5e9 triplets vs a float64 NumPy computation."""
    b, n_classes, margin = 4096, 10, 0.2
    rng = np.random.default_rng(9)
    x = _unit(rng, b, 16)
    labels = rng.integers(0, n_classes, b).astype(np.int32)
    loss, info = jax.jit(losses.triplet_loss)(x, labels)

    x64 = x.astype(np.float64)
    sq = (x64 * x64).sum(1)
    total, count, active = 0.0, 0, 0
    for a in range(b):
        d = np.maximum(sq[a] - 2 * x64 @ x64[a] + sq, 0.0)
        same = labels == labels[a]
        same[a] = False
        dp, dn = np.sort(d[same]), np.sort(d[labels != labels[a]])
        prefix = np.concatenate([[0.0], np.cumsum(dn)])
        c = np.searchsorted(dn, dp + margin, side="left")
        total += float(np.sum(c * (dp + margin) - prefix[c]))
        count += len(dp) * len(dn)
        active += int(c.sum())
    assert count > 2**31  # an int32 count would have overflowed
    assert float(info["num_valid_triplets"]) == pytest.approx(count, rel=1e-6)
    assert float(info["num_active_triplets"]) == pytest.approx(active, rel=1e-6)
    np.testing.assert_allclose(float(loss), total / count, rtol=1e-4)


@pytest.mark.parametrize(
    "fn,kw",
    [
        (losses.triplet_loss, dict(mining="all")),
        (losses.triplet_loss, dict(mining="semihard", squared=False)),
        (losses.triplet_loss, dict(mining="semihard_facenet")),
        (losses.triplet_loss, dict(mining="batch_hard", reduction="mean_nonzero")),
        (losses.contrastive_loss, dict(reduction="mean_nonzero")),
    ],
)
def test_data_parallel_equals_single_device(fn, kw):
    """Loss and per-shard gradients inside shard_map and pmap over 8 devices."""
    devices = jax.devices()[:8]
    if len(devices) < 8:
        pytest.skip("needs 8 (simulated) devices")
    rng = np.random.default_rng(10)
    b = 40
    x = _unit(rng, b)
    labels = rng.integers(0, 4, b).astype(np.int32)
    valid = rng.random(b) > 0.15
    loss1, grad1 = jax.value_and_grad(lambda e: fn(e, labels, valid=valid, **kw)[0])(x)
    info1 = fn(x, labels, valid=valid, **kw)[1]

    def local(e, y, v):
        (loss, info), g = jax.value_and_grad(
            lambda e: fn(e, y, valid=v, axis_name="batch", **kw), has_aux=True
        )(e)
        return loss, info, g

    mesh = Mesh(np.array(devices), ("batch",))
    spec = P("batch")
    sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=(P(), P(), spec)))
    loss8, info8, grad8 = sharded(x, labels, valid)
    np.testing.assert_allclose(float(loss8), float(loss1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad8), np.asarray(grad1), atol=1e-6)
    for k in info1:
        np.testing.assert_allclose(float(info8[k]), float(info1[k]), rtol=1e-5, err_msg=k)

    lossp, _, gradp = jax.pmap(local, axis_name="batch")(
        x.reshape(8, -1, 4), labels.reshape(8, -1), valid.reshape(8, -1)
    )
    np.testing.assert_allclose(np.asarray(lossp), float(loss1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gradp).reshape(b, 4), np.asarray(grad1), atol=1e-6)


def test_bad_input_messages():
    x = jnp.ones((4, 3))
    y = jnp.array([0, 0, 1, 1])
    cases = [
        (lambda: losses.triplet_loss(jnp.ones(4), y), ValueError, "embeddings must have shape"),
        (lambda: losses.triplet_loss(x, y[:, None]), ValueError, "labels must have shape"),
        (lambda: losses.triplet_loss(x, y[:3]), ValueError, "disagree on the batch size"),
        (lambda: losses.contrastive_loss(x, y.astype(float)), TypeError, "labels must be an integer"),
        (lambda: losses.triplet_loss(x, y, mining="hardest"), ValueError, "unknown mining 'hardest'"),
        (lambda: losses.contrastive_loss(x, y, reduction="avg"), ValueError, "unknown reduction"),
        (lambda: losses.triplet_loss(x[:1], y[:1]), ValueError, "at least 2"),
        (lambda: losses.triplet_loss(x, y, margin=-0.1), ValueError, "margin must be >= 0"),
        (lambda: losses.contrastive_loss(x, y, power=0), ValueError, "power must be > 0"),
        (lambda: losses.triplet_loss(x.astype(jnp.int32), y), TypeError, "floating point"),
        (lambda: losses.triplet_loss(x, y, valid=jnp.ones(4)), TypeError, "boolean"),
    ]
    for call, exc, message in cases:
        with pytest.raises(exc, match=message):
            call()
    # Errors are raised at trace time, inside jit too.
    with pytest.raises(ValueError, match="disagree"):
        jax.jit(losses.triplet_loss)(x, y[:3])
    with pytest.raises(TypeError, match="concrete Python number"):
        jax.jit(lambda m: losses.triplet_loss(x, y, margin=m))(0.2)


# ------------------------------------------------------------------ non-finite inputs

# Every loss configuration; the reductions are looped over inside one jitted function.
NONFINITE_CONFIGS = [(losses.contrastive_loss, dict(power=p)) for p in (1, 2)] + [
    (losses.triplet_loss, dict(mining=m, squared=s))
    for m in losses.MINING_MODES
    for s in (True, False)
]
_EXACT_INFO = ("num_pos_pairs", "num_neg_pairs", "num_valid_triplets")


def _nonfinite_batches(x, row):
    """(x, garbage name) pairs: the clean batch, then NaN / ±inf in one entry or all of ``row``."""
    out = [(x, "clean")]
    for bad in (np.nan, np.inf, -np.inf):
        for where, idx in (("entry", (row, 1)), ("row", row)):
            y = x.copy()
            y[idx] = bad
            out.append((y, f"{bad} in {where}"))
    return out


def _config_id(config):
    fn, kw = config
    return fn.__name__.split("_")[0] + "-" + "-".join(str(v) for v in kw.values())


@pytest.fixture(scope="module")
def nonfinite_results():
    """Every configuration and reduction on the clean and the garbage batches: one jit.

    ``xs`` stacks the cases of :func:`_nonfinite_batches` twice; in the second half the
    garbage row is padding. One vmapped jit for all configurations compiles in a few
    seconds where one per configuration took three times as long.
    """
    x = _unit(np.random.default_rng(11), 8)
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    row = 2
    cases = _nonfinite_batches(x, row)
    xs = np.stack([c for c, _ in cases] * 2)
    valid = np.ones((len(xs), 8), bool)
    valid[len(cases):, row] = False

    def everything(e, v):
        results = []
        for fn, kw in NONFINITE_CONFIGS:
            out = {r: fn(e, labels, valid=v, reduction=r, **kw) for r in losses.REDUCTIONS}
            results.append(({r: loss for r, (loss, _) in out.items()}, out["mean"][1]))
        return results

    results = jax.jit(jax.vmap(everything))(xs, valid)
    keep = np.arange(8) != row
    return results, [name for _, name in cases], x[keep], labels[keep]


@pytest.mark.parametrize("index", range(len(NONFINITE_CONFIGS)),
                         ids=[_config_id(c) for c in NONFINITE_CONFIGS])
def test_nonfinite_valid_row_gives_nan_padded_row_is_ignored(nonfinite_results, index):
    """NaN / ±inf in a valid row: NaN loss and distance info (jit + vmap, every reduction).

    The same garbage in a padded row: the loss of the batch without that row.
    """
    fn, kw = NONFINITE_CONFIGS[index]
    results, names, x_kept, labels_kept = nonfinite_results
    loss, info = results[index]
    n = len(names)
    for r in losses.REDUCTIONS:
        l = np.asarray(loss[r])
        assert np.isfinite(l[0]), r
        for i in range(1, n):
            assert np.isnan(l[i]), (r, names[i], l[i])
        # Padded garbage: exactly the loss with a clean padded row, i.e. without the row.
        np.testing.assert_array_equal(l[n:], l[n], err_msg=r)
        if fn is losses.contrastive_loss:
            ref = oracles.contrastive(x_kept, labels_kept, reduction=r, **kw)
        else:
            ref = oracles.triplet(x_kept, labels_kept, reduction=r, **kw)[0]
        np.testing.assert_allclose(l[n], ref, rtol=2e-4, atol=2e-5, err_msg=r)
    for k, v in info.items():
        v = np.asarray(v)
        assert np.isfinite(v[0]) and np.isfinite(v[n:]).all(), k
        bad = v[1:n]
        assert (np.isfinite(bad) if k in _EXACT_INFO else np.isnan(bad)).all(), (k, bad)


def test_nonfinite_under_shard_map():
    """A NaN / ±inf on one device makes every device's loss NaN; padded garbage does not.

    Gradients stay finite (and equal to those of a clean padded row) with padded garbage.
    """
    devices = jax.devices()[:8]
    if len(devices) < 8:
        pytest.skip("needs 8 (simulated) devices")
    fns = [
        functools.partial(losses.contrastive_loss, reduction="mean_nonzero"),
        functools.partial(losses.triplet_loss, mining="semihard", squared=False),
        functools.partial(losses.triplet_loss, mining="batch_hard", squared=False),
    ]
    rng = np.random.default_rng(12)
    x = _unit(rng, 16)
    labels = rng.integers(0, 3, 16).astype(np.int32)
    row = 5  # on device 2

    def local(e, y, v):
        out = [jax.value_and_grad(lambda e: fn(e, y, valid=v, axis_name="batch")[0])(e)
               for fn in fns]
        return [loss[None] for loss, _ in out], [g for _, g in out]

    mesh = Mesh(np.array(devices), ("batch",))
    spec = P("batch")
    sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec))
    all_valid = np.ones(16, bool)
    padded = all_valid.copy()
    padded[row] = False
    clean_loss, clean_grad = sharded(x, labels, padded)
    keep = np.arange(16) != row
    np.testing.assert_allclose(
        np.asarray(clean_loss[0]),
        oracles.contrastive(x[keep], labels[keep], reduction="mean_nonzero"), rtol=2e-4)
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[row, 1] = bad
        loss, _ = sharded(y, labels, all_valid)
        for i in range(len(fns)):
            assert np.isnan(np.asarray(loss[i])).all(), (i, bad, loss[i])  # on all 8 devices
        loss, grad = sharded(y, labels, padded)
        for i in range(len(fns)):
            np.testing.assert_array_equal(loss[i], clean_loss[i], err_msg=f"{i} {bad}")
            np.testing.assert_array_equal(grad[i], clean_grad[i], err_msg=f"{i} {bad}")
            assert np.isfinite(np.asarray(grad[i])).all()
