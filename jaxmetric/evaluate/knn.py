"""FAISS nearest-neighbour search: indexes, k-NN search with leave-one-out, recall vs exact.

* :func:`build_index` -- exact ``IndexFlatL2`` or approximate ``IndexIVFPQ`` over the
  references; :func:`index_params` reads back an index's parameters;
* :func:`search` / :func:`knn_search` -- the k nearest references of each query, with
  self-exclusion by index for leave-one-out;
* :func:`recall_vs_exact` / :func:`neighbour_recall` -- how many of the exact neighbours
  an approximate index finds.

Distances are squared Euclidean. FAISS is optional (``pip install jaxmetric[eval]``) and
imported only when a function here runs.

References:
  Jegou, Douze, Schmid. "Product Quantization for Nearest Neighbor Search". TPAMI 2011.
  Johnson, Douze, Jegou. "Billion-scale similarity search with GPUs" (FAISS). 2017.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from jaxmetric.utils import (
    INSTALL_HINT,
    as_embeddings,
    check_positive_int,
    check_same_dim,
    require,
)

__all__ = [
    "INDEX_TYPES",
    "build_index",
    "import_faiss",
    "index_params",
    "knn_search",
    "neighbour_recall",
    "recall_vs_exact",
    "search",
]

INDEX_TYPES = ("flat", "ivfpq")


def import_faiss():
    """The ``faiss`` module, or an ImportError that says how to install it."""
    return require("faiss", "jaxmetric.evaluate (nearest-neighbour search, k-means)",
                   install=f"{INSTALL_HINT}` or `pip install faiss-cpu")


def _default_m(d: int) -> int:
    """Largest divisor of ``d`` not above ``d // 4`` (4+ dims per PQ sub-vector)."""
    target = max(1, d // 4)
    for m in range(target, 0, -1):
        if d % m == 0:
            return m
    return 1  # pragma: no cover - m = 1 always divides


def _resolve_ivfpq(n: int, d: int, nlist, m, nbits, nprobe) -> dict[str, int]:
    """Fill in IVF-PQ defaults for ``n`` references of dimension ``d`` and validate."""
    nbits = check_positive_int("nbits", nbits)
    if nlist is None:
        # ~4 sqrt(N) lists (FAISS guideline), capped so each list gets >= 39 training points.
        nlist = int(min(4 * math.sqrt(n), n // 39))
        nlist = max(1, nlist)
    nlist = check_positive_int("nlist", nlist)
    m = _default_m(d) if m is None else check_positive_int("m", m)
    if d % m:
        raise ValueError(f"m (number of PQ sub-vectors) must divide the dimension {d}; got {m}")
    if nprobe is None:
        nprobe = max(1, nlist // 8)
    nprobe = check_positive_int("nprobe", nprobe)
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


TRAIN_POINTS_PER_CELL = 64
"""The coarse quantiser of an IVF-PQ index trains on at most this many points per cell."""


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
    ``nprobe`` closest cells. It is trained on the references themselves (the coarse
    k-means on a sample of at most :data:`TRAIN_POINTS_PER_CELL` per cell).

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
    faiss = import_faiss()
    refs = as_embeddings(references, "references")
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
        # The coarse k-means trains on a sample of at most 64 points per cell (FAISS's
        # default is 256): the same cells up to ~65,000 references (where 64 * nlist
        # covers them all), and minutes rather than a quarter of an hour at a million.
        idx.cp.max_points_per_centroid = TRAIN_POINTS_PER_CELL
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
    faiss = import_faiss()
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
    q = as_embeddings(queries, "queries")
    k = check_positive_int("k", k)
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
    q = as_embeddings(queries, "queries")
    refs = as_embeddings(references, "references")
    check_same_dim(q, refs, "queries", "references")
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
    faiss = import_faiss()
    refs = as_embeddings(references, "references")
    q = as_embeddings(queries, "queries")
    check_same_dim(q, refs, "queries", "references")
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

