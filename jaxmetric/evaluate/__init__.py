"""Retrieval evaluation of learned embeddings.

Metric learning is judged by retrieval: embed a query set and a reference set, find each
query's nearest references, and score how many of them share the query's class. One
concern per module, all names re-exported here:

* :mod:`~jaxmetric.evaluate.embedding` -- :func:`embed` runs a (jitted) embedding
  function over a dataset in fixed-shape batches and L2-normalises the result
  (:func:`l2_normalize`);
* :mod:`~jaxmetric.evaluate.knn` -- a thin FAISS layer: :func:`build_index`,
  :func:`search`, :func:`knn_search` (exact ``IndexFlatL2`` or approximate
  ``IndexIVFPQ``) with leave-one-out self-exclusion, and :func:`recall_vs_exact` to
  measure what the approximation loses;
* :mod:`~jaxmetric.evaluate.metrics` -- the per-query scores of pytorch-metric-learning's
  ``AccuracyCalculator`` (precision@1, R-precision, MAP@R) plus Recall@K and k-NN
  classification accuracy (:func:`per_query_metrics`);
* :mod:`~jaxmetric.evaluate.protocols` -- :func:`retrieval_metrics` (one protocol),
  :func:`clustering_metrics` (NMI/AMI of k-means clusters) and
  :func:`evaluate_embeddings`, which reports both protocols (test queries against the
  training set, and test-vs-test leave-one-out) and the clustering.

The markdown report of a run is written by :mod:`jaxmetric.report`, and
``python -m jaxmetric.report RUN_DIR`` re-evaluates a saved run (see
:func:`jaxmetric.report.main`).

Distances are squared Euclidean. For L2-normalised embeddings (what :func:`embed`
returns) the ranking equals the cosine-similarity ranking, since
``||x - y||^2 = 2 - 2 <x, y>``.

FAISS, scikit-learn and tqdm are optional dependencies (``pip install jaxmetric[eval]``)
and are imported only inside the functions that need them. Importing this package needs
only NumPy: it never imports the training, plotting or report code.

References:
  Musgrave, Belongie, Lim. "A Metric Learning Reality Check". ECCV 2020.
    https://arxiv.org/abs/2003.08505
  Jegou, Douze, Schmid. "Product Quantization for Nearest Neighbor Search". TPAMI 2011.
  Johnson, Douze, Jegou. "Billion-scale similarity search with GPUs" (FAISS). 2017.
"""

from jaxmetric.evaluate.embedding import embed, l2_normalize
from jaxmetric.evaluate.knn import (
    INDEX_TYPES,
    build_index,
    index_params,
    knn_search,
    neighbour_recall,
    recall_vs_exact,
    search,
)
from jaxmetric.evaluate.metrics import DEFAULT_CHUNK_ENTRIES, per_query_metrics, ranking_scores
from jaxmetric.evaluate.protocols import (
    clustering_metrics,
    evaluate_embeddings,
    retrieval_metrics,
)

__all__ = [
    "DEFAULT_CHUNK_ENTRIES",
    "INDEX_TYPES",
    "build_index",
    "clustering_metrics",
    "embed",
    "evaluate_embeddings",
    "index_params",
    "knn_search",
    "l2_normalize",
    "neighbour_recall",
    "per_query_metrics",
    "ranking_scores",
    "recall_vs_exact",
    "retrieval_metrics",
    "search",
]
