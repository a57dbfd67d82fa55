"""Use a trained run: embed images, search a persistent FAISS index, answer "unknown".

* :mod:`~jaxmetric.search.embedder` -- :class:`Embedder` (a run as an object: images,
  files, folder trees and archives to embeddings with the run's own preprocessing,
  streamed in batches on every local device; its weights' fingerprint; a ``jax.export``
  artefact) and :func:`save_embeddings`;
* :mod:`~jaxmetric.search.sources` -- the images of a folder tree or a tar archive, one
  at a time, labelled by their class folder;
* :mod:`~jaxmetric.search.index` -- :class:`Index`: flat / IVF-PQ / HNSW over Euclidean
  distances, search, classify, atomic save and checked load;
* :mod:`~jaxmetric.search.thresholds` -- distance thresholds (target precision, target
  false-match rate, best F1), :func:`match` (open set), ROC AUC, FNMR@FMR, mAP, MRR,
  precision@k, mAP@k;
* :mod:`~jaxmetric.search.cli` -- ``python -m jaxmetric.search build | query | calibrate``.

Only what a function needs is imported when it runs (FAISS, the training code, Pillow).
"""

from jaxmetric.search.embedder import Embedded, Embedder, save_embeddings
from jaxmetric.search.index import KINDS, Index, SearchError
from jaxmetric.search.thresholds import (
    UNKNOWN,
    Threshold,
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

__all__ = [
    "KINDS",
    "UNKNOWN",
    "Embedded",
    "Embedder",
    "Index",
    "SearchError",
    "Threshold",
    "fnmr_at_fmr",
    "match",
    "nearest_comparisons",
    "pair_distances",
    "retrieval_scores",
    "roc_auc",
    "save_embeddings",
    "threshold_best_f1",
    "threshold_for_fmr",
    "threshold_for_precision",
]
