"""The contract checks every pair-based loss of jaxmetric passes, written once.

A loss is given as a :class:`Case`: the function, its keyword arguments, the Python-loop
oracle of :mod:`oracles_pair_losses` that specifies it, the metric its info's mean
distances are in, and the info entries fixed by the labels and ``valid`` alone (which
stay finite when a valid row holds a NaN). Each test module lists its cases and calls
these checks; one vmapped ``jit`` evaluates every case and reduction on every batch.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import oracles_pair_losses as oracles

REDUCTIONS = ("mean", "mean_nonzero", "sum", "none")
B = 10


@dataclasses.dataclass(frozen=True)
class Case:
    fn: Callable
    kwargs: dict
    oracle: Callable
    metric: str  # of info["mean_pos_distance"]: "cosine" for the similarity losses
    exact: tuple[str, ...] = ("num_pos_pairs", "num_neg_pairs")

    @property
    def id(self) -> str:
        def short(v):
            return "array" if isinstance(v, np.ndarray) else str(v)
        return "-".join([self.fn.__name__.removesuffix("_loss")]
                        + [f"{k}={short(v)}" for k, v in self.kwargs.items()])

    def loss(self, *args, **kwargs):
        return self.fn(*args, **self.kwargs, **kwargs)

    def reference(self, x, labels, **kwargs):
        return self.oracle(x, labels, **self.kwargs, **kwargs)


def unit(rng, b, d=4):
    x = rng.normal(size=(b, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def grid_batches(rng):
    """(x, labels, valid, name): random unit rows; non-unit rows with a zero row and
    padded garbage; repeated rows (exact ties, zero distances); label layouts without
    positives, without negatives, with one positive pair."""
    out = [(unit(rng, B), rng.integers(0, 3, B), np.ones(B, bool), "unit")]
    x = (rng.normal(size=(B, 4)) * rng.uniform(0.3, 2.0, (B, 1))).astype(np.float32)
    x[4] = 0.0
    valid = np.ones(B, bool)
    valid[[1, 6, 9]] = False
    x[[1, 6, 9]] = rng.normal(size=(3, 4)) * 50
    out.append((x, rng.integers(0, 3, B), valid, "padded non-unit"))
    base = np.concatenate([np.eye(4), -np.eye(4)[:1]]).astype(np.float32)
    out.append((base[rng.integers(0, 5, B)], rng.integers(0, 3, B), np.ones(B, bool),
                "duplicates"))
    layouts = {
        "one-class": np.zeros(B, int),
        "all-distinct": np.arange(B),
        "one-pair": np.array([0, 0] + list(range(1, B - 1))),
        "two-classes": np.array([5] * 6 + [9] * 4),
    }
    for name, labels in layouts.items():
        out.append((unit(rng, B), labels, np.ones(B, bool), name))
    return out


NONFINITE_ROW = 2
NONFINITE_LABELS = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3, 3])


def nonfinite_batches(x):
    """The clean batch, then NaN / +inf / -inf in one entry or all of NONFINITE_ROW."""
    out = [(x, "clean")]
    for bad in (np.nan, np.inf, -np.inf):
        for where, idx in (("entry", (NONFINITE_ROW, 1)), ("row", NONFINITE_ROW)):
            y = x.copy()
            y[idx] = bad
            out.append((y, f"{bad} in {where}"))
    return out


def run_grid(cases, seed=11, reductions=REDUCTIONS):
    """Every case and reduction on the grid batches, then the non-finite batches (valid,
    then with the bad row padded); one jit. ``results[case][reduction] = (loss, info)``
    stacked over batches."""
    rng = np.random.default_rng(seed)
    grid = grid_batches(rng)
    x = unit(rng, B)
    bad = nonfinite_batches(x)
    xs = [g[0] for g in grid] + [c for c, _ in bad] * 2
    ys = [g[1] for g in grid] + [NONFINITE_LABELS] * (2 * len(bad))
    vs = np.stack([g[2] for g in grid] + [np.ones(B, bool)] * (2 * len(bad)))
    vs[len(grid) + len(bad):, NONFINITE_ROW] = False

    def everything(e, y, v):
        return [{r: c.loss(e, y, valid=v, reduction=r) for r in reductions} for c in cases]

    results = jax.jit(jax.vmap(everything))(
        np.stack(xs).astype(np.float32), np.stack(ys).astype(np.int32), vs)
    return {"results": results, "grid": grid, "nonfinite": [n for _, n in bad], "x": x}


def pair_distance_means(x, labels, valid, metric):
    """Mean distance of the positive and of the negative pairs (float64 loops)."""
    rows = oracles.pair_rows(x, labels, valid, None, metric)
    pos = [v[p] for _, v, ps, _ in rows for p in ps]
    neg = [v[n] for _, v, _, ns in rows for n in ns]
    return (np.mean(pos) if pos else 0.0), (np.mean(neg) if neg else 0.0)


def check_matches_oracle(grid, index, case, reduction, *, exact_active=True):
    """Loss, per-anchor counts ("none") and the mean distances against the oracle;
    ``exact_active=False``: the number of active terms per anchor is not compared (for
    terms that are 0 in exact arithmetic, like 1 - AP of a perfect ranking, but a
    round-off away from it in float32 or float64)."""
    loss, info = grid["results"][index][reduction]
    for i, (x, labels, valid, name) in enumerate(grid["grid"]):
        ref, n_terms, n_active = case.reference(x, labels, valid=valid, reduction=reduction)
        np.testing.assert_allclose(loss[i], ref, rtol=3e-4, atol=3e-5, err_msg=name)
        if reduction == "none":
            np.testing.assert_array_equal(info["anchor_num_selected"][i], n_terms, name)
            if exact_active:
                np.testing.assert_array_equal(info["anchor_num_active"][i], n_active, name)
        pos_mean, neg_mean = pair_distance_means(x, labels, valid, case.metric)
        np.testing.assert_allclose(info["mean_pos_distance"][i], pos_mean, rtol=1e-4,
                                   atol=1e-5, err_msg=name)
        np.testing.assert_allclose(info["mean_neg_distance"][i], neg_mean, rtol=1e-4,
                                   atol=1e-5, err_msg=name)
        for key in ("mean_pos_distance", "mean_neg_distance", "active_fraction"):
            assert info[key].dtype == jnp.float32, key
        assert 0.0 <= float(info["active_fraction"][i]) <= 1.0, name


def check_nonfinite(grid, index, case, reductions=REDUCTIONS):
    """NaN / inf in a valid row: NaN loss and NaN info but the exact counts; the same
    garbage in a padded row: the loss of the batch without that row."""
    names = grid["nonfinite"]
    n = len(names)
    start = len(grid["grid"])
    keep = np.arange(B) != NONFINITE_ROW
    for r in reductions:
        loss, info = jax.tree.map(lambda v: np.asarray(v[start:]), grid["results"][index][r])
        assert np.isfinite(loss[0]).all(), r
        for i in range(1, n):
            assert np.isnan(loss[i]).all(), (r, names[i], loss[i])
        np.testing.assert_array_equal(loss[n:], np.broadcast_to(loss[n], loss[n:].shape), r)
        ref = case.reference(grid["x"][keep], NONFINITE_LABELS[keep], reduction=r)[0]
        if r == "none":
            ref = np.insert(ref, NONFINITE_ROW, 0.0)
        np.testing.assert_allclose(loss[n], ref, rtol=3e-4, atol=3e-5, err_msg=r)
        for k, v in info.items():
            assert np.isfinite(v[0]).all() and np.isfinite(v[n:]).all(), (r, k)
            bad = v[1:n]
            assert (np.isfinite(bad) if k in case.exact else np.isnan(bad)).all(), (r, k, bad)


def check_finite_gradients(cases):
    """Finite gradients where embeddings coincide or are zero, with one class, and
    with no positive pair at all (one jit)."""
    rng = np.random.default_rng(0)
    two = unit(rng, 6)
    two[1] = two[0]
    batches = [(np.zeros((6, 4), np.float32), [0, 0, 1, 1, 2, 2]),
               (np.full((6, 4), 0.5, np.float32), [0, 0, 1, 1, 2, 2]),
               (two, [0, 0, 1, 1, 2, 2]),
               (unit(rng, 6), [0] * 6),
               (unit(rng, 6), list(range(6)))]

    @jax.jit
    def grads(x, y):
        return [jax.grad(lambda e, c=c: jnp.sum(c.loss(e, y)[0]))(x) for c in cases]

    for x, y in batches:
        for g, c in zip(grads(x, jnp.array(y)), cases, strict=True):
            assert np.isfinite(np.asarray(g)).all(), (c.id, y)


def numeric_grad(f, x, eps=1e-5):
    g = np.zeros_like(x, dtype=np.float64)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        g[idx] = (f(xp) - f(xm)) / (2 * eps)
    return g


def check_grad_matches_oracle(case, *, seed=5, reference=None, atol=2e-3, rtol=2e-3):
    """jax.grad of the loss against central differences of the float64 oracle
    (``reference(x)``, default the case's oracle) on an 8-row batch."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(8, 3)) * rng.uniform(0.5, 1.5, (8, 1))
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    if reference is None:
        reference = lambda e: case.reference(e, labels)[0]  # noqa: E731
    g = jax.jit(jax.grad(lambda e: case.loss(e, labels)[0]))(x.astype(np.float32))
    np.testing.assert_allclose(np.asarray(g), numeric_grad(reference, x), atol=atol, rtol=rtol,
                               err_msg=case.id)


def check_vmap(case):
    rng = np.random.default_rng(8)
    x = np.stack([unit(rng, 10) for _ in range(3)])
    labels = rng.integers(0, 3, (3, 10))
    batched, _ = jax.jit(jax.vmap(case.loss))(x, labels)
    for i in range(3):
        np.testing.assert_allclose(batched[i], case.loss(x[i], labels[i])[0], rtol=1e-5,
                                   atol=1e-6, err_msg=case.id)


def check_bfloat16(case):
    rng = np.random.default_rng(7)
    x = unit(rng, 24, 16)
    labels = rng.integers(0, 4, 24)
    xb = jnp.asarray(x, jnp.bfloat16)
    (loss, info), g = jax.jit(jax.value_and_grad(lambda e: case.loss(e, labels),
                                                 has_aux=True))(xb)
    assert loss.dtype == jnp.float32 and info["mean_pos_distance"].dtype == jnp.float32
    ref = case.reference(np.asarray(xb.astype(jnp.float32)), labels)[0]
    np.testing.assert_allclose(float(loss), ref, rtol=1e-3, atol=1e-4, err_msg=case.id)
    assert g.dtype == jnp.bfloat16 and np.isfinite(np.asarray(g, np.float32)).all()


def check_reference_set(case):
    """Anchors from the batch, positives / negatives from a reference with empty
    (garbage) slots, against the oracle; a NaN in a real slot gives NaN."""
    rng = np.random.default_rng(3)
    x, y = unit(rng, 6), rng.integers(0, 3, 6)
    r, ry = unit(rng, 9), rng.integers(0, 3, 9)
    r[0], ry[0] = x[0], y[0]  # an identical row in the reference: an ordinary positive
    ref_valid = np.arange(9) < 7
    r[~ref_valid] = np.nan

    @jax.jit
    def run(r, ref_valid):
        return jax.value_and_grad(
            lambda e: case.loss(x, y, ref_embeddings=e, ref_labels=ry, ref_valid=ref_valid)[0]
        )(r)

    loss, g = run(r, ref_valid)
    ref = case.reference(x, y, ref=(r, ry, ref_valid))[0]
    np.testing.assert_allclose(loss, ref, rtol=3e-4, atol=3e-5, err_msg=case.id)
    assert np.isfinite(np.asarray(g)).all(), case.id
    r[3] = np.inf
    assert np.isnan(run(r, ref_valid)[0]), case.id


def run_data_parallel(cases, grad_kwargs=()):
    """Every case on one device, inside shard_map and inside pmap over 8 devices (one
    compilation each); objective: the loss ("none": its sum). ``grad_kwargs``: names
    of array-valued keyword arguments (replicated parameters) to differentiate too."""
    devices = jax.devices()[:8]
    rng = np.random.default_rng(10)
    b = 40
    x = unit(rng, b)
    labels = rng.integers(0, 4, b).astype(np.int32)
    valid = rng.random(b) > 0.15

    def run(e, y, v, axis_name=None):
        out = []
        for c in cases:
            params = {k: jnp.asarray(c.kwargs[k]) for k in grad_kwargs if k in c.kwargs}

            def objective(e, params, c=c):
                loss, info = c.fn(e, y, valid=v, axis_name=axis_name, **(c.kwargs | params))
                return jnp.sum(loss), (loss, info)

            (_, (loss, info)), (g, gp) = jax.value_and_grad(
                objective, argnums=(0, 1), has_aux=True)(e, params)
            if axis_name is not None:
                loss, info, gp = jax.tree.map(lambda a: a[None], (loss, info, gp))
                loss = loss.reshape(-1) if loss.ndim > 1 else loss
            out.append((loss, info, g, gp))
        return out

    single = jax.jit(run)(x, labels, valid)
    local = functools.partial(run, axis_name="batch")
    mesh = Mesh(np.array(devices), ("batch",))
    sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("batch"), out_specs=P("batch")))
    pmapped = jax.pmap(local, axis_name="batch")
    per_device = lambda a: a.reshape(8, -1, *a.shape[1:])  # noqa: E731
    return (single, sharded(x, labels, valid),
            pmapped(per_device(x), per_device(labels), per_device(valid)))


def check_data_parallel(results, index):
    """Loss, info and per-shard gradients inside shard_map and pmap equal the
    single-device ones. A replicated parameter's gradient: inside shard_map (varying
    axes checked) JAX sums it over the devices itself, so every device holds the
    single-device gradient; under pmap each holds its contribution, which sum to it
    (what jaxmetric.train.step relies on)."""
    loss1, info1, grad1, gp1 = results[0][index]
    for (loss8, info8, grad8, gp8), summed in zip((r[index] for r in results[1:]),
                                                  (False, True), strict=True):
        scale = max(1.0, float(np.abs(grad1).max()))
        np.testing.assert_allclose(np.asarray(grad8).reshape(grad1.shape), grad1,
                                   atol=1e-6 * scale)
        for k in gp1:
            per_device = np.asarray(gp8[k]).reshape(8, *np.shape(gp1[k]))
            got = per_device.sum(0)[None] if summed else per_device
            np.testing.assert_allclose(got, np.broadcast_to(gp1[k], got.shape), rtol=1e-5,
                                       atol=1e-6, err_msg=k)
        pairs = [("loss", loss8, loss1)] + [(k, info8[k], info1[k]) for k in info1]
        for name, v8, v1 in pairs:
            v8, v1 = np.asarray(v8).reshape(-1), np.asarray(v1).reshape(-1)
            if v1.size == 1:
                v1 = np.broadcast_to(v1, v8.shape)
            np.testing.assert_allclose(v8, v1, rtol=1e-5, atol=1e-6, err_msg=name)


def check_quadratic_memory(case, b=4096):
    """Loss + gradient at B = 4096, compiled (not run): XLA's temporary buffers hold a
    few (B, B) matrices, nowhere near a (B, B, B) tensor (256 GiB)."""
    x = jax.ShapeDtypeStruct((b, 32), jnp.float32)
    y = jax.ShapeDtypeStruct((b,), jnp.int32)
    fn = jax.value_and_grad(lambda e, labels: case.loss(e, labels)[0])
    analysis = jax.jit(fn).lower(x, y).compile().memory_analysis()
    if analysis is None:
        return None
    assert analysis.temp_size_in_bytes < 40 * b * b * 4, (case.id, analysis.temp_size_in_bytes)
    return analysis.temp_size_in_bytes
