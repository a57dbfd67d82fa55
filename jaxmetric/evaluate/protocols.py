"""The evaluation protocols: one retrieval protocol, both of them, and k-means clustering.

* :func:`retrieval_metrics` -- queries against references (or leave-one-out on the
  queries), searched with FAISS in memory-bounded chunks and scored with
  :func:`~jaxmetric.evaluate.per_query_metrics`;
* :func:`clustering_metrics` -- NMI/AMI of FAISS k-means clusters against the labels;
* :func:`evaluate_embeddings` -- test vs train, test vs test (leave-one-out) and
  clustering in one dict.

FAISS and scikit-learn are optional (``pip install jaxmetric[eval]``) and imported only
when a function here runs.

References:
  Musgrave, Belongie, Lim. "A Metric Learning Reality Check". ECCV 2020.
    https://arxiv.org/abs/2003.08505
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxmetric.evaluate.knn import (
    INDEX_TYPES,
    build_index,
    import_faiss,
    index_params,
    recall_vs_exact,
    search,
)
from jaxmetric.evaluate.metrics import DEFAULT_CHUNK_ENTRIES, per_query_metrics
from jaxmetric.utils import (
    as_embeddings,
    as_labels,
    check_ks,
    check_positive_int,
    check_same_dim,
    progress_bar,
    require,
)

__all__ = ["clustering_metrics", "evaluate_embeddings", "retrieval_metrics"]


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
      knn_k: neighbours voting in k-NN classification (ties: see
        :func:`~jaxmetric.evaluate.per_query_metrics`).
      index: ``"flat"`` / ``"ivfpq"`` (see :func:`~jaxmetric.evaluate.build_index`) or a
        prebuilt FAISS index over ``references`` (or over ``queries`` for leave-one-out).
      chunk_entries: bound on ``queries-per-chunk * neighbours-per-query``.
      progress: show a tqdm bar over query chunks.
      desc: its label.
      **index_kwargs: IVF-PQ options of :func:`~jaxmetric.evaluate.build_index`
        (``nlist, m, nbits, nprobe, seed``).

    Returns:
      A dict of Python floats: ``precision_at_1, r_precision, map_at_r, recall_at_{k}...,
      knn_accuracy`` and the ints ``n_queries`` (scored) and ``n_excluded``. All scores are
      NaN if every query is excluded.
    """
    ks = check_ks(ks)
    knn_k = check_positive_int("knn_k", knn_k)
    chunk_entries = check_positive_int("chunk_entries", chunk_entries)
    q = as_embeddings(queries, "queries")
    ql = as_labels(query_labels, q.shape[0], "query_labels", "queries")
    leave_one_out = references is None
    if leave_one_out:
        if reference_labels is not None:
            raise ValueError("reference_labels given without references")
        refs, rl = q, ql
    else:
        if reference_labels is None:
            raise ValueError("references given without reference_labels")
        refs = as_embeddings(references, "references")
        rl = as_labels(reference_labels, refs.shape[0], "reference_labels", "references")
        check_same_dim(q, refs, "queries", "references")

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
    bar = progress_bar(total=n_scored, desc=desc, unit="query", disable=not progress, leave=False)
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
    faiss = import_faiss()
    metrics = require("sklearn.metrics", "NMI/AMI")
    x = as_embeddings(embeddings, "embeddings")
    y = as_labels(labels, x.shape[0], "labels", "embeddings")
    (codes,) = _encode_labels(y)
    if n_clusters is None:
        n_clusters = int(codes.max()) + 1
    n_clusters = check_positive_int("n_clusters", n_clusters)
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

    With ``train_emb=None`` (no reference set: the class-disjoint protocol of
    CUB-200-2011 or Cars196, where every image of a test class is a query) only
    ``test_vs_test`` and the clustering are computed.

    Args:
      train_emb, train_labels: ``(N, D)`` and ``(N,)`` reference set, or both None.
      test_emb, test_labels: ``(Q, D)`` and ``(Q,)`` query set.
      ks, knn_k, chunk_entries, progress: see :func:`retrieval_metrics`.
      index: ``"flat"`` (exact) or ``"ivfpq"``; ``nlist, m, nbits, nprobe`` configure
        IVF-PQ (see :func:`~jaxmetric.evaluate.build_index`; one index per protocol is
        trained).
      clustering: also compute NMI/AMI.
      recall_k, recall_max_queries: for IVF-PQ, each protocol also reports
        ``recall_vs_exact`` (see :func:`~jaxmetric.evaluate.recall_vs_exact`) on up to
        this many queries.
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
    if (train_emb is None) != (train_labels is None):
        raise ValueError("train_emb and train_labels go together: give both or neither")
    te = as_embeddings(test_emb, "test_emb")
    tel = as_labels(test_labels, te.shape[0], "test_labels", "test_emb")
    protocols: list[tuple[str, Any, Any]] = []
    if train_emb is not None:
        tr = as_embeddings(train_emb, "train_emb")
        check_same_dim(te, tr, "test_emb", "train_emb")
        trl = as_labels(train_labels, tr.shape[0], "train_labels", "train_emb")
        protocols.append(("test_vs_train", tr, trl))
    protocols.append(("test_vs_test", None, None))
    common = dict(ks=ks, knn_k=knn_k, chunk_entries=chunk_entries, progress=progress)

    out: dict[str, dict[str, Any]] = {}
    index_info: dict[str, Any] = {"type": index}
    for name, refs, ref_labels in protocols:
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

