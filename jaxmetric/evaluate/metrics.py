r"""Retrieval scores of ranked neighbours: precision@1, R-precision, MAP@R, Recall@k, k-NN.

:func:`per_query_metrics` turns the labels of each query's ranked neighbours into the
scores of pytorch-metric-learning's ``AccuracyCalculator`` (Musgrave et al. 2020) plus
Recall@k and k-NN classification accuracy, one value per query; :func:`ranking_scores`
the information-retrieval scores of a full ranking (average precision, reciprocal rank,
precision@k, AP@k). Pure NumPy: the search
that produces the neighbours is :mod:`jaxmetric.evaluate.knn`, the protocols that chain
both are :mod:`jaxmetric.evaluate.protocols`.

References:
  Musgrave, Belongie, Lim. "A Metric Learning Reality Check". ECCV 2020.
    https://arxiv.org/abs/2003.08505
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxmetric.utils import check_ks, check_positive_int

__all__ = ["DEFAULT_CHUNK_ENTRIES", "per_query_metrics", "ranking_scores"]

# Default bound on the number of (query, neighbour) entries held at once while scoring:
# 2**22 entries of int64 indices + float32 distances + per-entry temporaries is ~100 MB.
DEFAULT_CHUNK_ENTRIES = 1 << 22


def per_query_metrics(
    neighbour_labels,
    query_labels,
    n_relevant,
    *,
    ks: Sequence[int] = (1, 2, 4, 8),
    knn_k: int = 10,
    missing: int = -1,
) -> dict[str, np.ndarray]:
    r"""Per-query retrieval scores from the labels of ranked neighbours.

    Let :math:`m_{q,i} = [\,y(n_{q,i}) = y_q\,]` for the i-th nearest neighbour (1-based)
    and :math:`R_q` the number of references sharing the query's label (the query itself
    excluded in leave-one-out). Following Musgrave et al. (2020):

    * precision@1: :math:`m_{q,1}`;
    * R-precision: :math:`\frac{1}{R_q}\sum_{i \le R_q} m_{q,i}`;
    * MAP@R: :math:`\frac{1}{R_q}\sum_{i \le R_q} m_{q,i}\,P_q(i)` with
      :math:`P_q(i) = \frac{1}{i}\sum_{j \le i} m_{q,j}`;
    * Recall@k: :math:`\max_{i \le k} m_{q,i}` (at least one hit in the top k -- the
      "Recall@K" of metric-learning papers, not the IR recall);
    * k-NN accuracy: the majority label of the first ``knn_k`` neighbours equals
      :math:`y_q`. Ties between labels with equal votes go to the label whose nearest
      occurrence ranks first (equivalently, the tied label with the closest neighbour).

    A ``k`` (or ``knn_k``) larger than ``K`` uses all ``K`` columns.

    Args:
      neighbour_labels: ``(Q, K)`` integer labels of the ranked neighbours; entries equal
        to ``missing`` mark absent neighbours (they match nothing and get no vote).
      query_labels: ``(Q,)`` integer labels.
      n_relevant: ``(Q,)`` :math:`R_q`; needs ``K >= max R_q``. Rows with ``R_q = 0`` get
        NaN R-precision and MAP@R (the caller should exclude them, as
        :func:`~jaxmetric.evaluate.retrieval_metrics` does).
      ks: the k of Recall@k.
      knn_k: neighbours voting in k-NN classification.
      missing: the label value of absent neighbours.

    Returns:
      ``{"precision_at_1", "r_precision", "map_at_r", "recall_at_{k}"..., "knn_accuracy"}``
      each a ``(Q,)`` float64 array.
    """
    ks = check_ks(ks)
    knn_k = check_positive_int("knn_k", knn_k)
    nl = np.asarray(neighbour_labels)
    ql = np.asarray(query_labels)
    r = np.asarray(n_relevant)
    if nl.ndim != 2:
        raise ValueError(f"neighbour_labels must be 2-D (Q, K); got shape {nl.shape}")
    if ql.shape != (nl.shape[0],):
        raise ValueError(
            f"query_labels must have shape (Q,) = ({nl.shape[0]},); got {ql.shape}"
        )
    if r.shape != (nl.shape[0],):
        raise ValueError(f"n_relevant must have shape (Q,) = ({nl.shape[0]},); got {r.shape}")
    if nl.shape[1] == 0:
        raise ValueError("neighbour_labels needs at least one column (K >= 1)")
    if r.size and r.max() > nl.shape[1]:
        raise ValueError(
            f"MAP@R and R-precision need the top max(R) = {int(r.max())} neighbours; "
            f"neighbour_labels has only K = {nl.shape[1]} columns"
        )
    valid = nl != missing
    match = (nl == ql[:, None]) & valid
    kmax = nl.shape[1]
    ranks = np.arange(1, kmax + 1)
    within_r = ranks[None, :] <= r[:, None]
    hits_r = np.sum(match & within_r, axis=1)
    precision_i = np.cumsum(match, axis=1) / ranks[None, :]
    ap_sum = np.sum(np.where(match & within_r, precision_i, 0.0), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r_float = np.where(r > 0, r, np.nan).astype(np.float64)
        r_precision = hits_r / r_float
        map_at_r = ap_sum / r_float

    out = {
        "precision_at_1": match[:, 0].astype(np.float64),
        "r_precision": r_precision,
        "map_at_r": map_at_r,
    }
    for k in ks:
        out[f"recall_at_{k}"] = match[:, :k].any(axis=1).astype(np.float64)

    out["knn_accuracy"] = _knn_correct(nl[:, :knn_k], valid[:, :knn_k], ql)
    return out


def _knn_correct(votes: np.ndarray, valid: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """1.0 where the majority label of ``votes (Q, k)`` equals ``labels``, else 0.0.

    Score of each vote = ``count * (k + 1) + (k - first rank of its label)``: counts
    dominate and ties go to the label seen first. The ``(rows, k, k)`` label comparison
    is done in row blocks of at most ``DEFAULT_CHUNK_ENTRIES`` booleans.
    """
    kk = votes.shape[1]
    out = np.empty(votes.shape[0], np.float64)
    step = max(1, DEFAULT_CHUNK_ENTRIES // (kk * kk))
    for a in range(0, votes.shape[0], step):
        v, ok = votes[a:a + step], valid[a:a + step]
        same = (v[:, :, None] == v[:, None, :]) & ok[:, None, :]
        score = np.where(ok, same.sum(axis=2) * (kk + 1) + (kk - same.argmax(axis=2)), -1)
        best = score.argmax(axis=1)[:, None]
        winner = np.take_along_axis(v, best, axis=1)[:, 0]
        winner_ok = np.take_along_axis(ok, best, axis=1)[:, 0]
        out[a:a + step] = (winner == labels[a:a + step]) & winner_ok
    return out



def ranking_scores(
    neighbour_labels,
    query_labels,
    n_relevant,
    *,
    ks: Sequence[int] = (1, 5),
    missing: int = -1,
) -> dict[str, np.ndarray]:
    r"""Per-query ranking scores of the information-retrieval literature.

    With :math:`m_{q,i}`, :math:`R_q` and :math:`P_q(i)` as in :func:`per_query_metrics`
    and the neighbours ranked over the *whole* gallery (``K`` = gallery size, minus the
    query in leave-one-out):

    * average precision (full mAP): :math:`\frac{1}{R_q}\sum_{i \le K} m_{q,i}\,P_q(i)`;
    * reciprocal rank (MRR): :math:`1 / \min\{i : m_{q,i} = 1\}`, 0 without a match;
    * precision@k: :math:`\frac{1}{k}\sum_{i \le k} m_{q,i}`;
    * AP@k (mAP@k): :math:`\frac{1}{\min(R_q, k)}\sum_{i \le k} m_{q,i}\,P_q(i)`.

    A ``k`` larger than ``K`` uses all ``K`` columns (precision@k still divides by k).
    Rows with :math:`R_q = 0` get NaN average precision and AP@k (exclude them).

    Returns:
      ``{"average_precision", "reciprocal_rank", "precision_at_{k}"...,
      "ap_at_{k}"...}``, each ``(Q,)`` float64.
    """
    ks = check_ks(ks)
    nl = np.asarray(neighbour_labels)
    ql = np.asarray(query_labels)
    r = np.asarray(n_relevant)
    if nl.ndim != 2 or nl.shape[1] == 0:
        raise ValueError(f"neighbour_labels must be 2-D (Q, K) with K >= 1; got {nl.shape}")
    if ql.shape != (nl.shape[0],) or r.shape != (nl.shape[0],):
        raise ValueError(f"query_labels and n_relevant must have shape ({nl.shape[0]},); "
                         f"got {ql.shape} and {r.shape}")
    match = (nl == ql[:, None]) & (nl != missing)
    ranks = np.arange(1, nl.shape[1] + 1)
    precision_i = np.cumsum(match, axis=1) / ranks[None, :]
    weighted = np.where(match, precision_i, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r_float = np.where(r > 0, r, np.nan).astype(np.float64)
        out = {"average_precision": weighted.sum(axis=1) / r_float}
        first = np.where(match.any(axis=1), match.argmax(axis=1) + 1, np.inf)
        out["reciprocal_rank"] = 1.0 / first
        for k in ks:
            out[f"precision_at_{k}"] = match[:, :k].sum(axis=1) / k
            out[f"ap_at_{k}"] = weighted[:, :k].sum(axis=1) / np.minimum(r_float, k)
    return out
