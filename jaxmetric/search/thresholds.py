r"""Verification and open-set search: distance thresholds and the scores that judge them.

A *comparison* is a pair (query, gallery item) with its Euclidean distance :math:`d` and
whether the two share a label ("genuine") or not ("impostor"). A threshold :math:`t`
accepts a comparison when :math:`d \le t`. With :math:`P` genuine and :math:`N` impostor
comparisons, :math:`TP(t)` genuine and :math:`FP(t)` impostor ones accepted:

* precision :math:`TP / (TP + FP)`, recall (true-match rate, TAR) :math:`TP / P`;
* false-match rate (FMR, FAR) :math:`FP / N`; false non-match rate FNMR = 1 - TAR;
* :math:`F_1 = 2\,TP / (2\,TP + FP + (P - TP))`.

Comparisons come from :func:`pair_distances` (every query against every gallery item:
verification) or :func:`nearest_comparisons` (each query against its nearest gallery
item: what :func:`match` decides, so a threshold calibrated there has the stated
precision *for match's answers*). The candidate thresholds are the observed distances
(every comparison at distance :math:`\le t` is accepted, ties together):

* :func:`threshold_for_precision` -- the largest :math:`t` whose precision reaches the
  target (the most matches at that precision);
* :func:`threshold_for_fmr` -- the largest :math:`t` with FMR :math:`\le` the target
  (:math:`t` below every distance when even the closest impostor breaks it);
* :func:`threshold_best_f1` -- the :math:`t` of the largest :math:`F_1` (the smallest such).

Scores: :func:`roc_auc` (the probability that a genuine pair is closer than an impostor
pair, ties counting half: the Mann-Whitney U statistic), :func:`fnmr_at_fmr` (FNMR and
TAR at the threshold of a target FMR) and :func:`retrieval_scores` (full mAP, MRR,
precision@k, mAP@k over the whole ranked gallery, averaged over queries or per class;
the per-query formulas are :func:`jaxmetric.evaluate.ranking_scores`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxmetric.search.index import SearchError
from jaxmetric.utils import as_embeddings, check_number

__all__ = [
    "UNKNOWN",
    "Threshold",
    "fnmr_at_fmr",
    "match",
    "nearest_comparisons",
    "pair_distances",
    "retrieval_scores",
    "roc_auc",
    "threshold_best_f1",
    "threshold_for_fmr",
    "threshold_for_precision",
]

UNKNOWN = "unknown"
"""What :func:`match` answers for a query too far from every gallery item."""


@dataclasses.dataclass(frozen=True)
class Threshold:
    """A distance threshold and what it does on the comparisons it was chosen on."""

    distance: float
    precision: float
    recall: float
    fmr: float
    f1: float
    rule: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _comparisons(distances, same) -> tuple[np.ndarray, np.ndarray]:
    d = np.asarray(distances, np.float64).reshape(-1)
    s = np.asarray(same, bool).reshape(-1)
    if d.shape != s.shape:
        raise SearchError(f"{d.size} distances but {s.size} genuine/impostor flags")
    if d.size == 0:
        raise SearchError("no comparisons to calibrate on")
    if not np.all(np.isfinite(d)):
        raise SearchError("the distances contain NaN or infinite values")
    return d, s


def _curve(d: np.ndarray, s: np.ndarray):
    """``(t, TP, FP, P, N)`` at each distinct distance ``t`` (ascending)."""
    order = np.argsort(d, kind="stable")
    d, s = d[order], s[order]
    tp, fp = np.cumsum(s), np.cumsum(~s)
    last = np.r_[d[1:] != d[:-1], True]  # the last comparison of each distinct distance
    return d[last], tp[last], fp[last], int(s.sum()), int((~s).sum())


def _at(t, tp, fp, p, n, rule) -> Threshold:
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = tp / (tp + fp) if tp + fp else float("nan")
        recall = tp / p if p else float("nan")
        fmr = fp / n if n else float("nan")
        f1 = 2 * tp / (2 * tp + fp + (p - tp)) if p + fp else float("nan")
    return Threshold(float(t), float(precision), float(recall), float(fmr), float(f1), rule)


def threshold_for_precision(distances, same, target: float = 0.99) -> Threshold:
    """The largest threshold whose precision is at least ``target`` (module docstring).

    Raises:
      SearchError: no threshold reaches the target.
    """
    target = check_number("target precision", target, minimum=0.0, maximum=1.0)
    t, tp, fp, p, n = _curve(*_comparisons(distances, same))
    ok = np.flatnonzero(tp / (tp + fp) >= target)
    if ok.size == 0:
        raise SearchError(f"no threshold reaches precision {target}: the best is "
                          f"{float(np.max(tp / (tp + fp))):.4f}")
    j = ok[-1]
    return _at(t[j], tp[j], fp[j], p, n, f"precision >= {target}")


def threshold_for_fmr(distances, same, target: float = 1e-3) -> Threshold:
    """The largest threshold with false-match rate at most ``target``."""
    target = check_number("target FMR", target, minimum=0.0, maximum=1.0)
    t, tp, fp, p, n = _curve(*_comparisons(distances, same))
    if n == 0:
        raise SearchError("no impostor comparisons: the false-match rate is undefined")
    ok = np.flatnonzero(fp / n <= target)
    rule = f"FMR <= {target}"
    if ok.size == 0:  # accept nothing: just below the smallest distance
        return _at(np.nextafter(t[0], -np.inf), 0, 0, p, n, rule)
    j = ok[-1]
    return _at(t[j], tp[j], fp[j], p, n, rule)


def threshold_best_f1(distances, same) -> Threshold:
    """The (smallest) threshold of the largest F1."""
    t, tp, fp, p, n = _curve(*_comparisons(distances, same))
    if p == 0:
        raise SearchError("no genuine comparisons: F1 is 0 at every threshold")
    f1 = 2 * tp / (2 * tp + fp + (p - tp))
    j = int(np.argmax(f1))
    return _at(t[j], tp[j], fp[j], p, n, "best F1")


def roc_auc(distances, same) -> float:
    r"""Area under the ROC curve of "accept if :math:`d \le t`":
    :math:`P(d_{gen} < d_{imp}) + \frac12 P(d_{gen} = d_{imp})`, from average ranks in
    :math:`O(n \log n)`."""
    d, s = _comparisons(distances, same)
    p, n = int(s.sum()), int((~s).sum())
    if p == 0 or n == 0:
        raise SearchError("ROC AUC needs both genuine and impostor comparisons")
    order = np.argsort(d, kind="stable")
    sorted_d = d[order]
    starts = np.r_[0, np.flatnonzero(sorted_d[1:] != sorted_d[:-1]) + 1]
    ends = np.r_[starts[1:], d.size]
    ranks = np.empty(d.size)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)  # 1-based averages
    return float((ranks[~s].sum() - n * (n + 1) / 2) / (p * n))


def fnmr_at_fmr(distances, same, fmr: float = 1e-3) -> dict[str, float]:
    """``{"fnmr", "tar", "fmr", "threshold"}`` at :func:`threshold_for_fmr` (``fmr`` is
    the FMR actually reached, at most the target)."""
    t = threshold_for_fmr(distances, same, fmr)
    return {"fnmr": 1.0 - t.recall, "tar": t.recall, "fmr": t.fmr, "threshold": t.distance}


def _distance_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(sq, 0.0))


def pair_distances(query_embeddings, query_labels, gallery_embeddings=None,
                   gallery_labels=None):
    """Every (query, gallery) comparison: ``(distances (Q*G,), genuine (Q*G,))``.

    Without a gallery the queries are compared with each other, each unordered pair once
    (no self-pairs). Memory is ``Q * G`` float64: for calibration sets, not galleries.
    """
    q = as_embeddings(query_embeddings, "query embeddings").astype(np.float64)
    ql = np.asarray(query_labels)
    if ql.shape != (len(q),):
        raise SearchError(f"{len(ql)} query labels for {len(q)} queries")
    if gallery_embeddings is None:
        d = _distance_matrix(q, q)
        upper = np.triu_indices(len(q), 1)
        return d[upper], (ql[:, None] == ql[None, :])[upper]
    g = as_embeddings(gallery_embeddings, "gallery embeddings").astype(np.float64)
    gl = np.asarray(gallery_labels)
    if gl.shape != (len(g),):
        raise SearchError(f"{len(gl)} gallery labels for {len(g)} gallery items")
    return _distance_matrix(q, g).reshape(-1), (ql[:, None] == gl[None, :]).reshape(-1)


def nearest_comparisons(index, queries, query_labels):
    """Each query against its nearest gallery item of ``index``:
    ``(distances (Q,), correct (Q,))``, correct when that item's label is the query's (a
    query of a class the gallery lacks is never correct)."""
    dist, _, labels = index.search(queries, 1)
    ql = list(query_labels)
    if len(ql) != len(dist):
        raise SearchError(f"{len(ql)} query labels for {len(dist)} queries")
    correct = np.array([a == b for a, b in zip(labels[:, 0], ql, strict=True)])
    return dist[:, 0].astype(np.float64), correct


def match(index, queries, threshold: float | None = None, *, unknown: str = UNKNOWN):
    """Open-set labels: the nearest gallery item's label where its distance is at most
    ``threshold`` (default: the index's calibrated one), else ``unknown``.

    Returns:
      ``(labels (Q,) object, distances (Q,))``.
    """
    if threshold is None:
        threshold = index.threshold
        if threshold is None:
            raise SearchError("the index has no calibrated threshold: pass threshold= or "
                              "calibrate it first")
    dist, _, labels = index.search(queries, 1)
    out = np.where(dist[:, 0] <= threshold, labels[:, 0], unknown).astype(object)
    return out, dist[:, 0]


def retrieval_scores(query_embeddings, query_labels, gallery_embeddings=None,
                     gallery_labels=None, *, ks: Sequence[int] = (1, 5),
                     per_class: bool = False) -> dict[str, float]:
    """Full mAP, MRR, precision@k and mAP@k of exact search over the whole gallery.

    Without a gallery: leave-one-out among the queries. Queries without a relevant
    gallery item are left out (counted in ``"queries"``). ``per_class=True`` averages the
    per-class means, so every class weighs the same.
    """
    from jaxmetric.evaluate import knn_search, ranking_scores

    ql = np.asarray(query_labels)
    loo = gallery_embeddings is None
    g = query_embeddings if loo else gallery_embeddings
    gl = ql if loo else np.asarray(gallery_labels)
    k = len(gl) - (1 if loo else 0)
    if k < 1:
        raise SearchError("the gallery needs at least one item besides the query")
    _, ind = knn_search(query_embeddings, g, k, exclude_self=loo)
    codes, inverse = np.unique(np.concatenate([ql, gl]), return_inverse=True)
    qc, gc = inverse[:len(ql)], inverse[len(ql):]
    relevant = np.bincount(gc, minlength=len(codes))[qc] - (1 if loo else 0)
    scores = ranking_scores(gc[ind], qc, relevant, ks=ks)
    keep = relevant > 0
    out = {"queries": int(keep.sum())}
    for name, values in scores.items():
        v, c = values[keep], qc[keep]
        out[name] = float(np.mean([v[c == u].mean() for u in np.unique(c)])) if per_class \
            else float(v.mean())
    return out
