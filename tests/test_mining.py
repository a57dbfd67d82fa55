"""The mining kernels and the per-anchor strategies against one-row brute force."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmetric import losses, mining

import oracles

# ------------------------------------------------------------------- sort_permutation


def _key_rows(rng, n):
    """uint32 rows that stress the two 16-bit radix passes (ties, equal halves)."""
    full = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    return np.stack([
        full,
        rng.integers(0, 4, n).astype(np.uint32),                     # many ties
        (rng.integers(0, 3, n) << 16).astype(np.uint32) | 7,         # equal low halves
        (5 << 16) | rng.integers(0, 2**16, n).astype(np.uint32),     # equal high halves
        np.full(n, 0xFFFFFFFF, np.uint32),                           # one value
        np.arange(n, 0, -1).astype(np.uint32) * 65537,               # descending
    ])


@pytest.mark.parametrize("n", [1, 2, 300])
def test_sort_permutation_is_a_stable_argsort(n):
    keys = _key_rows(np.random.default_rng(n), n)
    perm = np.asarray(jax.jit(jax.vmap(mining.sort_permutation))(keys))
    assert perm.dtype == np.int32
    for row, p in zip(keys, perm, strict=True):
        np.testing.assert_array_equal(p, np.argsort(row, kind="stable"))


def test_sort_permutation_at_the_row_limit():
    """65,536 entries: the row index fills all 16 packed bits; one more is refused."""
    n = mining.MAX_ROW_LENGTH
    assert n == 65_536
    keys = np.random.default_rng(0).integers(0, 50_000, n).astype(np.uint32)
    perm = np.asarray(jax.jit(mining.sort_permutation)(keys))
    np.testing.assert_array_equal(perm, np.argsort(keys, kind="stable"))
    too_long = jnp.zeros(n + 1, jnp.uint32)
    with pytest.raises(ValueError, match="at most 65536"):
        mining.sort_permutation(too_long)
    with pytest.raises(ValueError, match="at most 65536"):
        jax.jit(mining.sort_permutation)(too_long)
    d = jnp.zeros(n + 1)
    mask = jnp.zeros(n + 1, bool)
    with pytest.raises(ValueError, match="at most 65536"):
        mining.window_weights(d, mask, mask, shift=0.2, strict=True)


# ------------------------------------------------------------------------ one-row kernels


def _rows(rng, k, n, quantised):
    """k anchor rows of n distances with disjoint pos / neg masks (column 0: the anchor)."""
    d = rng.uniform(0, 3, (k, n))
    if quantised:  # exact float32 ties between d_p + shift and d_n
        d = np.round(d * 4) / 4
    kind = rng.integers(0, 3, (k, n))  # 0: neither, 1: positive, 2: negative
    kind[:, 0] = 0
    kind[0, :] = np.where(np.arange(n) > 0, 1, 0)  # a row without negatives
    kind[1, :] = np.where(np.arange(n) > 0, 2, 0)  # a row without positives
    return d.astype(np.float32), kind == 1, kind == 2


def _brute_window(d, pos, neg, shift, strict):
    inside = (lambda dn, t: dn < t) if strict else (lambda dn, t: dn <= t)
    w = np.zeros(len(d), np.int64)
    for p in np.flatnonzero(pos):
        t = np.float32(d[p]) + np.float32(shift)  # the kernel's float32 threshold
        for n in np.flatnonzero(neg):
            if inside(d[n], t):
                w[p] += 1
                w[n] -= 1
    return w, w[pos].sum()


@pytest.mark.parametrize("quantised", [False, True], ids=["distinct", "ties"])
def test_window_weights_match_brute_force(quantised):
    d, pos, neg = _rows(np.random.default_rng(int(quantised)), 12, 17, quantised)
    cases = [(0.0, False), (0.0, True), (0.25, True), (0.5, False)]

    @jax.jit
    def run(d, pos, neg):
        return [jax.vmap(functools.partial(mining.window_weights, shift=s, strict=st))(d, pos, neg)
                for s, st in cases]

    for (shift, strict), (w, count) in zip(cases, run(d, pos, neg), strict=True):
        assert w.dtype == jnp.int32 and count.dtype == jnp.int32
        for i in range(len(d)):
            ref_w, ref_count = _brute_window(d[i], pos[i], neg[i], shift, strict)
            np.testing.assert_array_equal(w[i], ref_w, err_msg=f"{shift} {strict} row {i}")
            assert int(count[i]) == ref_count


def test_next_negative_index_matches_brute_force():
    d, pos, neg = _rows(np.random.default_rng(3), 12, 17, quantised=True)
    index, found = jax.jit(jax.vmap(mining.next_negative_index))(d, pos, neg)
    for i in range(len(d)):
        for p in np.flatnonzero(pos[i]):
            farther = [n for n in np.flatnonzero(neg[i]) if d[i, n] > d[i, p]]
            assert bool(found[i, p]) == bool(farther)
            if farther:
                assert d[i, index[i, p]] == min(d[i, n] for n in farther)
                assert neg[i, index[i, p]]


# ---------------------------------------------------------------- strategies (registry)


def test_registry():
    assert mining.MODES == tuple(mining.STRATEGIES) == losses.MINING_MODES
    # Every mode needs its case in the Python-loop oracle.
    assert set(mining.STRATEGIES) == set(oracles.MINING)
    with pytest.raises(TypeError):
        mining.STRATEGIES["mine"] = mining.STRATEGIES["all"]


MARGINS = (0.0, 0.5)


@pytest.fixture(scope="module")
def strategy_results():
    """Every strategy and margin on the same rows (distinct and tied): one jit."""
    rng = np.random.default_rng(4)
    rows = [_rows(rng, 10, 13, q) for q in (False, True)]
    d = np.concatenate([r[0] for r in rows])
    pos = np.concatenate([r[1] for r in rows])
    neg = np.concatenate([r[2] for r in rows])

    @jax.jit
    def run(d, pos, neg):
        return {(name, m): jax.vmap(functools.partial(fn, margin=m))(d, pos, neg)
                for name, fn in mining.STRATEGIES.items() for m in MARGINS}

    return run(d, pos, neg), d, pos, neg, 10


@pytest.mark.parametrize("margin", MARGINS)
@pytest.mark.parametrize("mode", mining.MODES)
def test_strategy_matches_oracle(strategy_results, mode, margin):
    """The contract: fixed shapes, loss = w·d + m·active, w = the triplets' ±1 (no ties)."""
    results, d, pos, neg, num_distinct = strategy_results
    out = results[(mode, margin)]
    k, n = d.shape
    chex.assert_shape(out.weights, (k, n))
    chex.assert_shape([out.num_selected, out.num_active], (k,))
    chex.assert_type([out.weights, out.num_selected, out.num_active], jnp.float32)
    for i in range(k):
        triplets = oracles.MINING[mode](d[i][None].astype(np.float64), 0,
                                        list(np.flatnonzero(pos[i])),
                                        list(np.flatnonzero(neg[i])), margin)
        terms = [max(float(d[i, p]) - float(d[i, q]) + margin, 0.0) for p, q in triplets]
        active = [(p, q) for (p, q), t in zip(triplets, terms, strict=True) if t > 0]
        assert float(out.num_selected[i]) == len(triplets), i
        assert float(out.num_active[i]) == len(active), i
        w = np.asarray(out.weights[i])
        assert not w[~(pos[i] | neg[i])].any()
        value = float(np.dot(w.astype(np.float64), d[i])) + margin * float(out.num_active[i])
        np.testing.assert_allclose(value, sum(terms), rtol=1e-5, atol=1e-5, err_msg=str(i))
        if i < num_distinct:
            ref = np.zeros(n)
            for p, q in active:
                ref[p] += 1
                ref[q] -= 1
            np.testing.assert_allclose(w, ref, atol=1e-6, err_msg=str(i))


def test_mine_chunks_rows(monkeypatch):
    """``mine`` over chunks of rows gives what one vmap over all rows gives."""
    d, pos, neg = _rows(np.random.default_rng(5), 9, 11, quantised=True)
    strategy = functools.partial(mining.STRATEGIES["semihard"], margin=0.5)
    mine = lambda *a: mining.mine(mining.STRATEGIES["semihard"], *a, margin=0.5)  # noqa: E731
    whole = jax.jit(mine)(d, pos, neg)
    monkeypatch.setattr(mining, "_CHUNK_ELEMENTS", 2 * 11)  # 2 rows at a time, 1 left over
    chunked = jax.jit(lambda *a: mine(*a))(d, pos, neg)  # a new trace
    chex.assert_trees_all_equal(chunked, whole)
    chex.assert_trees_all_equal(whole, jax.jit(jax.vmap(strategy))(d, pos, neg))


def test_custom_strategy_in_triplet_loss():
    """A mining mode is just a function: one passed to triplet_loss is used as is."""

    def all_active_only(d, pos, neg, *, margin):  # "all", written by a user
        w, count = mining.window_weights(d, pos, neg, shift=margin, strict=True)
        return mining.Mined(w.astype(jnp.float32), count.astype(jnp.float32),
                            count.astype(jnp.float32))

    rng = np.random.default_rng(6)
    x = rng.normal(size=(12, 3)).astype(np.float32)
    labels = rng.integers(0, 3, 12)
    loss = jax.jit(losses.triplet_loss, static_argnames=("mining", "reduction"))
    mine, info = loss(x, labels, mining=all_active_only, reduction="sum")
    ref, ref_info = loss(x, labels, mining="all", reduction="sum")
    np.testing.assert_allclose(mine, ref, rtol=1e-6)
    assert float(info["num_active_triplets"]) == float(ref_info["num_active_triplets"])

    def wrong_shape(d, pos, neg, *, margin):
        return mining.Mined(jnp.zeros(3), jnp.float32(0), jnp.float32(0))

    with pytest.raises(AssertionError, match="mining weights"):
        losses.triplet_loss(x, labels, mining=wrong_shape)
