"""Tests of jaxmetric.evaluate against brute-force NumPy references and hand-made cases."""

import collections
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxmetric import evaluate as ev
from jaxmetric.evaluate import metrics as ev_metrics

KS = (1, 2, 4, 8)


# --------------------------------------------------------------------------------------
# Brute-force references (explicit loops over queries, full sort of the distances)
# --------------------------------------------------------------------------------------


def _majority(labels):
    """Majority label; ties go to the label appearing first (nearest)."""
    counts = collections.Counter(labels)
    best = max(counts.values())
    return next(lab for lab in labels if counts[lab] == best)


def _scores_from_match(match, nbr_labels, y, r, ks, knn_k):
    out = {"precision_at_1": float(match[0])}
    hits, ap = 0, 0.0
    for i in range(r):
        if match[i]:
            hits += 1
            ap += hits / (i + 1)
    out["r_precision"] = hits / r
    out["map_at_r"] = ap / r
    for k in ks:
        out[f"recall_at_{k}"] = float(any(match[:k]))
    out["knn_accuracy"] = float(_majority(list(nbr_labels[:knn_k])) == y)
    return out


def brute_force_metrics(queries, qlabels, refs=None, rlabels=None, *, ks=KS, knn_k=10):
    """Reference implementation: one query at a time, float64, full argsort."""
    loo = refs is None
    if loo:
        refs, rlabels = queries, qlabels
    q64, r64 = np.asarray(queries, np.float64), np.asarray(refs, np.float64)
    per_query = []
    for i in range(len(q64)):
        d = np.sum((r64 - q64[i]) ** 2, axis=1)
        order = np.argsort(d, kind="stable")
        if loo:
            order = order[order != i]
        nbr = np.asarray(rlabels)[order]
        r = int(np.sum(nbr == qlabels[i]))
        if r == 0:
            continue
        per_query.append(_scores_from_match(nbr == qlabels[i], nbr, qlabels[i], r, ks, knn_k))
    out = {key: float(np.mean([p[key] for p in per_query])) for key in per_query[0]}
    out["n_queries"] = len(per_query)
    out["n_excluded"] = len(q64) - len(per_query)
    return out


def _min_label_gap(queries, qlabels, refs, rlabels, loo):
    """Smallest distance gap between adjacent neighbours of different labels.

    Metrics only depend on the order of differently-labelled neighbours; a tiny gap
    there could be flipped by FAISS's float32 arithmetic, so the brute-force comparisons
    require this to be comfortably above float32 rounding.
    """
    gaps = []
    for i in range(len(queries)):
        d = np.sum((np.asarray(refs, np.float64) - np.asarray(queries[i], np.float64)) ** 2, 1)
        order = np.argsort(d)
        if loo:
            order = order[order != i]
        ds, ls = d[order], np.asarray(rlabels)[order]
        diff = ls[1:] != ls[:-1]
        if diff.any():
            gaps.append(np.min((ds[1:] - ds[:-1])[diff]))
    return min(gaps)


def _random_set(rng, n, d, n_classes):
    return rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, n_classes, n)


def _tie_free_sets(seed, nq, nr, d, c, *, loo):
    """Random queries/references whose label-relevant distance gaps exceed 1e-4.

    Tries seeds ``seed, seed + 1000, ...`` (deterministic) until the gap condition of
    :func:`_min_label_gap` holds, so the brute-force comparison cannot hinge on float32
    rounding inside FAISS.
    """
    for attempt in range(50):
        rng = np.random.default_rng(seed + 1000 * attempt)
        q, ql = _random_set(rng, nq, d, c)
        r, rl = (q, ql) if loo else _random_set(rng, nr, d, c)
        if _min_label_gap(q, ql, r, rl, loo) > 1e-4:
            return q, ql, r, rl
    raise AssertionError("could not draw tie-free test data")  # pragma: no cover


# --------------------------------------------------------------------------------------
# per_query_metrics (pure NumPy part) vs loops
# --------------------------------------------------------------------------------------


@st.composite
def _neighbour_tables(draw):
    q = draw(st.integers(1, 6))
    k = draw(st.integers(1, 12))
    n_labels = draw(st.integers(1, 4))
    rows = [draw(st.lists(st.integers(-1, n_labels - 1), min_size=k, max_size=k)) for _ in range(q)]
    qlabels = [draw(st.integers(0, n_labels - 1)) for _ in range(q)]
    r = [draw(st.integers(1, k)) for _ in range(q)]
    knn_k = draw(st.integers(1, k + 2))
    return np.array(rows), np.array(qlabels), np.array(r), knn_k


@settings(max_examples=60, deadline=None)
@given(_neighbour_tables())
def test_per_query_metrics_match_loops(table):
    nbr, ql, r, knn_k = table
    got = ev.per_query_metrics(nbr, ql, r, ks=(1, 3, 20), knn_k=knn_k)
    for i in range(len(ql)):
        valid = nbr[i] != -1
        match = (nbr[i] == ql[i]) & valid
        expect = _scores_from_match(match, nbr[i], ql[i], r[i], (1, 3, 20), knn_k)
        votes = [lab for lab in nbr[i][:knn_k] if lab != -1]
        expect["knn_accuracy"] = float(bool(votes) and _majority(votes) == ql[i])
        for key, value in expect.items():
            assert got[key][i] == pytest.approx(value, abs=1e-12), (key, i)


def test_per_query_metrics_hand_example():
    # Ranked matches 1 0 1 0 with R = 3: AP@R = (1/1 + 2/3) / 3, R-precision = 2/3.
    nbr = np.array([[5, 7, 5, 7]])
    got = ev.per_query_metrics(nbr, np.array([5]), np.array([3]), ks=(1, 2, 4), knn_k=4)
    assert got["precision_at_1"][0] == 1.0
    assert got["r_precision"][0] == pytest.approx(2 / 3)
    assert got["map_at_r"][0] == pytest.approx((1 + 2 / 3) / 3)
    assert got["recall_at_2"][0] == 1.0
    # Votes 5,7,5,7: a 2-2 tie, broken in favour of 5, which ranks first.
    assert got["knn_accuracy"][0] == 1.0


def test_knn_tie_breaking_prefers_nearest_label():
    nbr = np.array([[2, 1, 1, 2], [2, 1, 1, 2], [-1, -1, 3, 4], [-1, -1, -1, -1]])
    ql = np.array([2, 1, 3, 3])
    got = ev.per_query_metrics(nbr, ql, np.array([1, 1, 1, 1]), ks=(1,), knn_k=4)
    # Tie 2 vs 1 -> 2 (rank 1); tie 3 vs 4 -> 3; missing neighbours never win.
    np.testing.assert_array_equal(got["knn_accuracy"], [1.0, 0.0, 1.0, 0.0])
    # Missing neighbours are never matches.
    np.testing.assert_array_equal(got["precision_at_1"], [1.0, 0.0, 0.0, 0.0])


def test_per_query_metrics_needs_top_r_neighbours():
    with pytest.raises(ValueError, match="max\\(R\\) = 3"):
        ev.per_query_metrics(np.zeros((1, 2), int), np.zeros(1, int), np.array([3]))


# --------------------------------------------------------------------------------------
# FAISS search
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed,q,n,d", [(0, 20, 50, 4), (1, 35, 80, 8), (2, 7, 120, 3)])
def test_flat_search_equals_brute_force(seed, q, n, d):
    rng = np.random.default_rng(seed)
    queries = rng.normal(size=(q, d)).astype(np.float32)
    refs = rng.normal(size=(n, d)).astype(np.float32)
    k = 6
    dist, ind = ev.knn_search(queries, refs, k)
    full = np.sum((refs[None].astype(np.float64) - queries[:, None]) ** 2, axis=2)
    order = np.argsort(full, axis=1)[:, :k]
    np.testing.assert_array_equal(ind, order)
    np.testing.assert_allclose(dist, np.take_along_axis(full, order, 1), rtol=1e-4, atol=1e-4)


def test_leave_one_out_search_excludes_self_not_distance():
    # Ten identical points: every neighbour is at distance 0, so "drop the first
    # column" or "drop zero distances" would both be wrong. With k=3 and 10 copies, FAISS
    # may not even return the query among its k+1 = 4 hits.
    rng = np.random.default_rng(0)
    x = np.concatenate([np.ones((10, 4)), rng.normal(size=(15, 4)) + 5]).astype(np.float32)
    dist, ind = ev.knn_search(x, x, 3, exclude_self=True)
    assert ind.shape == (25, 3)
    assert not np.any(ind == np.arange(25)[:, None])
    np.testing.assert_array_equal(dist[:10], 0.0)
    assert np.all(ind[:10] < 10)
    assert all(len(set(row)) == 3 for row in ind.tolist())


def test_search_exclude_ids_shape_and_k_errors():
    idx = ev.build_index(np.eye(4, dtype=np.float32))
    with pytest.raises(ValueError, match="exclude_ids must have shape"):
        ev.search(idx, np.eye(4, dtype=np.float32), 2, exclude_ids=np.arange(3))
    with pytest.raises(ValueError, match="k=4 is too large"):
        ev.search(idx, np.eye(4, dtype=np.float32), 4, exclude_ids=np.arange(4))
    with pytest.raises(ValueError, match="k=5 is too large"):
        ev.search(idx, np.eye(4, dtype=np.float32), 5)
    with pytest.raises(ValueError, match="dimension 3 but the index has 4"):
        ev.search(idx, np.ones((2, 3), np.float32), 1)


# --------------------------------------------------------------------------------------
# retrieval_metrics vs brute force
# --------------------------------------------------------------------------------------

CASES = [  # (seed, n_queries, n_refs, dim, n_classes)
    (0, 30, 60, 4, 3),
    (1, 40, 90, 6, 5),
    (2, 25, 40, 3, 2),
    (3, 50, 50, 8, 10),
]


@pytest.mark.parametrize("seed,nq,nr,d,c", CASES)
def test_test_vs_train_matches_brute_force(seed, nq, nr, d, c):
    q, ql, r, rl = _tie_free_sets(seed, nq, nr, d, c, loo=False)
    got = ev.retrieval_metrics(q, ql, r, rl, ks=KS, knn_k=5)
    expect = brute_force_metrics(q, ql, r, rl, ks=KS, knn_k=5)
    assert got == pytest.approx(expect, abs=1e-9)


@pytest.mark.parametrize("seed,nq,nr,d,c", CASES)
def test_leave_one_out_matches_brute_force(seed, nq, nr, d, c):
    q, ql, _, _ = _tie_free_sets(100 + seed, nq, nq, d, c, loo=True)
    got = ev.retrieval_metrics(q, ql, ks=KS, knn_k=5)
    expect = brute_force_metrics(q, ql, ks=KS, knn_k=5)
    assert got == pytest.approx(expect, abs=1e-9)


def test_chunking_does_not_change_results():
    rng = np.random.default_rng(7)
    q, ql = _random_set(rng, 60, 5, 3)
    r, rl = _random_set(rng, 150, 5, 3)
    whole = ev.retrieval_metrics(q, ql, r, rl)
    for entries in (1, 7, 100, 3000):
        assert ev.retrieval_metrics(q, ql, r, rl, chunk_entries=entries) == pytest.approx(whole)
    loo = ev.retrieval_metrics(q, ql)
    assert ev.retrieval_metrics(q, ql, chunk_entries=5) == pytest.approx(loo)


def test_r_larger_than_k_hand_case():
    # 1-D: query at 0 (label A); references A@1, B@2, A@3, B@4, A@5 -> matches 1 0 1 0 1.
    # R = 3 exceeds every k in ks and knn_k, so the search must fetch the top R.
    q = np.array([[0.0]], np.float32)
    r = np.array([[1.0], [2.0], [3.0], [4.0], [5.0]], np.float32)
    rl = np.array(["A", "B", "A", "B", "A"])
    got = ev.retrieval_metrics(q, np.array(["A"]), r, rl, ks=(1, 2), knn_k=1)
    assert got["r_precision"] == pytest.approx(2 / 3)
    assert got["map_at_r"] == pytest.approx((1 + 2 / 3) / 3)
    assert got["precision_at_1"] == 1.0
    assert got["knn_accuracy"] == 1.0


def test_perfect_clusters_with_large_classes():
    rng = np.random.default_rng(3)
    centres = np.eye(3, 8) * 100
    labels = np.repeat(np.arange(3), 40)  # R = 39 in leave-one-out, far above k
    x = (centres[labels] + rng.normal(size=(120, 8))).astype(np.float32)
    got = ev.retrieval_metrics(x, labels, ks=KS, knn_k=10)
    for key in ("precision_at_1", "r_precision", "map_at_r", "recall_at_8", "knn_accuracy"):
        assert got[key] == 1.0, key


def test_ties_duplicates_leave_one_out():
    # Each class is 3 exact duplicates of one point: leave-one-out must still find the 2
    # other copies (distance 0, same label) whatever the tie order, so everything is 1.
    pts = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], np.float32)
    x = np.repeat(pts, 3, axis=0)
    y = np.repeat(np.arange(4), 3)
    got = ev.retrieval_metrics(x, y, ks=(1, 2), knn_k=2)
    assert got["precision_at_1"] == 1.0
    assert got["map_at_r"] == 1.0
    assert got["r_precision"] == 1.0
    assert got["knn_accuracy"] == 1.0
    assert got["n_queries"] == 12


def test_ties_between_labels_are_order_independent_bounds():
    # The query sits exactly between one A and one B at equal distance. Whichever comes
    # first, R-precision (R = 1) is 0 or 1, recall@2 is 1, and MAP@R equals R-precision.
    q = np.zeros((1, 1), np.float32)
    r = np.array([[-1.0], [1.0]], np.float32)
    got = ev.retrieval_metrics(q, np.array([0]), r, np.array([0, 1]), ks=(1, 2), knn_k=2)
    assert got["recall_at_2"] == 1.0
    assert got["r_precision"] in (0.0, 1.0)
    assert got["map_at_r"] == got["r_precision"] == got["precision_at_1"]


def test_lone_class_is_excluded():
    x, y, _, _ = _tie_free_sets(5, 40, 40, 4, 3, loo=True)
    rng = np.random.default_rng(5)
    y[7] = 99  # only member of its class: R = 0 in leave-one-out
    assert _min_label_gap(x, y, x, y, loo=True) > 1e-4
    got = ev.retrieval_metrics(x, y)
    assert got["n_excluded"] == 1 and got["n_queries"] == 39
    expect = brute_force_metrics(x, y)
    assert got == pytest.approx(expect, abs=1e-9)

    # Test-vs-train: a query class absent from the references is excluded too.
    r, rl = _random_set(rng, 50, 4, 3)
    ql = np.where(np.arange(40) < 5, 42, y % 3)
    got = ev.retrieval_metrics(x, ql, r, rl)
    assert got["n_excluded"] == 5
    keep = np.arange(40) >= 5
    assert got == pytest.approx(
        {**ev.retrieval_metrics(x[keep], ql[keep], r, rl), "n_excluded": 5}
    )


def test_all_queries_lone_gives_nan():
    x = np.eye(3, dtype=np.float32)
    got = ev.retrieval_metrics(x, np.array([0, 1, 2]))
    assert got["n_queries"] == 0 and got["n_excluded"] == 3
    assert np.isnan(got["map_at_r"])


def test_k_beyond_reference_count_is_capped():
    x = np.array([[0.0], [1.0], [5.0]], np.float32)
    got = ev.retrieval_metrics(x, np.array([0, 1, 0]), ks=(1, 8), knn_k=10)
    # query 0: neighbours 1 (B), 5 (A) -> P@1 0, recall@8 (= all 2) 1; query 2 likewise.
    assert got["precision_at_1"] == 0.0
    assert got["recall_at_8"] == 1.0
    assert got["n_queries"] == 2


# --------------------------------------------------------------------------------------
# IVF-PQ
# --------------------------------------------------------------------------------------


def _clustered(rng, n, d=16, c=8, noise=0.05):
    centres = rng.normal(size=(c, d))
    y = rng.integers(0, c, n)
    return ev.l2_normalize(centres[y] + noise * rng.normal(size=(n, d))), y


def test_ivfpq_recall_high_on_clustered_data():
    rng = np.random.default_rng(0)
    refs, _ = _clustered(rng, 1500)
    queries, _ = _clustered(np.random.default_rng(0), 200)  # same centres, fresh noise
    idx = ev.build_index(refs, index="ivfpq", nlist=8, m=16, nbits=6, nprobe=4)
    assert ev.index_params(idx) == {"type": "ivfpq", "nlist": 8, "m": 16, "nbits": 6, "nprobe": 4}
    rec = ev.recall_vs_exact(idx, refs, queries, k=5)
    assert 0.0 <= rec <= 1.0
    assert rec > 0.8  # measured 0.89
    # Flat index against itself is exact.
    assert ev.recall_vs_exact(ev.build_index(refs), refs, queries, k=5) == 1.0


def test_neighbour_recall_hand_case():
    assert ev.neighbour_recall([[1, 2, 3], [7, -1, -1]], [[1, 2, 4], [7, 8, 9]]) == pytest.approx(
        (2 / 3 + 1 / 3) / 2
    )


def test_evaluate_embeddings_ivfpq_reports_recall_and_params():
    rng = np.random.default_rng(1)
    tr, trl = _clustered(rng, 1200)
    te, tel = _clustered(np.random.default_rng(1), 300)
    res = ev.evaluate_embeddings(tr, trl, te, tel, index="ivfpq", nlist=8, m=8, nbits=6,
                                 nprobe=8, clustering=False, recall_max_queries=100)
    for proto in ("test_vs_train", "test_vs_test"):
        assert 0.0 <= res[proto]["recall_vs_exact"] <= 1.0
        assert res[proto]["precision_at_1"] > 0.95  # easy data: approximate still fine
    assert res["index"]["type"] == "ivfpq"
    assert res["index"]["test_vs_train"] == {"nlist": 8, "m": 8, "nbits": 6, "nprobe": 8}


def test_ivfpq_bad_options():
    x = np.random.default_rng(0).normal(size=(100, 12)).astype(np.float32)
    with pytest.raises(ValueError, match="at least max\\(nlist, 2\\*\\*nbits\\) = 256"):
        ev.build_index(x, index="ivfpq", nlist=4)
    with pytest.raises(ValueError, match="must divide the dimension 12"):
        ev.build_index(x, index="ivfpq", nlist=4, m=5, nbits=4)
    with pytest.raises(ValueError, match="nprobe \\(8\\) cannot exceed nlist \\(4\\)"):
        ev.build_index(x, index="ivfpq", nlist=4, nbits=4, nprobe=8)
    with pytest.raises(ValueError, match="unknown index type 'hnsw'"):
        ev.build_index(x, index="hnsw")


# --------------------------------------------------------------------------------------
# Clustering
# --------------------------------------------------------------------------------------


def test_clustering_perfect_and_random():
    rng = np.random.default_rng(2)
    y = np.repeat(np.arange(4), 30)
    x = (np.eye(4, 6)[y] * 50 + rng.normal(size=(120, 6))).astype(np.float32)
    res = ev.clustering_metrics(x, y)
    assert res["n_clusters"] == 4
    assert res["nmi"] == pytest.approx(1.0) and res["ami"] == pytest.approx(1.0)
    # Same points, shuffled labels: AMI near 0 (chance-corrected), NMI small.
    shuffled = rng.permutation(y)
    res = ev.clustering_metrics(x, shuffled)
    assert abs(res["ami"]) < 0.1 and res["nmi"] < 0.2
    # Deterministic with a fixed seed.
    assert ev.clustering_metrics(x, shuffled) == res


# --------------------------------------------------------------------------------------
# evaluate_embeddings, embed, report
# --------------------------------------------------------------------------------------


def test_evaluate_embeddings_structure_and_consistency():
    rng = np.random.default_rng(4)
    tr, trl = _random_set(rng, 80, 5, 4)
    te, tel = _random_set(rng, 30, 5, 4)
    res = ev.evaluate_embeddings(tr, trl, te, tel, knn_k=3)
    assert set(res) == {"test_vs_train", "test_vs_test", "clustering", "index"}
    assert res["test_vs_train"] == ev.retrieval_metrics(te, tel, tr, trl, knn_k=3)
    assert res["test_vs_test"] == ev.retrieval_metrics(te, tel, knn_k=3)
    assert set(res["clustering"]) == {"nmi", "ami", "n_clusters"}
    expected_keys = {"precision_at_1", "r_precision", "map_at_r", "knn_accuracy",
                     "n_queries", "n_excluded"} | {f"recall_at_{k}" for k in KS}
    assert set(res["test_vs_train"]) == expected_keys
    json.dumps(res)  # plain Python numbers only


@pytest.mark.parametrize(
    "call,err,match",
    [
        (lambda a, b: ev.evaluate_embeddings(a, np.zeros(10), a, np.zeros(20)),
         ValueError, "train_labels has 10 entries but train_emb has 20"),
        (lambda a, b: ev.evaluate_embeddings(a[0], np.zeros(20), a, np.zeros(20)),
         ValueError, "train_emb must be a 2-D array"),
        (lambda a, b: ev.evaluate_embeddings(a, np.zeros(20), b, np.zeros(20)),
         ValueError, "test_emb has dimension 3 but train_emb has dimension 4"),
        (lambda a, b: ev.evaluate_embeddings(a, np.zeros(20), a, np.zeros((20, 1))),
         ValueError, "test_labels must be a 1-D array"),
        (lambda a, b: ev.evaluate_embeddings(a, np.zeros(20), a, np.zeros(20), index="lsh"),
         ValueError, "unknown index type 'lsh'"),
        (lambda a, b: ev.retrieval_metrics(a, np.zeros(20), ks=(0,)),
         ValueError, "every k in ks must be a positive integer"),
        (lambda a, b: ev.retrieval_metrics(a, np.zeros(20), knn_k=0),
         ValueError, "knn_k must be a positive integer"),
        (lambda a, b: ev.retrieval_metrics(a, np.zeros(20), reference_labels=np.zeros(20)),
         ValueError, "reference_labels given without references"),
        (lambda a, b: ev.retrieval_metrics(np.full((20, 4), np.nan), np.zeros(20)),
         ValueError, "queries contains NaN"),
        (lambda a, b: ev.knn_search(a, a[:5], 2, exclude_self=True),
         ValueError, "exclude_self=True needs queries and references to be the same set"),
    ],
)
def test_bad_inputs(call, err, match):
    rng = np.random.default_rng(0)
    with pytest.raises(err, match=match):
        call(rng.normal(size=(20, 4)), rng.normal(size=(20, 3)))


def test_embed_pads_compiles_once_and_normalises():
    import jax
    import jax.numpy as jnp

    traces = []

    @jax.jit
    def embed_fn(batch):
        traces.append(batch.shape)
        flat = batch.reshape(batch.shape[0], -1).astype(jnp.float32)
        return flat[:, :3] * 2.0 + 1.0

    images = np.random.default_rng(0).integers(0, 255, (23, 2, 2, 1), dtype=np.uint8)
    out = ev.embed(embed_fn, images, batch_size=8, progress=False)
    assert traces == [(8, 2, 2, 1)]  # 3 calls (8, 8, 7+1 padding), one trace
    assert out.dtype == np.float32 and out.shape == (23, 3)
    expect = images.reshape(23, -1)[:, :3].astype(np.float64) * 2 + 1
    expect /= np.linalg.norm(expect, axis=1, keepdims=True)
    np.testing.assert_allclose(out, expect, rtol=1e-6)
    # N smaller than one batch.
    out_small = ev.embed(embed_fn, images[:3], batch_size=8, progress=False)
    np.testing.assert_allclose(out_small, out[:3], rtol=1e-6)


def test_embed_errors():
    imgs = np.zeros((5, 2))
    with pytest.raises(ValueError, match="must return shape \\(batch_size, D\\) = \\(4, D\\)"):
        ev.embed(lambda b: b[:2], imgs, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="images is empty"):
        ev.embed(lambda b: b, np.zeros((0, 2)), progress=False)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        ev.embed(lambda b: b, imgs, batch_size=0, progress=False)


def test_knn_vote_blocks_do_not_change_results(monkeypatch):
    rng = np.random.default_rng(9)
    nbr = rng.integers(-1, 4, size=(50, 7))
    ql = rng.integers(0, 4, size=50)
    r = np.ones(50, int)
    whole = ev.per_query_metrics(nbr, ql, r, knn_k=7)["knn_accuracy"]
    monkeypatch.setattr(ev_metrics, "DEFAULT_CHUNK_ENTRIES", 60)  # blocks of one row
    np.testing.assert_array_equal(ev.per_query_metrics(nbr, ql, r, knn_k=7)["knn_accuracy"], whole)


def test_evaluate_embeddings_without_references_is_leave_one_out_only():
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(4), 10)
    emb = ev.l2_normalize(rng.normal(size=(40, 8)) + 3 * np.eye(8)[labels])
    out = ev.evaluate_embeddings(None, None, emb, labels, clustering=False)
    assert "test_vs_train" not in out
    assert out["test_vs_test"] == ev.retrieval_metrics(emb, labels)
    with pytest.raises(ValueError, match="give both or neither"):
        ev.evaluate_embeddings(emb, None, emb, labels)
