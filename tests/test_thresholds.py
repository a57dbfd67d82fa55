"""Thresholds, verification scores and ranking scores against brute-force NumPy oracles.

Every oracle enumerates what the formula says (every candidate threshold, every
genuine/impostor pair, every rank) with plain loops; the implementation under test uses
sorting and cumulative sums. Data: small random embeddings with few distinct values, so
distance ties occur.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from jaxmetric.evaluate import ranking_scores
from jaxmetric.search import (
    UNKNOWN,
    Index,
    SearchError,
    fnmr_at_fmr,
    match,
    nearest_comparisons,
    pair_distances,
    retrieval_scores,
    roc_auc,
    threshold_best_f1,
    threshold_for_fmr,
    threshold_for_precision,
)


def _comparisons(seed=0, n=60):
    rng = np.random.default_rng(seed)
    same = rng.random(n) < 0.4
    d = np.round(np.where(same, rng.normal(0.6, 0.25, n), rng.normal(1.1, 0.25, n)), 1)
    return np.abs(d), same


def _rates(d, s, t):
    acc = d <= t
    tp, fp = int((acc & s).sum()), int((acc & ~s).sum())
    p, n = int(s.sum()), int((~s).sum())
    return tp, fp, p, n


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_thresholds_match_an_exhaustive_search(seed):
    d, s = _comparisons(seed)
    cands = sorted(set(d))
    for target in (0.8, 0.95):
        ok = [t for t in cands if (lambda tp, fp, *_: tp / (tp + fp) >= target)(*_rates(d, s, t))]
        if ok:
            got = threshold_for_precision(d, s, target)
            assert got.distance == pytest.approx(max(ok))
            tp, fp, p, _ = _rates(d, s, max(ok))
            assert got.precision == pytest.approx(tp / (tp + fp))
            assert got.recall == pytest.approx(tp / p)
    for target in (0.0, 0.05, 0.3):
        ok = [t for t in cands if _rates(d, s, t)[1] / _rates(d, s, t)[3] <= target]
        got = threshold_for_fmr(d, s, target)
        if ok:
            assert got.distance == pytest.approx(max(ok))
        else:
            assert got.distance < min(d) and got.recall == 0 and got.fmr == 0
        assert got.fmr <= target
        fnmr = fnmr_at_fmr(d, s, target)
        assert fnmr["fnmr"] == pytest.approx(1 - got.recall)
    f1 = {t: (lambda tp, fp, p, n: 2 * tp / (2 * tp + fp + p - tp))(*_rates(d, s, t))
          for t in cands}
    best = max(f1.values())
    got = threshold_best_f1(d, s)
    assert got.f1 == pytest.approx(best)
    assert got.distance == pytest.approx(min(t for t, v in f1.items() if v == best))


@pytest.mark.parametrize("seed", [0, 3])
def test_roc_auc_is_the_pairwise_probability(seed):
    d, s = _comparisons(seed)
    gen, imp = d[s], d[~s]
    oracle = np.mean([1.0 if a < b else 0.5 if a == b else 0.0
                      for a, b in itertools.product(gen, imp)])
    assert roc_auc(d, s) == pytest.approx(oracle)
    assert roc_auc([0.1, 0.2, 0.9], [True, True, False]) == 1.0


def test_bad_comparisons_are_clear_errors():
    with pytest.raises(SearchError, match="no threshold reaches precision"):
        threshold_for_precision([0.1, 0.2], [False, False], 0.5)
    with pytest.raises(SearchError, match="NaN"):
        roc_auc([np.nan, 0.2], [True, False])
    with pytest.raises(SearchError, match="both genuine and impostor"):
        roc_auc([0.1, 0.2], [True, True])
    with pytest.raises(SearchError, match="no comparisons"):
        threshold_best_f1([], [])


def _embeddings(seed, n, classes):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    centres = rng.normal(size=(classes, 6))
    x = centres[labels] + rng.normal(scale=1.2, size=(n, 6))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def test_pair_distances_are_every_pair():
    q, ql = _embeddings(0, 7, 3)
    g, gl = _embeddings(1, 5, 3)
    d, s = pair_distances(q, ql, g, gl)
    assert d == pytest.approx([np.linalg.norm(a - b) for a in q for b in g], abs=1e-5)
    assert list(s) == [a == b for a in ql for b in gl]
    d, s = pair_distances(q, ql)
    pairs = list(itertools.combinations(range(7), 2))
    assert d == pytest.approx([np.linalg.norm(q[i] - q[j]) for i, j in pairs], abs=1e-5)
    assert list(s) == [ql[i] == ql[j] for i, j in pairs]


def _ranking_oracle(q, ql, g, gl, ks, loo):
    out = {"average_precision": [], "reciprocal_rank": []}
    for k in ks:
        out[f"precision_at_{k}"], out[f"ap_at_{k}"] = [], []
    for i in range(len(q)):
        rows = [j for j in range(len(g)) if not (loo and j == i)]
        order = sorted(rows, key=lambda j: (np.sum((q[i] - g[j]) ** 2), j))
        m = [int(gl[j] == ql[i]) for j in order]
        r = sum(m)
        if r == 0:
            continue
        prec = [sum(m[:n + 1]) / (n + 1) for n in range(len(m))]
        out["average_precision"].append(sum(p * h for p, h in zip(prec, m, strict=True)) / r)
        out["reciprocal_rank"].append(1 / (m.index(1) + 1))
        for k in ks:
            out[f"precision_at_{k}"].append(sum(m[:k]) / k)
            out[f"ap_at_{k}"].append(sum(p * h for p, h in zip(prec[:k], m[:k], strict=True))
                                     / min(r, k))
    return {name: np.array(v) for name, v in out.items()}


@pytest.mark.parametrize("loo", [False, True], ids=["gallery", "leave-one-out"])
def test_retrieval_scores_match_the_oracle(loo):
    q, ql = _embeddings(2, 12, 4)
    g, gl = (None, None) if loo else _embeddings(3, 15, 5)
    ks = (1, 3, 20)
    oracle = _ranking_oracle(q, ql, q if loo else g, ql if loo else gl, ks, loo)
    got = retrieval_scores(q, ql, g, gl, ks=ks)
    for name, values in oracle.items():
        assert got[name] == pytest.approx(values.mean()), name
    assert got["queries"] == len(oracle["reciprocal_rank"])
    per_class = retrieval_scores(q, ql, g, gl, ks=ks, per_class=True)
    labels = np.array([ql[i] for i in range(len(q))
                       if ((ql == ql[i]).sum() - 1 if loo else (gl == ql[i]).sum()) > 0])
    ap = oracle["average_precision"]
    assert per_class["average_precision"] == pytest.approx(
        np.mean([ap[labels == c].mean() for c in np.unique(labels)]))


def test_ranking_scores_by_hand():
    got = ranking_scores([[1, 0, 1, 0]], [1], [2], ks=(2,))
    assert got["average_precision"][0] == pytest.approx((1 + 2 / 3) / 2)
    assert got["reciprocal_rank"][0] == 1.0
    assert got["precision_at_2"][0] == 0.5
    assert got["ap_at_2"][0] == pytest.approx(1 / 2)
    none = ranking_scores([[0, 0]], [1], [0], ks=(1,))
    assert none["reciprocal_rank"][0] == 0 and np.isnan(none["average_precision"][0])


def test_match_answers_unknown_beyond_the_threshold():
    g, gl = _embeddings(4, 20, 4)
    index = Index.build(g, [f"g{i}" for i in range(20)], [f"c{v}" for v in gl])
    q, ql = _embeddings(5, 10, 5)  # class 4 is not in the gallery
    d, correct = nearest_comparisons(index, q, [f"c{v}" for v in ql])
    nearest = [min(range(20), key=lambda j: np.sum((x - g[j]) ** 2)) for x in q]
    assert d == pytest.approx([np.linalg.norm(x - g[j]) for x, j in zip(q, nearest, strict=True)],
                              abs=1e-5)
    assert list(correct) == [gl[j] == v for j, v in zip(nearest, ql, strict=True)]
    t = float(np.median(d))
    labels, dist = match(index, q, t)
    assert list(labels) == [f"c{gl[j]}" if di <= t else UNKNOWN
                            for j, di in zip(nearest, d, strict=True)]
    with pytest.raises(SearchError, match="no calibrated threshold"):
        match(index, q)
