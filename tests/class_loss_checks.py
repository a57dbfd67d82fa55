"""Checks shared by the tests of the losses of rows against learned class vectors
(``test_proxy_losses.py``, ``test_margin_softmax_losses.py``).

A :class:`Case` is a loss, its float64 loop oracle (``oracles_proxy``) and keyword
arguments. Every check runs all the cases of a file under one ``jit`` (and ``vmap``
over a stack of batches where it can), so a file compiles a handful of programs.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

B, D, C = 10, 4, 5
EXACT = ("num_pos_pairs", "num_neg_pairs", "num_rows", "num_proxies_with_positives")


class Case(NamedTuple):
    name: str
    fn: object       # loss(embeddings, labels, vectors, **kw) -> (loss, info)
    oracle: object   # oracle(x, labels, vectors, **kw) -> (loss, per_row, counts)
    kw: dict


def expand_centers(w, k):
    """(C, K, D) centers from (C, D) class vectors, the jnp twin of
    ``oracles_proxy.expand_centers`` (a fixed differentiable map: the checks written for
    one vector per class then cover the losses with ``K`` per class). Computed in
    float32, so that bfloat16 vectors expand as the float64 oracle expands them."""
    w = jnp.asarray(w).astype(jnp.float32)
    return jnp.stack([w + 0.6 * t * jnp.roll(w, t, axis=-1) for t in range(k)], axis=1)


def unit(rng, n, d=D):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def grid_batches(rng):
    """(x, labels, valid, vectors, name): random unit rows; non-unit rows with a zero
    row and padded garbage (one with an out-of-range label); rows identical to each
    other and to their class vector (cos = 1 exactly, ArcFace's singular point); one
    class; classes without rows; every row padded."""
    out = []
    ones = np.ones(B, bool)
    w = rng.normal(size=(C, D)).astype(np.float32) * rng.uniform(0.5, 2.0, (C, 1))
    out.append((unit(rng, B), rng.integers(0, C, B), ones, w, "unit"))
    x = (rng.normal(size=(B, D)) * rng.uniform(0.2, 3.0, (B, 1))).astype(np.float32)
    x[4] = 0.0
    valid = ones.copy()
    valid[[1, 6, 9]] = False
    x[[1, 6, 9]] = rng.normal(size=(3, D)) * 50
    labels = rng.integers(0, C, B)
    labels[6] = -1  # padded rows may hold any label
    out.append((x, labels, valid, w.copy(), "padded non-unit"))
    axes = np.eye(C, D, dtype=np.float32)  # exact cosines 0 and 1
    labels = rng.integers(0, C, B)
    out.append((axes[labels] * 2.0, labels, ones, axes, "identical"))
    out.append((unit(rng, B), np.zeros(B, int), ones, w.copy(), "one class"))
    out.append((unit(rng, B), rng.choice([1, 3], B), ones, w.copy(), "missing classes"))
    out.append((unit(rng, B), rng.integers(0, C, B), ~ones, w.copy(), "all padded"))
    return out


def _stack(batches):
    xs, ys, vs, ws, _ = zip(*batches, strict=True)
    return (np.stack(xs).astype(np.float32), np.stack(ys).astype(np.int32), np.stack(vs),
            np.stack(ws).astype(np.float32))


def check_against_oracles(cases, rng, rtol=2e-4, atol=2e-5):
    """Loss (per row for ``"none"``), counts and mean distances of every case on every
    grid batch, under one jit of a vmap over the batches, against the oracles."""
    batches = grid_batches(rng)

    def everything(x, y, v, w):
        return [c.fn(x, y, w, valid=v, **c.kw) for c in cases]

    results = jax.jit(jax.vmap(everything))(*_stack(batches))
    for case, (loss, info) in zip(cases, results, strict=True):
        for i, (x, labels, valid, w, name) in enumerate(batches):
            where = f"{case.name} on {name}"
            ref, _, counts = case.oracle(x, labels, w, valid=valid, **case.kw)
            np.testing.assert_allclose(loss[i], ref, rtol=rtol, atol=atol, err_msg=where)
            for k, v in counts.items():
                np.testing.assert_allclose(info[k][i], v, rtol=1e-5, atol=1e-6,
                                           err_msg=f"{where}: {k}")
            active = sum(v for k, v in counts.items() if k.startswith("num_active"))
            terms = (counts["num_rows"] if "num_rows" in counts
                     else counts["num_pos_pairs"] + counts["num_neg_pairs"])
            np.testing.assert_allclose(info["active_fraction"][i], active / max(terms, 1),
                                       rtol=1e-6, err_msg=where)
            for k in ("mean_pos_distance", "mean_neg_distance", "active_fraction"):
                assert info[k].dtype == jnp.float32, (where, k)


def numeric_grad(f, x, eps=1e-5):
    g = np.zeros_like(x, dtype=np.float64)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        g[idx] = (f(xp) - f(xm)) / (2 * eps)
    return g


def check_gradients(cases, rng, b=7, d=3, c=4):
    """jax.grad with respect to the embeddings and the class vectors (one jit) against
    central differences of the float64 oracles, on non-unit inputs with padding."""
    x = rng.normal(size=(b, d)) * rng.uniform(0.5, 2.0, (b, 1))
    w = rng.normal(size=(c, d)) * rng.uniform(0.5, 2.0, (c, 1))
    labels = np.array([0, 0, 1, 1, 1, 2, 0])[:b]  # class 3 has no rows
    valid = np.arange(b) != 2

    def objective(case, x, w):
        return jnp.sum(case.fn(x, labels, w, valid=valid, **case.kw)[0])

    grads = jax.jit(lambda x, w: [jax.grad(functools.partial(objective, case), (0, 1))(x, w)
                                  for case in cases])(x.astype(np.float32), w.astype(np.float32))
    for case, (gx, gw) in zip(cases, grads, strict=True):
        def f64(x_, w_, case=case):
            return float(np.sum(case.oracle(x_, labels, w_, valid=valid, **case.kw)[0]))
        want_x = numeric_grad(lambda x_: f64(x_, w), x)
        want_w = numeric_grad(lambda w_: f64(x, w_), w)
        scale = max(1.0, np.abs(want_x).max(), np.abs(want_w).max())
        np.testing.assert_allclose(gx, want_x, atol=2e-4 * scale, err_msg=case.name)
        np.testing.assert_allclose(gw, want_w, atol=2e-4 * scale, err_msg=case.name)
        assert np.all(gx[~valid] == 0), case.name


def check_finite_edge_cases(cases, rng):
    """Finite loss and gradients (embeddings and class vectors) for identical rows,
    rows equal to their class vector (and its opposite), zero rows and vectors, one
    class, every row padded, and bfloat16 inputs whose gradient stays bfloat16."""
    axes = np.eye(C, D, dtype=np.float32)
    labels = np.arange(B) % C
    same = np.tile(unit(rng, 1), (B, 1))
    opposite = axes[labels] * np.where(np.arange(B) < B // 2, 1.0, -1.0)[:, None]
    inputs = {
        "identical rows": (same, labels, np.ones(B, bool), unit(rng, C)),
        "rows = ±own vector": (opposite.astype(np.float32), labels, np.ones(B, bool), axes),
        "zero rows and vectors": (np.zeros((B, D), np.float32), labels, np.ones(B, bool),
                                  np.zeros((C, D), np.float32)),
        "one class": (unit(rng, B), np.zeros(B, int), np.ones(B, bool), unit(rng, C)),
        "all padded": (unit(rng, B), labels, np.zeros(B, bool), unit(rng, C)),
    }

    @jax.jit
    def run(x, y, v, w):
        out = []
        for case in cases:
            def objective(x, w, case=case):
                return jnp.sum(case.fn(x, y, w, valid=v, **case.kw)[0])
            out.append(jax.value_and_grad(objective, (0, 1))(x, w))
        return out

    for name, (x, y, v, w) in inputs.items():
        for case, (loss, (gx, gw)) in zip(cases, run(x, y, v, w), strict=True):
            where = f"{case.name} on {name}"
            assert np.isfinite(loss) and np.isfinite(gx).all() and np.isfinite(gw).all(), where
    x, y, w = unit(rng, B), rng.integers(0, C, B), unit(rng, C)
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    x32, w32 = (np.asarray(a.astype(jnp.float32)) for a in (xb, wb))

    @jax.jit
    def run_bf16(x, w):
        out = []
        for case in cases:
            def objective(x, w, case=case):
                loss, info = case.fn(x, y, w, **case.kw)
                return jnp.sum(loss), (loss, info)
            out.append(jax.value_and_grad(objective, (0, 1), has_aux=True)(x, w))
        return out

    for case, ((_, (loss, info)), (gx, gw)) in zip(cases, run_bf16(xb, wb), strict=True):
        assert loss.dtype == jnp.float32 and info["mean_pos_distance"].dtype == jnp.float32
        np.testing.assert_allclose(loss, case.oracle(x32, y, w32, **case.kw)[0], rtol=1e-4,
                                   atol=1e-4, err_msg=case.name)
        assert gx.dtype == gw.dtype == jnp.bfloat16, case.name
        assert np.isfinite(np.asarray(gx, np.float32)).all(), case.name


def check_nonfinite_and_labels(cases, rng):
    """NaN / ±inf in a valid row or in the class vectors, or an out-of-range label of
    a valid row under jit: NaN loss and NaN info but for the exact counts. The same
    garbage (or label) in a padded row: the loss and gradient of a clean padded row.
    Concrete out-of-range labels: ValueError."""
    x, labels, w = unit(rng, B), rng.integers(0, C, B).astype(np.int32), unit(rng, C)
    row = 3
    padded = np.arange(B) != row

    @jax.jit
    def run(x, y, v, w):
        out = []
        for case in cases:
            def objective(x, case=case):
                loss, info = case.fn(x, y, w, valid=v, **case.kw)
                return jnp.sum(loss), (loss, info)
            (_, (loss, info)), grad = jax.value_and_grad(objective, has_aux=True)(x)
            out.append((loss, info, grad))
        return out

    clean = run(x, labels, padded, w)
    for bad in (np.nan, np.inf, -np.inf):
        xb, wb = x.copy(), w.copy()
        xb[row, 1] = bad
        wb[2, 0] = bad
        for name, args in [("row", (xb, labels, np.ones(B, bool), w)),
                           ("vectors", (x, labels, padded, wb))]:
            for case, (loss, info, _) in zip(cases, run(*args), strict=True):
                where = f"{case.name}: {bad} in {name}"
                assert np.isnan(loss).all(), where
                for k, v in info.items():
                    assert (np.isfinite(v) if k in EXACT else np.isnan(v)).all(), (where, k)
        for case, got, want in zip(cases, run(xb, labels, padded, w), clean, strict=True):
            np.testing.assert_array_equal(got[0], want[0], err_msg=case.name)  # loss
            np.testing.assert_array_equal(got[2], want[2], err_msg=case.name)  # gradient
            assert np.isfinite(got[2]).all(), case.name
    for bad_label in (-1, C):
        y = labels.copy()
        y[row] = bad_label
        for case, (loss, info, _) in zip(cases, run(x, y, np.ones(B, bool), w), strict=True):
            assert np.isnan(loss).all() and np.isnan(info["mean_pos_distance"]), case.name
        for case, got, want in zip(cases, run(x, y, padded, w), clean, strict=True):
            np.testing.assert_array_equal(got[0], want[0], err_msg=case.name)
            np.testing.assert_array_equal(got[2], want[2], err_msg=case.name)
        for case in cases:
            try:
                case.fn(x, y, w, **case.kw)
            except ValueError as e:
                assert f"[0, {C})" in str(e) and str(bad_label) in str(e), (case.name, e)
            else:
                raise AssertionError(f"{case.name}: label {bad_label} accepted")
            case.fn(x, y, w, valid=padded, **case.kw)  # padded: fine


def check_data_parallel(cases, rng):
    """Loss, info and gradients (local embeddings; replicated class vectors) inside
    shard_map and pmap over 8 devices equal the single-device ones on the global
    batch (with padding). shard_map gives the summed gradient of the vectors itself;
    under pmap each device's contribution is psum-ed here."""
    devices = jax.devices()[:8]
    assert len(devices) == 8, "conftest.py sets 8 simulated CPU devices"
    b = 40
    x = unit(rng, b) * rng.uniform(0.5, 2.0, (b, 1)).astype(np.float32)
    labels = rng.integers(0, C, b).astype(np.int32)
    labels[labels == 2] = 1  # a class without rows
    valid = rng.random(b) > 0.15
    w = rng.normal(size=(C, D)).astype(np.float32)

    def run(e, y, v, w, axis_name=None):
        out = []
        for case in cases:
            def objective(e, w, case=case):
                loss, info = case.fn(e, y, w, valid=v, axis_name=axis_name, **case.kw)
                return jnp.sum(loss), (loss, info)
            (_, (loss, info)), (ge, gw) = jax.value_and_grad(objective, (0, 1),
                                                             has_aux=True)(e, w)
            if axis_name is not None:  # scalars as one entry per device
                loss, info = jax.tree.map(lambda a: a if a.ndim else a[None], (loss, info))
            out.append((loss, info, ge, gw))
        return out

    single = jax.jit(run)(x, labels, valid, w)
    mesh = Mesh(np.array(devices), ("batch",))
    local = functools.partial(run, axis_name="batch")
    spec = [(P("batch"), P("batch"), P("batch"), P())] * len(cases)
    sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("batch"),) * 3 + (P(),),
                                    out_specs=spec))(x, labels, valid, w)

    def pmapped_fn(e, y, v, w):
        return [(loss, info, ge, jax.lax.psum(gw, "batch"))
                for loss, info, ge, gw in local(e, y, v, w)]

    per_device = lambda a: a.reshape(8, -1, *a.shape[1:])  # noqa: E731
    pmapped = jax.pmap(pmapped_fn, axis_name="batch", in_axes=(0, 0, 0, None))(
        per_device(x), per_device(labels), per_device(valid), w)
    for i, case in enumerate(cases):
        loss1, info1, ge1, gw1 = single[i]
        for how, (loss8, info8, ge8, gw8) in (("shard_map", sharded[i]), ("pmap", pmapped[i])):
            where = f"{case.name} ({how})"
            scale = max(1.0, float(np.abs(ge1).max()), float(np.abs(gw1).max()))
            np.testing.assert_allclose(np.asarray(ge8).reshape(ge1.shape), ge1,
                                       atol=2e-6 * scale, err_msg=where)
            gw8 = np.asarray(gw8).reshape(-1, *gw1.shape)[0]
            np.testing.assert_allclose(gw8, gw1, atol=2e-6 * scale, err_msg=where)
            for k, v8, v1 in [("loss", loss8, loss1)] + [(k, info8[k], info1[k]) for k in info1]:
                v8, v1 = np.asarray(v8).reshape(-1), np.asarray(v1).reshape(-1)
                if v1.size == 1:  # a scalar: the same on every device
                    v1 = np.broadcast_to(v1, v8.shape)
                np.testing.assert_allclose(v8, v1, rtol=1e-5, atol=1e-6, err_msg=f"{where}: {k}")


def check_vmap_matches_single(cases, rng):
    """vmap over a leading batch-of-batches axis (class vectors shared) gives each
    batch's own loss."""
    x = np.stack([unit(rng, B) for _ in range(3)])
    labels = rng.integers(0, C, (3, B)).astype(np.int32)
    w = unit(rng, C)
    for case in cases:
        fn = functools.partial(case.fn, **case.kw)
        batched, _ = jax.jit(jax.vmap(fn, in_axes=(0, 0, None)))(x, labels, w)
        for i in range(3):
            np.testing.assert_allclose(batched[i], fn(x[i], labels[i], w)[0], rtol=1e-5,
                                       atol=1e-6, err_msg=case.name)
