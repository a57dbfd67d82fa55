import doctest
import functools
import importlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxmetric import distances, losses
from jaxmetric import mining as mining_lib

import oracles
from pair_loss_checks import (
    NONFINITE_LABELS,
    NONFINITE_ROW,
    B,
    grid_batches,
    nonfinite_batches,
    unit,
)

WINDOW_MODES = ("all", "hard", "semihard", "easy")
DISTANCES = tuple(distances.DISTANCES)
REDUCTIONS = losses.REDUCTIONS + ("none",)


def _oracle(fn, x, labels, **kw):
    """(loss, num_selected, num_active) of the Python-loop oracle of ``fn``."""
    if fn is losses.contrastive_loss:
        return oracles.contrastive(x, labels, **kw)
    return oracles.triplet(x, labels, **kw)


def _counts(fn, info):
    """(num_selected, num_active) of a loss's info, in the oracle's terms."""
    if fn is losses.contrastive_loss:
        return (info["num_pos_pairs"] + info["num_neg_pairs"],
                info["num_active_pos_pairs"] + info["num_active_neg_pairs"])
    return info["num_selected_triplets"], info["num_active_triplets"]


# ------------------------------------------------ every loss × distance × reduction
#
# One vmapped jit evaluates every configuration and every reduction on a stack of small
# batches: the "grid" batches compared with the Python-loop oracles, and the "garbage"
# batches of the non-finite tests. One compilation instead of one per case.

CONFIGS = [
    (losses.contrastive_loss, dict(distance=dist, margin=0.9, power=power, pos_margin=pos_margin))
    for dist in DISTANCES for power, pos_margin in ((2, 0.0), (1, 0.25))
] + [
    (losses.triplet_loss, dict(distance=dist, mining=mode, margin=0.3))
    for mode in losses.MINING_MODES for dist in DISTANCES
] + [
    (losses.triplet_loss, dict(distance=dist, mining=mode, margin="soft"))
    for mode in losses.SOFT_MINING_MODES for dist in DISTANCES
]


def _config_id(config):
    fn, kw = config
    return fn.__name__.split("_")[0] + "-" + "-".join(str(v) for v in kw.values())


@pytest.fixture(scope="module")
def grid():
    """Every configuration and reduction on every batch: ``results[config][reduction]``
    is ``(loss, info)`` stacked over the batches (grid batches first, then the
    non-finite ones: the cases of :func:`pair_loss_checks.nonfinite_batches`, then the
    same with the garbage row padded)."""
    rng = np.random.default_rng(11)
    batches = grid_batches(rng)
    x = unit(rng, B)
    cases = nonfinite_batches(x)
    xs = [g[0] for g in batches] + [c for c, _ in cases] * 2
    ys = [g[1] for g in batches] + [NONFINITE_LABELS] * (2 * len(cases))
    vs = [g[2] for g in batches] + [np.ones(B, bool)] * (2 * len(cases))
    vs = np.stack(vs)
    vs[len(batches) + len(cases):, NONFINITE_ROW] = False

    def everything(e, y, v):
        return [{r: fn(e, y, valid=v, reduction=r, **kw) for r in REDUCTIONS}
                for fn, kw in CONFIGS]

    results = jax.jit(jax.vmap(everything))(
        np.stack(xs).astype(np.float32), np.stack(ys).astype(np.int32), vs)
    return {
        "results": results,
        "grid": batches,
        "nonfinite": [name for _, name in cases],
        "nonfinite_x": x,
    }


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("index", range(len(CONFIGS)), ids=[_config_id(c) for c in CONFIGS])
def test_matches_loops(grid, index, reduction):
    """Loss and counts against the Python-loop oracles, for every mode, distance and
    reduction ("none": per anchor), on unit, padded non-unit, tied and degenerate batches."""
    fn, kw = CONFIGS[index]
    loss, info = grid["results"][index][reduction]
    for i, (x, labels, valid, name) in enumerate(grid["grid"]):
        ref, n_sel, n_act = _oracle(fn, x, labels, valid=valid, reduction=reduction, **kw)
        np.testing.assert_allclose(loss[i], ref, rtol=2e-4, atol=2e-5, err_msg=name)
        sel, act = _counts(fn, jax.tree.map(lambda v, i=i: v[i], info))
        if reduction == "none":
            chex.assert_shape([loss[i], info["anchor_num_selected"][i]], (B,))
            np.testing.assert_array_equal(info["anchor_num_selected"][i], n_sel, err_msg=name)
            np.testing.assert_array_equal(info["anchor_num_active"][i], n_act, err_msg=name)
            n_sel, n_act = n_sel.sum(), n_act.sum()
        assert float(sel) == n_sel and float(act) == n_act, name
        if name in ("one-class", "all-distinct") and fn is losses.triplet_loss:
            assert float(info["num_valid_triplets"][i]) == 0.0 and not np.any(loss[i]), name


@pytest.mark.parametrize("index", range(len(CONFIGS)), ids=[_config_id(c) for c in CONFIGS])
def test_nonfinite_valid_row_gives_nan_padded_row_is_ignored(grid, index):
    """NaN / ±inf in a valid row: NaN loss and distance info (jit + vmap, every
    distance and reduction, every anchor of "none").

    The same garbage in a padded row: the loss of the batch without that row.
    """
    fn, kw = CONFIGS[index]
    names = grid["nonfinite"]
    n = len(names)
    start = len(grid["grid"])
    keep = np.arange(B) != NONFINITE_ROW
    x_kept, labels_kept = grid["nonfinite_x"][keep], NONFINITE_LABELS[keep]
    for r in REDUCTIONS:
        loss, info = jax.tree.map(lambda v: np.asarray(v[start:]), grid["results"][index][r])
        assert np.isfinite(loss[0]).all(), r
        for i in range(1, n):
            assert np.isnan(loss[i]).all(), (r, names[i], loss[i])
        # Padded garbage: exactly the loss with a clean padded row, i.e. without the row.
        np.testing.assert_array_equal(loss[n:], np.broadcast_to(loss[n], loss[n:].shape), err_msg=r)
        ref = _oracle(fn, x_kept, labels_kept, reduction=r, **kw)[0]
        if r == "none":  # the padded anchor has no terms
            ref = np.insert(ref, NONFINITE_ROW, 0.0)
        np.testing.assert_allclose(loss[n], ref, rtol=2e-4, atol=2e-5, err_msg=r)
        for k, v in info.items():
            assert np.isfinite(v[0]).all() and np.isfinite(v[n:]).all(), (r, k)
            bad = v[1:n]
            assert (np.isfinite(bad) if k in _EXACT_INFO else np.isnan(bad)).all(), (r, k, bad)


_EXACT_INFO = ("num_pos_pairs", "num_neg_pairs", "num_valid_triplets")


# ----------------------------------------------------------------- the API's edges


def test_docstring_examples():
    """The ``>>>`` examples of the losses' docstrings run and print what they show."""
    attempted = 0
    for name in ("contrastive", "triplet", "softmax", "weighted_pair", "margin", "proxy",
                 "margin_softmax", "soft_triple", "fastap", "smooth_ap", "registry"):
        module = importlib.import_module(f"jaxmetric.losses.{name}")
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0, (name, result)
        attempted += result.attempted
    assert attempted >= 8, attempted


def test_distance_argument():
    rng = np.random.default_rng(13)
    x = rng.normal(size=(9, 3)).astype(np.float32)
    labels = rng.integers(0, 3, 9)

    @jax.jit
    def run(x):
        t, c = losses.triplet_loss, losses.contrastive_loss
        return {
            "t_default": t(x, labels)[0],
            "t_squared": t(x, labels, distance="squared_l2")[0],
            "t_alias_true": t(x, labels, squared=True)[0],
            "t_alias_false": t(x, labels, squared=False)[0],
            "t_l2": t(x, labels, distance="l2", squared=False)[0],  # consistent: fine
            "t_cos": t(x, labels, distance="cosine")[0],
            "t_cos_fn": t(x, labels, distance=distances.cross_cosine_distances)[0],
            "c_default": c(x, labels)[0],
            "c_l2": c(x, labels, distance="l2")[0],
            "c_cos": c(x, labels, distance="cosine")[0],
            "c_cos_fn": c(x, labels,
                          distance=lambda a, b: distances.cross_cosine_distances(a, b))[0],
        }

    out = {k: float(v) for k, v in run(x).items()}
    assert out["t_default"] == out["t_squared"] == out["t_alias_true"]
    assert out["t_alias_false"] == out["t_l2"] != out["t_default"]
    assert out["t_cos"] == out["t_cos_fn"]
    assert out["c_default"] == out["c_l2"]
    assert out["c_cos"] == out["c_cos_fn"] != out["c_l2"]
    np.testing.assert_allclose(out["t_cos"], oracles.triplet(x, labels, distance="cosine")[0],
                               rtol=2e-4)
    with pytest.raises(ValueError, match="squared=True .* distance='cosine'"):
        losses.triplet_loss(x, labels, squared=True, distance="cosine")
    with pytest.raises(ValueError, match="squared=False"):
        losses.triplet_loss(x, labels, squared=False, distance="squared_l2")
    with pytest.raises(ValueError, match="unknown distance 'cos'"):
        losses.contrastive_loss(x, labels, distance="cos")
    with pytest.raises(AssertionError, match=r"\(R, B\)"):
        losses.contrastive_loss(x, labels, distance=lambda a, b: (a @ b.T)[:, 1:])


@pytest.mark.parametrize("fill", [0.0, 0.5, None], ids=["zeros", "equal", "two-coincide"])
def test_finite_gradients_with_coincident_embeddings(fill):
    """Every configuration (distance, mode, power): finite gradients where embeddings
    coincide or are zero (one jit)."""
    labels = jnp.array([0, 0, 1, 1, 2, 2])
    if fill is None:
        x = unit(np.random.default_rng(0), 6)
        x[1] = x[0]
    else:
        x = np.full((6, 4), fill, np.float32)
    configs = [(losses.contrastive_loss, dict(distance=d, power=p))
               for d in DISTANCES for p in (1, 2)]
    configs += [(losses.triplet_loss, dict(distance=d, mining=m))
                for d in DISTANCES for m in losses.MINING_MODES]
    configs += [(losses.triplet_loss, dict(distance=d, mining=m, margin="soft"))
                for d in DISTANCES for m in losses.SOFT_MINING_MODES]

    @jax.jit
    def grads(x):
        return [jax.grad(lambda e, fn=fn, kw=kw: fn(e, labels, **kw)[0])(x)
                for fn, kw in configs]

    for g, config in zip(grads(x), configs, strict=True):
        assert np.isfinite(np.asarray(g)).all(), _config_id(config)


# ------------------------------------------------------------------ formulas and sizes


@pytest.mark.parametrize("mining", WINDOW_MODES)
def test_matches_lecture_triplet_mask(mining):
    """Selected-triplet counts agree with the lecture's B×B×B mask."""
    rng = np.random.default_rng(4)
    x = unit(rng, 16)
    labels = rng.integers(0, 4, 16)
    d = np.asarray(jax.vmap(lambda a: jnp.sum((x - a) ** 2, axis=1))(x))
    dap, dan = d[:, :, None], d[:, None, :]
    window = {
        "all": np.ones_like(dap + dan, bool),
        "hard": dan <= dap,
        "semihard": (dap < dan) & (dan < dap + 0.2),
        "easy": dan >= dap + 0.2,
    }[mining]
    m = np.asarray(mining_lib.triplet_mask(labels)) & window
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
    np.testing.assert_allclose(float(loss), oracles.contrastive(x, labels, margin=1.5)[0],
                               rtol=2e-4, atol=2e-5)



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


@pytest.mark.parametrize("mining", losses.SOFT_MINING_MODES)
def test_soft_margin_grad_matches_finite_differences(mining):
    """Soft-margin triplets (Hermans et al.): the gradient through the chunked,
    rematerialised per-anchor tables ("all", "hard") and the one-negative picks."""
    rng = np.random.default_rng(15)
    x = rng.normal(size=(8, 3)).astype(np.float64)
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    f64 = lambda e: oracles.triplet(e, labels, margin="soft", mining=mining)[0]  # noqa: E731
    g = jax.jit(jax.grad(
        lambda e: losses.triplet_loss(e, labels, margin="soft", mining=mining)[0]))(
        x.astype(np.float32))
    np.testing.assert_allclose(np.asarray(g), _numeric_grad(f64, x), atol=2e-3)


def test_soft_margin_all_memory_is_quadratic():
    """B = 4096, soft-margin "all" (loss + gradient): XLA's temporary buffers are a few
    (B, B) tables, not the 256 GiB of a (B, B, B) one. Compiled, not run."""
    b = 4096
    x = jax.ShapeDtypeStruct((b, 16), jnp.float32)
    labels = jax.ShapeDtypeStruct((b,), jnp.int32)
    fn = jax.value_and_grad(lambda e, y: losses.triplet_loss(e, y, margin="soft")[0])
    analysis = jax.jit(fn).lower(x, labels).compile().memory_analysis()
    if analysis is None:
        pytest.skip("no memory analysis on this backend")
    assert analysis.temp_size_in_bytes < 40 * b * b * 4, analysis.temp_size_in_bytes


def test_contrastive_grad_matches_finite_differences():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(7, 3)).astype(np.float64) * 0.4
    labels = np.array([0, 0, 1, 1, 1, 2, 2])
    for power in (1, 2):
        f64 = lambda e, power=power: oracles.contrastive(  # noqa: E731
            e, labels, margin=1.0, power=power)[0]
        g = jax.grad(
            lambda e, power=power: losses.contrastive_loss(e, labels, margin=1.0, power=power)[0]
        )(x.astype(np.float32))
        np.testing.assert_allclose(np.asarray(g), _numeric_grad(f64, x), atol=2e-3)



def test_cosine_grad_matches_finite_differences():
    """The cosine distance's gradient, through a window mode, a one-negative mode and
    the contrastive loss, on non-unit embeddings."""
    rng = np.random.default_rng(14)
    x = rng.normal(size=(8, 3)).astype(np.float64) * rng.uniform(0.5, 2.0, (8, 1))
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    cases = [(losses.triplet_loss, dict(mining="all", margin=0.5)),
             (losses.triplet_loss, dict(mining="batch_hard", margin=0.5)),
             (losses.contrastive_loss, dict(margin=0.7, power=1))]

    @jax.jit
    def grads(e):
        return [jax.grad(lambda e, fn=fn, kw=kw: fn(e, labels, distance="cosine", **kw)[0])(e)
                for fn, kw in cases]

    for g, (fn, kw) in zip(grads(x.astype(np.float32)), cases, strict=True):
        f64 = lambda e, fn=fn, kw=kw: _oracle(  # noqa: E731
            fn, e, labels, distance="cosine", **kw)[0]
        np.testing.assert_allclose(np.asarray(g), _numeric_grad(f64, x), atol=2e-3,
                                   err_msg=str(kw))


def test_bfloat16_inputs():
    rng = np.random.default_rng(7)
    x = unit(rng, 24, 16)
    labels = rng.integers(0, 4, 24)
    xb = jnp.asarray(x, jnp.bfloat16)
    x_rounded = np.asarray(xb.astype(jnp.float32))
    for mining in ("all", "semihard", "batch_hard"):
        loss, info = losses.triplet_loss(xb, labels, mining=mining)
        assert loss.dtype == jnp.float32 and info["mean_pos_distance"].dtype == jnp.float32
        ref, _, _ = oracles.triplet(x_rounded, labels, mining=mining)
        np.testing.assert_allclose(float(loss), ref, rtol=1e-3, atol=1e-4)
    for mining in ("all", "batch_hard"):
        loss, _ = losses.triplet_loss(xb, labels, mining=mining, margin="soft")
        assert loss.dtype == jnp.float32
        ref, _, _ = oracles.triplet(x_rounded, labels, mining=mining, margin="soft")
        np.testing.assert_allclose(float(loss), ref, rtol=1e-3, atol=1e-4)
    loss, _ = losses.contrastive_loss(xb, labels)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), oracles.contrastive(x_rounded, labels)[0], rtol=1e-3)
    g = jax.grad(lambda e: losses.triplet_loss(e, labels)[0])(xb)
    assert g.dtype == jnp.bfloat16 and np.isfinite(np.asarray(g, np.float32)).all()


def test_vmap_over_independent_batches():
    rng = np.random.default_rng(8)
    x = np.stack([unit(rng, 10) for _ in range(3)])
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
    x = unit(rng, b, 16)
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



# ------------------------------------------------------------------- data parallelism

DP_CONFIGS = [
    (losses.triplet_loss, dict(mining="all")),
    (losses.triplet_loss, dict(mining="semihard", distance="cosine")),
    (losses.triplet_loss, dict(mining="semihard_facenet")),
    (losses.triplet_loss, dict(mining="batch_hard", reduction="mean_nonzero")),
    (losses.triplet_loss, dict(mining="hardest_negative", distance="l2", reduction="none")),
    (losses.contrastive_loss, dict(reduction="mean_nonzero")),
    (losses.contrastive_loss, dict(distance="cosine", reduction="none")),
    (losses.triplet_loss, dict(mining="all", margin="soft", distance="l2")),
    (losses.triplet_loss, dict(mining="batch_hard", margin="soft", reduction="none")),
]


@pytest.fixture(scope="module")
def data_parallel():
    """Every DP configuration on one device, inside shard_map and inside pmap over 8
    devices (one compilation each). Objective: the loss ("none": its sum)."""
    devices = jax.devices()[:8]
    if len(devices) < 8:
        pytest.skip("needs 8 (simulated) devices")
    rng = np.random.default_rng(10)
    b = 40
    x = unit(rng, b)
    labels = rng.integers(0, 4, b).astype(np.int32)
    valid = rng.random(b) > 0.15

    def run(e, y, v, axis_name=None):
        out = []
        for fn, kw in DP_CONFIGS:
            def objective(e, fn=fn, kw=kw):
                loss, info = fn(e, y, valid=v, axis_name=axis_name, **kw)
                return jnp.sum(loss), (loss, info)
            (_, (loss, info)), g = jax.value_and_grad(objective, has_aux=True)(e)
            if axis_name is not None:  # scalars as one entry per device
                loss, info = jax.tree.map(lambda a: a if a.ndim else a[None], (loss, info))
            out.append((loss, info, g))
        return out

    single = jax.jit(run)(x, labels, valid)
    local = functools.partial(run, axis_name="batch")
    mesh = Mesh(np.array(devices), ("batch",))
    sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("batch"), out_specs=P("batch")))
    pmapped = jax.pmap(local, axis_name="batch")
    per_device = lambda a: a.reshape(8, -1, *a.shape[1:])  # noqa: E731
    return (single, sharded(x, labels, valid),
            pmapped(per_device(x), per_device(labels), per_device(valid)))


@pytest.mark.parametrize("index", range(len(DP_CONFIGS)), ids=[_config_id(c) for c in DP_CONFIGS])
def test_data_parallel_equals_single_device(data_parallel, index):
    """Loss, info and per-shard gradients inside shard_map and pmap over 8 devices
    equal the single-device ones; "none" gives each device's own anchors."""
    loss1, info1, grad1 = data_parallel[0][index]
    for loss8, info8, grad8 in (r[index] for r in data_parallel[1:]):  # shard_map, pmap
        scale = max(1.0, float(np.abs(grad1).max()))  # "sum" objectives reach ~10
        np.testing.assert_allclose(np.asarray(grad8).reshape(grad1.shape), grad1,
                                   atol=1e-6 * scale)
        for name, v8, v1 in [("loss", loss8, loss1)] + [(k, info8[k], info1[k]) for k in info1]:
            v8, v1 = np.asarray(v8).reshape(-1), np.asarray(v1).reshape(-1)
            if v1.size == 1:  # a scalar: the same on every device
                v1 = np.broadcast_to(v1, v8.shape)
            np.testing.assert_allclose(v8, v1, rtol=1e-5, atol=1e-7, err_msg=name)


def test_bad_input_messages():
    x = jnp.ones((4, 3))
    y = jnp.array([0, 0, 1, 1])
    cases = [
        (lambda: losses.triplet_loss(jnp.ones(4), y), ValueError, "embeddings must have shape"),
        (lambda: losses.triplet_loss(x, y[:, None]), ValueError, "labels must have shape"),
        (lambda: losses.triplet_loss(x, y[:3]), ValueError, "disagree on the batch size"),
        (lambda: losses.contrastive_loss(x, y.astype(float)), TypeError,
         "labels must be an integer"),
        (lambda: losses.triplet_loss(x, y, mining="hardest"), ValueError,
         "unknown mining 'hardest'"),
        (lambda: losses.contrastive_loss(x, y, reduction="avg"), ValueError, "unknown reduction"),
        (lambda: losses.triplet_loss(x[:1], y[:1]), ValueError, "at least 2"),
        (lambda: losses.triplet_loss(x, y, margin=-0.1), ValueError, "margin must be >= 0"),
        (lambda: losses.triplet_loss(x, y, margin="hard"), ValueError, "or 'soft'"),
        (lambda: losses.triplet_loss(x, y, margin="soft", mining="semihard"), ValueError,
         "margin='soft' supports mining all, hard"),
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


def test_nonfinite_under_shard_map():
    """A NaN / ±inf on one device makes every device's loss NaN; padded garbage does not.

    Gradients stay finite (and equal to those of a clean padded row) with padded garbage.
    """
    devices = jax.devices()[:8]
    if len(devices) < 8:
        pytest.skip("needs 8 (simulated) devices")
    fns = [
        functools.partial(losses.contrastive_loss, reduction="mean_nonzero"),
        functools.partial(losses.triplet_loss, mining="semihard", distance="l2"),
        functools.partial(losses.triplet_loss, mining="batch_hard", distance="l2"),
    ]
    rng = np.random.default_rng(12)
    x = unit(rng, 16)
    labels = rng.integers(0, 3, 16).astype(np.int32)
    row = 5  # on device 2

    def local(e, y, v):
        out = [jax.value_and_grad(lambda e, fn=fn: fn(e, y, valid=v, axis_name="batch")[0])(e)
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
        oracles.contrastive(x[keep], labels[keep], reduction="mean_nonzero")[0], rtol=2e-4)
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


# ------------------------------------------------------------------ reference set


def _ref_sets(seed=0, b=6, m=9, dim=3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, dim)).astype(np.float32)
    r = rng.normal(size=(m, dim)).astype(np.float32)
    return x, rng.integers(0, 3, b), r, rng.integers(0, 3, m)


def test_contrastive_with_reference_matches_loop():
    x, y, r, ry = _ref_sets()
    ref_valid = np.arange(len(ry)) < 7  # the last two slots are empty (garbage inside)
    r[~ref_valid] = np.nan
    expected = 0.0
    for i in range(len(x)):
        for j in range(7):
            d = np.linalg.norm(x[i].astype(np.float64) - r[j])
            expected += max(d, 0.0) ** 2 if y[i] == ry[j] else max(1.0 - d, 0.0) ** 2
    loss, info = jax.jit(functools.partial(losses.contrastive_loss, reduction="sum"))(
        x, y, ref_embeddings=r, ref_labels=ry, ref_valid=ref_valid)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert info["num_pos_pairs"] + info["num_neg_pairs"] == len(x) * 7


def test_triplet_with_reference_matches_loop_and_keeps_self_pairs():
    x, y, r, ry = _ref_sets(1)
    r[0] = x[0]  # an identical row in the reference is an ordinary positive, not "self"
    ry[0] = y[0]
    total, n = 0.0, 0
    for i in range(len(x)):
        for p in range(len(r)):
            for q in range(len(r)):
                if ry[p] == y[i] and ry[q] != y[i]:
                    dp = np.sum((x[i].astype(np.float64) - r[p]) ** 2)
                    dn = np.sum((x[i].astype(np.float64) - r[q]) ** 2)
                    total += max(dp - dn + 0.2, 0.0)
                    n += 1
    loss, info = losses.triplet_loss(x, y, ref_embeddings=r, ref_labels=ry)
    np.testing.assert_allclose(loss, total / n, rtol=1e-5)
    assert info["num_valid_triplets"] == n
    g = jax.grad(lambda r_: losses.triplet_loss(x, y, ref_embeddings=r_, ref_labels=ry)[0])(r)
    assert np.all(np.isfinite(g))  # the zero distance of the identical pair included


def test_reference_bad_input_and_nonfinite():
    x, y, r, ry = _ref_sets(2)
    with pytest.raises(ValueError, match="given together"):
        losses.triplet_loss(x, y, ref_embeddings=r)
    with pytest.raises(ValueError, match="dimension"):
        losses.triplet_loss(x, y, ref_embeddings=r[:, :2], ref_labels=ry)
    with pytest.raises(ValueError, match="ref_labels must have shape"):
        losses.contrastive_loss(x, y, ref_embeddings=r, ref_labels=ry[:, None])
    r[3] = np.inf
    loss, _ = losses.contrastive_loss(x, y, ref_embeddings=r, ref_labels=ry)
    assert np.isnan(loss)
