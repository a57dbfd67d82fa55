"""Retrieval evaluation of learned embeddings.

Metric learning is judged by retrieval: embed a query set and a reference set, find each
query's nearest references, and score how many of them share the query's class. This
module provides

* :func:`embed` -- run a (jitted) embedding function over a dataset in fixed-shape
  batches and L2-normalise the result;
* a thin FAISS layer -- :func:`build_index`, :func:`search`, :func:`knn_search` (exact
  ``IndexFlatL2`` or approximate ``IndexIVFPQ``) with leave-one-out self-exclusion, and
  :func:`recall_vs_exact` to measure what the approximation loses;
* the metrics of pytorch-metric-learning's ``AccuracyCalculator`` -- precision@1,
  R-precision, MAP@R -- plus Recall@K and k-NN classification accuracy
  (:func:`per_query_metrics`, :func:`retrieval_metrics`), and NMI/AMI of k-means
  clusters (:func:`clustering_metrics`);
* :func:`evaluate_embeddings`, which reports both protocols (test queries against the
  training set, and test-vs-test leave-one-out), and :func:`write_report`, which writes
  a markdown report of the numbers and pictures of a run.

Distances are squared Euclidean. For L2-normalised embeddings (what :func:`embed`
returns) the ranking equals the cosine-similarity ranking, since
``||x - y||^2 = 2 - 2 <x, y>``.

FAISS, scikit-learn and tqdm are optional dependencies (``pip install jaxmetric[eval]``)
and are imported only inside the functions that need them.

References:
  Musgrave, Belongie, Lim. "A Metric Learning Reality Check". ECCV 2020.
    https://arxiv.org/abs/2003.08505
  Jegou, Douze, Schmid. "Product Quantization for Nearest Neighbor Search". TPAMI 2011.
  Johnson, Douze, Jegou. "Billion-scale similarity search with GPUs" (FAISS). 2017.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "INDEX_TYPES",
    "build_index",
    "clustering_metrics",
    "embed",
    "evaluate_embeddings",
    "flatten",
    "index_params",
    "knn_search",
    "l2_normalize",
    "neighbour_recall",
    "per_query_metrics",
    "recall_vs_exact",
    "retrieval_metrics",
    "search",
    "write_report",
]

INDEX_TYPES = ("flat", "ivfpq")

# Default bound on the number of (query, neighbour) entries held at once while scoring:
# 2**22 entries of int64 indices + float32 distances + per-entry temporaries is ~100 MB.
DEFAULT_CHUNK_ENTRIES = 1 << 22

_INSTALL_HINT = "pip install jaxmetric[eval]"


# --------------------------------------------------------------------------------------
# Optional dependencies
# --------------------------------------------------------------------------------------


def _import_faiss():
    try:
        import faiss  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"jaxmetric.evaluate needs FAISS for nearest-neighbour search; "
            f"install it with `{_INSTALL_HINT}` (or `pip install faiss-cpu`)."
        ) from e
    return faiss


def _import_sklearn_metrics():
    try:
        from sklearn import metrics  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover
        raise ImportError(
            f"NMI/AMI need scikit-learn; install it with `{_INSTALL_HINT}`."
        ) from e
    return metrics


def _tqdm(**kwargs):
    try:
        from tqdm.auto import tqdm  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover
        raise ImportError(f"progress bars need tqdm; install it with `{_INSTALL_HINT}`.") from e
    return tqdm(**kwargs)


# --------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------


def _as_embeddings(x, name: str) -> np.ndarray:
    """Validate a ``(N, D)`` embedding matrix and return it C-contiguous float32."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (N, D); got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty; got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{name} must hold real numbers; got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _as_labels(y, n: int, name: str, emb_name: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array (N,); got shape {arr.shape}")
    if arr.shape[0] != n:
        raise ValueError(
            f"{name} has {arr.shape[0]} entries but {emb_name} has {n} rows; "
            "they must have the same length"
        )
    return arr


def _check_same_dim(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{name_a} has dimension {a.shape[1]} but {name_b} has dimension {b.shape[1]}"
        )


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks must contain at least one k")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"every k in ks must be a positive integer; got {k!r}")
    return tuple(int(k) for k in ks)


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return int(value)


# --------------------------------------------------------------------------------------
# Embedding a dataset
# --------------------------------------------------------------------------------------


def l2_normalize(x: np.ndarray, *, eps: float = 1e-12) -> np.ndarray:
    r"""Row-wise L2 normalisation, :math:`x_i / \max(\|x_i\|_2, \epsilon)`, in float32.

    Args:
      x: ``(N, D)`` array.
      eps: floor on the norm; an all-zero row stays zero instead of becoming NaN.

    Returns:
      ``(N, D)`` float32 array whose non-zero rows have unit norm.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"l2_normalize expects a 2-D array (N, D); got shape {x.shape}")
    norms = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    return (x / np.maximum(norms, eps)).astype(np.float32)


def embed(
    embed_fn: Callable[[Any], Any],
    images,
    *,
    batch_size: int = 1024,
    progress: bool = True,
    desc: str = "embed",
) -> np.ndarray:
    """Embed a dataset batch by batch and L2-normalise the result.

    Every call of ``embed_fn`` sees exactly ``batch_size`` rows: the last, partial batch is
    padded by repeating its final row (so a jitted function compiles once and never sees
    all-zero padding), and the padded outputs are dropped.

    Args:
      embed_fn: ``batch (batch_size, ...) -> (batch_size, D)``, typically jitted and
        possibly running across devices (then ``batch_size`` must suit the device count).
        Any array type ``np.asarray`` understands may be returned.
      images: array-like of shape ``(N, ...)`` supporting ``len`` and slicing along the
        first axis (numpy array, memmap, ...). Slices are passed to ``embed_fn`` as numpy.
      batch_size: rows per call.
      progress: show a tqdm progress bar.
      desc: progress bar label.

    Returns:
      ``(N, D)`` float32 numpy array with unit-norm rows (see :func:`l2_normalize`).
    """
    batch_size = _check_positive_int(batch_size, "batch_size")
    if not hasattr(images, "shape") or len(images.shape) < 1:
        images = np.asarray(images)
        if images.ndim < 1:
            raise ValueError("images must have a leading batch axis (N, ...)")
    n = int(images.shape[0])
    if n == 0:
        raise ValueError("images is empty (N = 0); nothing to embed")

    outputs = []
    dim = None
    bar = _tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False)
    try:
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            batch = np.asarray(images[start:stop])
            valid = stop - start
            if valid < batch_size:
                pad = np.repeat(batch[-1:], batch_size - valid, axis=0)
                batch = np.concatenate([batch, pad], axis=0)
            out = np.asarray(embed_fn(batch))
            if out.ndim != 2 or out.shape[0] != batch_size:
                raise ValueError(
                    f"embed_fn must return shape (batch_size, D) = ({batch_size}, D) for a "
                    f"batch of shape {batch.shape}; got {out.shape}"
                )
            if dim is None:
                dim = out.shape[1]
            elif out.shape[1] != dim:
                raise ValueError(
                    f"embed_fn returned dimension {out.shape[1]} after {dim} earlier"
                )
            outputs.append(np.asarray(out[:valid], dtype=np.float32))
            bar.update(valid)
    finally:
        bar.close()
    return l2_normalize(np.concatenate(outputs, axis=0))


# --------------------------------------------------------------------------------------
# FAISS search
# --------------------------------------------------------------------------------------


def _default_m(d: int) -> int:
    """Largest divisor of ``d`` not above ``d // 4`` (4+ dims per PQ sub-vector)."""
    target = max(1, d // 4)
    for m in range(target, 0, -1):
        if d % m == 0:
            return m
    return 1  # pragma: no cover - m = 1 always divides


def _resolve_ivfpq(n: int, d: int, nlist, m, nbits, nprobe) -> dict[str, int]:
    """Fill in IVF-PQ defaults for ``n`` references of dimension ``d`` and validate."""
    nbits = _check_positive_int(nbits, "nbits")
    if nlist is None:
        # ~4 sqrt(N) lists (FAISS guideline), capped so each list gets >= 39 training points.
        nlist = int(min(4 * math.sqrt(n), n // 39))
        nlist = max(1, nlist)
    nlist = _check_positive_int(nlist, "nlist")
    m = _default_m(d) if m is None else _check_positive_int(m, "m")
    if d % m:
        raise ValueError(f"m (number of PQ sub-vectors) must divide the dimension {d}; got {m}")
    if nprobe is None:
        nprobe = max(1, nlist // 8)
    nprobe = _check_positive_int(nprobe, "nprobe")
    if nprobe > nlist:
        raise ValueError(f"nprobe ({nprobe}) cannot exceed nlist ({nlist})")
    needed = max(nlist, 2**nbits)
    if n < needed:
        raise ValueError(
            f"IVF-PQ needs at least max(nlist, 2**nbits) = {needed} references to train "
            f"(nlist={nlist}, nbits={nbits}); got {n}. Use index='flat' or smaller "
            "nlist/nbits."
        )
    return {"nlist": nlist, "m": m, "nbits": nbits, "nprobe": nprobe}


def build_index(
    references,
    *,
    index: str = "flat",
    nlist: int | None = None,
    m: int | None = None,
    nbits: int = 8,
    nprobe: int | None = None,
    seed: int = 0,
):
    """Build a FAISS L2 index over ``references``.

    ``index="flat"`` is exact brute force (``IndexFlatL2``). ``index="ivfpq"`` is an
    inverted file with ``nlist`` coarse k-means cells, each vector stored as ``m``
    ``nbits``-bit product-quantisation codes (``m * nbits / 8`` bytes); a query scans the
    ``nprobe`` closest cells. It is trained on the references themselves.

    Args:
      references: ``(N, D)`` float array.
      index: ``"flat"`` or ``"ivfpq"``.
      nlist: IVF cells; default ``min(4 sqrt(N), N // 39)``.
      m: PQ sub-vectors, must divide ``D``; default the largest divisor of ``D`` that is
        at most ``D // 4``.
      nbits: bits per PQ code (FAISS needs ``N >= 2**nbits`` to train).
      nprobe: cells visited per query; default ``max(1, nlist // 8)``.
      seed: seed of the k-means training of the IVF-PQ quantisers.

    Returns:
      A populated FAISS index; :func:`index_params` reads back the chosen parameters.
    """
    faiss = _import_faiss()
    refs = _as_embeddings(references, "references")
    n, d = refs.shape
    if index == "flat":
        idx = faiss.IndexFlatL2(d)
        idx.add(refs)
        return idx
    if index == "ivfpq":
        p = _resolve_ivfpq(n, d, nlist, m, nbits, nprobe)
        quantizer = faiss.IndexFlatL2(d)
        idx = faiss.IndexIVFPQ(quantizer, d, p["nlist"], p["m"], p["nbits"])
        idx.cp.seed = seed
        idx.pq.cp.seed = seed
        idx.cp.min_points_per_centroid = 1  # silence "please provide more points" warnings
        idx.pq.cp.min_points_per_centroid = 1
        idx.train(refs)
        idx.add(refs)
        idx.nprobe = p["nprobe"]
        return idx
    raise ValueError(f"unknown index type {index!r}; expected one of {INDEX_TYPES}")


def index_params(index) -> dict[str, Any]:
    """Type and parameters of a FAISS index built by :func:`build_index`.

    Returns:
      ``{"type": "flat"}`` or ``{"type": "ivfpq", "nlist", "m", "nbits", "nprobe"}``
      (``{"type": <class name>}`` for other index classes).
    """
    faiss = _import_faiss()
    if isinstance(index, faiss.IndexFlatL2):
        return {"type": "flat"}
    if isinstance(index, faiss.IndexIVFPQ):
        return {
            "type": "ivfpq",
            "nlist": int(index.nlist),
            "m": int(index.pq.M),
            "nbits": int(index.pq.nbits),
            "nprobe": int(index.nprobe),
        }
    return {"type": type(index).__name__}


def search(index, queries, k: int, *, exclude_ids=None) -> tuple[np.ndarray, np.ndarray]:
    """k nearest references of each query, optionally excluding one id per query.

    Self-exclusion (leave-one-out) is by *index*, not by distance: we search ``k + 1``
    neighbours and remove the entry whose id equals ``exclude_ids[i]``. If that id is not
    among the ``k + 1`` (possible when the query has ``>= k + 1`` exact duplicates that
    FAISS ranked first, or with an approximate index), the last entry is removed instead,
    so exactly ``k`` neighbours remain and none of them is the query itself. Removing
    by distance (e.g. "drop the first column" or "drop zero distances") would be wrong
    for duplicates.

    Args:
      index: a FAISS index (see :func:`build_index`).
      queries: ``(Q, D)`` float array.
      k: neighbours per query; at most ``index.ntotal`` (minus one when excluding).
      exclude_ids: optional ``(Q,)`` integer ids, in the index, to drop from each row.

    Returns:
      ``(distances, indices)``, float32 and int64 arrays of shape ``(Q, k)``, sorted by
      increasing squared L2 distance. Approximate indexes may return fewer than ``k``
      hits; missing entries have index ``-1`` (FAISS convention).
    """
    q = _as_embeddings(queries, "queries")
    k = _check_positive_int(k, "k")
    if q.shape[1] != index.d:
        raise ValueError(f"queries have dimension {q.shape[1]} but the index has {index.d}")
    extra = 0 if exclude_ids is None else 1
    if k + extra > index.ntotal:
        raise ValueError(
            f"k={k} is too large: the index holds {index.ntotal} references"
            + (" and one is excluded per query" if extra else "")
        )
    dist, ind = index.search(q, k + extra)
    if exclude_ids is None:
        return dist, ind
    ids = np.asarray(exclude_ids, dtype=np.int64)
    if ids.shape != (q.shape[0],):
        raise ValueError(
            f"exclude_ids must have shape (Q,) = ({q.shape[0]},); got {ids.shape}"
        )
    is_self = ind == ids[:, None]
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
    keep = np.arange(k + 1)[None, :] != drop[:, None]
    return dist[keep].reshape(-1, k), ind[keep].reshape(-1, k)


def knn_search(
    queries, references, k: int, *, exclude_self: bool = False, index: str = "flat", **index_kwargs
) -> tuple[np.ndarray, np.ndarray]:
    """Build an index over ``references`` and return the ``k`` nearest of each query.

    With ``exclude_self=True`` the queries must *be* the references (same rows in the
    same order, leave-one-out) and each query's own row is removed (see :func:`search`).
    ``index`` and ``index_kwargs`` are passed to :func:`build_index`.

    Returns:
      ``(distances, indices)`` of shape ``(Q, k)``.
    """
    q = _as_embeddings(queries, "queries")
    refs = _as_embeddings(references, "references")
    _check_same_dim(q, refs, "queries", "references")
    ids = None
    if exclude_self:
        if q.shape != refs.shape:
            raise ValueError(
                "exclude_self=True needs queries and references to be the same set; got "
                f"shapes {q.shape} and {refs.shape}"
            )
        ids = np.arange(q.shape[0])
    idx = build_index(refs, index=index, **index_kwargs)
    return search(idx, q, k, exclude_ids=ids)


def neighbour_recall(approx_indices, exact_indices) -> float:
    r"""Mean fraction of the exact top-k neighbours an approximate search found.

    .. math:: \frac{1}{Q} \sum_q \frac{|A_q \cap E_q|}{k}

    Args:
      approx_indices: ``(Q, k')`` ids from the approximate index (``-1`` = missing).
      exact_indices: ``(Q, k)`` ids from exact search. With exact distance ties the exact
        top-k set is itself ambiguous, which can lower this number.

    Returns:
      A float in ``[0, 1]``.
    """
    a = np.asarray(approx_indices)
    e = np.asarray(exact_indices)
    if a.ndim != 2 or e.ndim != 2:
        raise ValueError(
            f"index arrays must be 2-D (Q, k); got shapes {a.shape} and {e.shape}"
        )
    if a.shape[0] != e.shape[0]:
        raise ValueError(f"query count mismatch: {a.shape[0]} approximate vs {e.shape[0]} exact")
    hits = (e[:, :, None] == a[:, None, :]).any(axis=2) & (e >= 0)
    return float(hits.sum(axis=1).mean() / e.shape[1])


def recall_vs_exact(
    index,
    references,
    queries,
    *,
    k: int = 10,
    exclude_self: bool = False,
    max_queries: int | None = 1000,
    seed: int = 0,
) -> float:
    """Recall@k of an (approximate) index against exact ``IndexFlatL2`` search.

    Args:
      index: the index to measure, built over ``references``.
      references: ``(N, D)`` the vectors ``index`` holds, in the same order.
      queries: ``(Q, D)``; with ``exclude_self=True`` they must be the references.
      k: neighbours compared.
      exclude_self: leave-one-out (see :func:`search`).
      max_queries: evaluate on a random subset of this many queries (``None`` = all).
      seed: seed of that subset.

    Returns:
      :func:`neighbour_recall` of the index's top-k against the exact top-k, in ``[0, 1]``.
    """
    faiss = _import_faiss()
    refs = _as_embeddings(references, "references")
    q = _as_embeddings(queries, "queries")
    _check_same_dim(q, refs, "queries", "references")
    if refs.shape[0] != index.ntotal:
        raise ValueError(
            f"references has {refs.shape[0]} rows but the index holds {index.ntotal}"
        )
    if exclude_self and q.shape != refs.shape:
        raise ValueError("exclude_self=True needs queries to be the references")
    rows = np.arange(q.shape[0])
    if max_queries is not None and q.shape[0] > max_queries:
        rows = np.sort(np.random.default_rng(seed).choice(q.shape[0], max_queries, replace=False))
    ids = rows if exclude_self else None
    k = min(k, refs.shape[0] - (1 if exclude_self else 0))
    exact = faiss.IndexFlatL2(refs.shape[1])
    exact.add(refs)
    _, e = search(exact, q[rows], k, exclude_ids=ids)
    _, a = search(index, q[rows], k, exclude_ids=ids)
    return neighbour_recall(a, e)


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


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
        :func:`retrieval_metrics` does).
      ks: the k of Recall@k.
      knn_k: neighbours voting in k-NN classification.
      missing: the label value of absent neighbours.

    Returns:
      ``{"precision_at_1", "r_precision", "map_at_r", "recall_at_{k}"..., "knn_accuracy"}``
      each a ``(Q,)`` float64 array.
    """
    ks = _check_ks(ks)
    knn_k = _check_positive_int(knn_k, "knn_k")
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


def _encode_labels(*label_arrays: np.ndarray) -> list[np.ndarray]:
    """Map labels of any dtype to int64 codes ``0..C-1`` shared across the arrays."""
    sizes = [len(a) for a in label_arrays]
    try:
        _, codes = np.unique(np.concatenate(label_arrays), return_inverse=True)
    except TypeError as e:
        raise TypeError("labels must be mutually comparable (e.g. all ints)") from e
    codes = codes.reshape(-1).astype(np.int64)
    return np.split(codes, np.cumsum(sizes)[:-1])


def retrieval_metrics(
    queries,
    query_labels,
    references=None,
    reference_labels=None,
    *,
    ks: Sequence[int] = (1, 2, 4, 8),
    knn_k: int = 10,
    index="flat",
    chunk_entries: int = DEFAULT_CHUNK_ENTRIES,
    progress: bool = False,
    desc: str = "retrieval",
    **index_kwargs,
) -> dict[str, float]:
    """Precision@1, R-precision, MAP@R, Recall@k and k-NN accuracy of one protocol.

    With ``references=None`` this is the leave-one-out protocol: the queries are searched
    against themselves and each query's own row is excluded by index, so
    :math:`R_q = |\\{j \\ne q: y_j = y_q\\}|`. Otherwise the queries are searched against
    the references and :math:`R_q = |\\{j: y^{ref}_j = y_q\\}|`.

    Queries with :math:`R_q = 0` (their class has no other member among the references)
    cannot be scored and are excluded from every average, as pytorch-metric-learning's
    ``AccuracyCalculator`` does; their number is reported as ``n_excluded``.

    Memory: MAP@R and R-precision need each query's top :math:`R_q` neighbours, and
    :math:`R_q` is the class size (about 5,000 for CIFAR-10 test-vs-train). Queries are
    processed in chunks of ``c`` rows with ``c * K <= chunk_entries``, where ``K`` is the
    largest of :math:`\\max R_q` over the chunk, ``max(ks)`` and ``knn_k`` (capped at the
    number of references). Only per-query scores are kept between chunks, so peak memory
    is ``O(chunk_entries)`` regardless of ``Q`` (the default 2**22 is ~100 MB including
    FAISS's heap and temporaries). ``k`` values beyond the number of references are
    capped to it.

    Args:
      queries: ``(Q, D)`` embeddings.
      query_labels: ``(Q,)`` labels (any comparable dtype).
      references: ``(N, D)`` embeddings, or ``None`` for leave-one-out on ``queries``.
      reference_labels: ``(N,)`` labels; required iff ``references`` is given.
      ks: the k of Recall@k.
      knn_k: neighbours voting in k-NN classification (ties: see :func:`per_query_metrics`).
      index: ``"flat"`` / ``"ivfpq"`` (see :func:`build_index`) or a prebuilt FAISS index
        over ``references`` (or over ``queries`` for leave-one-out).
      chunk_entries: bound on ``queries-per-chunk * neighbours-per-query``.
      progress: show a tqdm bar over query chunks.
      desc: its label.
      **index_kwargs: IVF-PQ options of :func:`build_index` (``nlist, m, nbits, nprobe,
        seed``).

    Returns:
      A dict of Python floats: ``precision_at_1, r_precision, map_at_r, recall_at_{k}...,
      knn_accuracy`` and the ints ``n_queries`` (scored) and ``n_excluded``. All scores are
      NaN if every query is excluded.
    """
    ks = _check_ks(ks)
    knn_k = _check_positive_int(knn_k, "knn_k")
    chunk_entries = _check_positive_int(chunk_entries, "chunk_entries")
    q = _as_embeddings(queries, "queries")
    ql = _as_labels(query_labels, q.shape[0], "query_labels", "queries")
    leave_one_out = references is None
    if leave_one_out:
        if reference_labels is not None:
            raise ValueError("reference_labels given without references")
        refs, rl = q, ql
    else:
        if reference_labels is None:
            raise ValueError("references given without reference_labels")
        refs = _as_embeddings(references, "references")
        rl = _as_labels(reference_labels, refs.shape[0], "reference_labels", "references")
        _check_same_dim(q, refs, "queries", "references")

    ql_codes, rl_codes = _encode_labels(ql, rl)
    n_classes = int(max(ql_codes.max(), rl_codes.max())) + 1
    ref_counts = np.bincount(rl_codes, minlength=n_classes)
    r_all = ref_counts[ql_codes] - (1 if leave_one_out else 0)
    n_available = refs.shape[0] - (1 if leave_one_out else 0)

    names = ["precision_at_1", "r_precision", "map_at_r"]
    names += [f"recall_at_{k}" for k in ks] + ["knn_accuracy"]
    scored = r_all > 0
    n_scored = int(scored.sum())
    result: dict[str, float] = {}
    if n_scored == 0 or n_available < 1:
        result.update({name: float("nan") for name in names})
        result.update(n_queries=0, n_excluded=int(q.shape[0]))
        return result

    if isinstance(index, str):
        idx = build_index(refs, index=index, **index_kwargs)
    else:
        if index_kwargs:
            raise ValueError(
                f"index options {sorted(index_kwargs)} given with a prebuilt index"
            )
        idx = index
        if idx.ntotal != refs.shape[0]:
            raise ValueError(
                f"prebuilt index holds {idx.ntotal} vectors but there are "
                f"{refs.shape[0]} references"
            )

    # Only scoreable queries are searched; sort nothing -- chunks follow query order.
    q_rows = np.flatnonzero(scored)
    sums = {name: 0.0 for name in names}
    base_k = min(max(max(ks), knn_k), n_available)
    bar = _tqdm(total=n_scored, desc=desc, unit="query", disable=not progress, leave=False)
    try:
        start = 0
        while start < n_scored:
            # Grow the chunk while (rows * K) stays within budget; K depends on the rows.
            k_need = max(base_k, int(r_all[q_rows[start]]))
            stop = start + 1
            while stop < n_scored:
                k_next = max(k_need, int(r_all[q_rows[stop]]))
                if (stop + 1 - start) * k_next > chunk_entries:
                    break
                k_need, stop = k_next, stop + 1
            rows = q_rows[start:stop]
            k_need = min(k_need, n_available)
            _, ind = search(idx, q[rows], k_need, exclude_ids=rows if leave_one_out else None)
            nbr_labels = np.where(ind >= 0, rl_codes[np.maximum(ind, 0)], -1)
            per_q = per_query_metrics(
                nbr_labels, ql_codes[rows], r_all[rows], ks=ks, knn_k=knn_k, missing=-1
            )
            for name in names:
                sums[name] += float(per_q[name].sum())
            bar.update(len(rows))
            start = stop
    finally:
        bar.close()
    result.update({name: sums[name] / n_scored for name in names})
    result.update(n_queries=n_scored, n_excluded=int(q.shape[0] - n_scored))
    return result


def clustering_metrics(
    embeddings,
    labels,
    *,
    n_clusters: int | None = None,
    seed: int = 0,
    niter: int = 100,
) -> dict[str, float]:
    """NMI and AMI between FAISS k-means clusters and the true labels.

    k-means (``faiss.Kmeans``, fixed ``seed``, all points used for training) with
    ``n_clusters`` = number of distinct labels by default, then scikit-learn's
    ``normalized_mutual_info_score`` (arithmetic normalisation) and
    ``adjusted_mutual_info_score`` between the cluster assignment and the labels.

    Args:
      embeddings: ``(N, D)``.
      labels: ``(N,)``.
      n_clusters: number of clusters; default the number of classes.
      seed: k-means seed.
      niter: k-means iterations.

    Returns:
      ``{"nmi": float, "ami": float, "n_clusters": int}``.
    """
    faiss = _import_faiss()
    metrics = _import_sklearn_metrics()
    x = _as_embeddings(embeddings, "embeddings")
    y = _as_labels(labels, x.shape[0], "labels", "embeddings")
    (codes,) = _encode_labels(y)
    if n_clusters is None:
        n_clusters = int(codes.max()) + 1
    n_clusters = _check_positive_int(n_clusters, "n_clusters")
    if n_clusters > x.shape[0]:
        raise ValueError(f"n_clusters={n_clusters} exceeds the number of points {x.shape[0]}")
    km = faiss.Kmeans(
        x.shape[1],
        n_clusters,
        niter=int(niter),
        seed=int(seed),
        verbose=False,
        min_points_per_centroid=1,
        max_points_per_centroid=max(256, -(-x.shape[0] // n_clusters)),
    )
    km.train(x)
    _, assign = km.index.search(x, 1)
    assign = assign[:, 0]
    return {
        "nmi": float(metrics.normalized_mutual_info_score(codes, assign)),
        "ami": float(metrics.adjusted_mutual_info_score(codes, assign)),
        "n_clusters": n_clusters,
    }


def evaluate_embeddings(
    train_emb,
    train_labels,
    test_emb,
    test_labels,
    *,
    ks: Sequence[int] = (1, 2, 4, 8),
    knn_k: int = 10,
    index: str = "flat",
    nlist: int | None = None,
    m: int | None = None,
    nbits: int = 8,
    nprobe: int | None = None,
    clustering: bool = True,
    recall_k: int = 10,
    recall_max_queries: int | None = 1000,
    seed: int = 0,
    chunk_entries: int = DEFAULT_CHUNK_ENTRIES,
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """Evaluate embeddings under both retrieval protocols, plus clustering.

    * ``test_vs_train``: test queries against the training set as references -- a k-NN
      classifier; its precision@1 is the number usually quoted as "accuracy".
    * ``test_vs_test``: leave-one-out retrieval inside the test set (each test image
      queries all other test images), the protocol of Musgrave et al. (2020).
    * ``clustering``: NMI/AMI of k-means on the test embeddings (see
      :func:`clustering_metrics`), if ``clustering``.

    Args:
      train_emb, train_labels: ``(N, D)`` and ``(N,)`` reference set.
      test_emb, test_labels: ``(Q, D)`` and ``(Q,)`` query set.
      ks, knn_k, chunk_entries, progress: see :func:`retrieval_metrics`.
      index: ``"flat"`` (exact) or ``"ivfpq"``; ``nlist, m, nbits, nprobe`` configure
        IVF-PQ (see :func:`build_index`; one index per protocol is trained).
      clustering: also compute NMI/AMI.
      recall_k, recall_max_queries: for IVF-PQ, each protocol also reports
        ``recall_vs_exact`` (see :func:`recall_vs_exact`) on up to this many queries.
      seed: seed of k-means, IVF-PQ training and the recall query subset.

    Returns:
      ``{"test_vs_train": {...}, "test_vs_test": {...}, "clustering": {"nmi", "ami",
      "n_clusters"}, "index": {"type", ...IVF-PQ parameters}}`` where each protocol dict
      holds ``precision_at_1, r_precision, map_at_r, recall_at_{k}..., knn_accuracy,
      n_queries, n_excluded`` (and ``recall_vs_exact`` for IVF-PQ). All values are
      JSON-serialisable Python numbers.
    """
    if index not in INDEX_TYPES:
        raise ValueError(f"unknown index type {index!r}; expected one of {INDEX_TYPES}")
    tr = _as_embeddings(train_emb, "train_emb")
    te = _as_embeddings(test_emb, "test_emb")
    _check_same_dim(te, tr, "test_emb", "train_emb")
    trl = _as_labels(train_labels, tr.shape[0], "train_labels", "train_emb")
    tel = _as_labels(test_labels, te.shape[0], "test_labels", "test_emb")
    common = dict(ks=ks, knn_k=knn_k, chunk_entries=chunk_entries, progress=progress)

    out: dict[str, dict[str, Any]] = {}
    index_info: dict[str, Any] = {"type": index}
    for name, refs, ref_labels in (("test_vs_train", tr, trl), ("test_vs_test", None, None)):
        base = te if refs is None else refs
        if index == "flat":
            idx = build_index(base)
        else:
            idx = build_index(base, index="ivfpq", nlist=nlist, m=m, nbits=nbits,
                              nprobe=nprobe, seed=seed)
            index_info[name] = {k: v for k, v in index_params(idx).items() if k != "type"}
        res = retrieval_metrics(te, tel, refs, ref_labels, index=idx, desc=name, **common)
        if index == "ivfpq":
            res["recall_vs_exact"] = recall_vs_exact(
                idx, base, te, k=recall_k, exclude_self=refs is None,
                max_queries=recall_max_queries, seed=seed,
            )
        out[name] = res
    if clustering:
        out["clustering"] = clustering_metrics(te, tel, seed=seed)
    out["index"] = index_info
    return out


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def _fmt(value) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "nan" if math.isnan(value) else f"{float(value):.4f}"
    return str(value)


def flatten(d: Mapping, sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (nested dicts joined with ``sep``)."""
    flat: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, sep, name + sep))
        else:
            flat[name] = value
    return flat


def write_report(
    run_dir,
    metrics: Mapping[str, Any],
    *,
    config: Mapping[str, Any] | None = None,
    pictures: Sequence[str] = ("tsne.png", "curves.png", "neighbours.png"),
    dataset_note: str | None = None,
    title: str = "jaxmetric evaluation report",
) -> pathlib.Path:
    """Write ``run_dir/report.md``: metrics tables, existing pictures, configuration.

    Each top-level section of ``metrics`` whose value is a dict (e.g. the output of
    :func:`evaluate_embeddings`) becomes a two-column table (nested dicts are flattened
    with dots); top-level scalars go in a "summary" table. Pictures are embedded as
    markdown images, in the given order, only if the file exists in ``run_dir``.

    Args:
      run_dir: run directory (created if missing).
      metrics: nested dict of numbers.
      config: optional run configuration, dumped as JSON at the end. Its
        ``"dataset_note"`` entry is used when ``dataset_note`` is not given.
      pictures: file names, relative to ``run_dir``.
      dataset_note: e.g. ``"CIFAR-10 (JPEG q75 copy)"``; printed as "Accuracy is measured
        on ...".
      title: top heading.

    Returns:
      The path of the written report.
    """
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a dict; got {type(metrics).__name__}")
    if isinstance(pictures, str):
        raise TypeError("pictures must be a sequence of file names, not a single string")
    run_dir = pathlib.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if dataset_note is None and config is not None:
        dataset_note = config.get("dataset_note")

    lines = [f"# {title}", ""]
    if dataset_note:
        lines += [f"Accuracy is measured on {dataset_note}.", ""]

    scalars = {k: v for k, v in metrics.items() if not isinstance(v, Mapping)}
    sections = [(k, v) for k, v in metrics.items() if isinstance(v, Mapping)]
    if scalars:
        sections.insert(0, ("summary", scalars))
    if sections:
        lines += ["## Metrics", ""]
    for name, section in sections:
        flat = flatten(section)
        if not flat:
            continue
        lines += [f"### {name}", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {key} | {_fmt(value)} |" for key, value in flat.items()]
        lines.append("")

    present = [p for p in pictures if (run_dir / p).is_file()]
    if present:
        lines += ["## Pictures", ""]
        for p in present:
            lines += [f"![{pathlib.Path(p).stem}]({p})", ""]

    if config is not None:
        lines += ["## Configuration", "", "```json",
                  json.dumps(dict(config), indent=2, sort_keys=True, default=str), "```", ""]

    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


# --------------------------------------------------------------------------------------
# Command-line entry point
# --------------------------------------------------------------------------------------
# ``python -m jaxmetric.evaluate RUN_DIR`` re-evaluates a saved run: restore its latest
# checkpoint, embed, score, draw and write the report. The glue lives in
# :mod:`jaxmetric.report`, which also serves the training CLI.

if __name__ == "__main__":
    import sys

    from jaxmetric.report import main

    sys.exit(main())
