"""Evaluate a trained run: embed both splits, score, draw the pictures, write the files.

The glue between :mod:`jaxmetric.train` (the model), :mod:`jaxmetric.evaluate` (FAISS
retrieval metrics), :mod:`jaxmetric.report.visualize` (pictures) and
:mod:`jaxmetric.report.markdown` (``report.md``). Training code is imported only inside
the functions that use a trained state, so that importing this module stays light.
"""

from __future__ import annotations

import json
import logging
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxmetric import distributed, evaluate
from jaxmetric.report import visualize
from jaxmetric.report.markdown import write_report
from jaxmetric.utils import check_choice, read_jsonl, write_atomic

__all__ = [
    "EMBED_BATCH",
    "RETRIEVAL_SCORES",
    "embed_splits",
    "evaluate_state",
    "precision_at_1_hook",
    "retrieval_hook",
    "summary_line",
]

log = logging.getLogger("jaxmetric.report")

EMBED_BATCH = 1024


def embed_splits(state, dataset, *, mesh=None, progress: bool = True):
    """L2-normalised float32 embeddings of the training and test images (the training
    ones None when the data set has none: a held-out side without a gallery)."""
    from jaxmetric import train

    embed_fn = train.make_embed_fn(state, mesh=mesh)
    batch = EMBED_BATCH
    if mesh is not None:
        batch = -(-batch // mesh.size) * mesh.size
    train_emb = None
    if len(dataset.train):
        train_emb = evaluate.embed(embed_fn, dataset.train.images, batch_size=batch,
                                   progress=progress, desc="embed train")
    test_emb = evaluate.embed(embed_fn, dataset.test.images, batch_size=batch,
                              progress=progress, desc="embed test")
    return train_emb, test_emb


RETRIEVAL_SCORES = ("precision_at_1", "recall_at_1", "map_at_r", "r_precision")
"""The scores :func:`retrieval_hook` can measure (keys of
:func:`jaxmetric.evaluate.retrieval_metrics`)."""


def retrieval_hook(dataset, metric: str = "precision_at_1", *, mesh=None,
                   progress: bool = False, what: str | None = None):
    """``hook(state, epoch) -> {metric: ..., metric + "_of": ...}`` for :func:`train.fit`:
    one retrieval score of :data:`RETRIEVAL_SCORES` per evaluated epoch.

    Test queries against the training set with an exact FAISS index, or leave-one-out
    among the test images when ``dataset`` has no training images (the held-out side of a
    :class:`jaxmetric.data.splits.ClassSplit` without a gallery). For the class-disjoint
    protocol pass the held-out side (``ClassSplit.eval``): the score is then measured on
    classes never trained on. ``<metric>_of`` says what was measured (``what``, else the
    protocol); computed on process 0 and broadcast, so every process logs the same record.
    """
    check_choice("metric", metric, RETRIEVAL_SCORES)
    leave_one_out = len(dataset.train) == 0
    label = what or ("test vs test, leave-one-out" if leave_one_out else "test vs train")

    def hook(state, epoch):
        train_emb, test_emb = embed_splits(state, dataset, mesh=mesh, progress=progress)
        score = 0.0
        if jax.process_index() == 0:
            refs = (None, None) if leave_one_out else (train_emb, dataset.train.labels)
            m = evaluate.retrieval_metrics(test_emb, dataset.test.labels, *refs, ks=(1,))
            score = float(m[metric])
        score = float(distributed.broadcast_from_primary(np.float32(score)))
        return {metric: score, f"{metric}_of": label}

    return hook


def precision_at_1_hook(dataset, *, mesh=None, progress: bool = False, what: str | None = None):
    """``hook(state, epoch) -> {"precision_at_1": ..., "precision_at_1_of": ...}`` for
    :func:`train.fit`: :func:`retrieval_hook` of the lecture's P@1."""
    return retrieval_hook(dataset, "precision_at_1", mesh=mesh, progress=progress, what=what)


def _read_records(path: pathlib.Path) -> list[dict]:
    """The epoch records of ``metrics.jsonl``; a torn last line (a crash mid-write) is
    left out with a WARNING naming the file."""
    records, torn = read_jsonl(path)
    if torn is not None:
        log.warning("%s: left out a torn last line (a write cut short by a crash): %.60r",
                    path, torn)
    return records


def evaluate_state(
    state,
    dataset,
    run_dir,
    *,
    config: Mapping[str, Any] | None = None,
    epoch: int | None = None,
    mesh=None,
    tsne_points: int = 5000,
    progress: bool = True,
    split: Mapping[str, Any] | None = None,
) -> dict:
    """Embed, score, draw and report a trained ``state``; returns the metrics dict.

    Every process takes part in embedding; process 0 alone computes the metrics and
    writes files (the others return an empty dict). The data is named in the report and
    in ``metrics["run"]["dataset"]`` by ``dataset.description`` where it has one.

    For the class-disjoint protocol pass the held-out side of a
    :class:`jaxmetric.data.splits.ClassSplit` as ``dataset`` and its ``describe()`` as
    ``split`` (recorded as ``metrics["split"]``): every number is then measured on
    classes never trained on. A ``dataset`` without training images (no gallery) gets
    the leave-one-out protocol only, and its neighbours picture shows test images
    retrieving other test images.
    """
    run_dir = pathlib.Path(run_dir)
    train_emb, test_emb = embed_splits(state, dataset, mesh=mesh, progress=progress)
    if jax.process_index() != 0:
        return {}
    config = dict(config or {})
    note = getattr(dataset, "description", None)
    gallery = train_emb is not None
    metrics = evaluate.evaluate_embeddings(
        train_emb, dataset.train.labels if gallery else None, test_emb, dataset.test.labels,
        progress=progress)
    if split is not None:
        metrics["split"] = dict(split)
    metrics["run"] = {
        "epoch": epoch,
        "step": int(state.step),
        "num_train": len(dataset.train),
        "num_test": len(dataset.test),
        "dataset": note,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    names = list(dataset.class_names)
    if tsne_points > 0:
        visualize.plot_tsne(test_emb, dataset.test.labels, run_dir / "tsne.png",
                            class_names=names, max_points=tsne_points, progress=progress)
    records = _read_records(run_dir / "metrics.jsonl")
    if records:
        visualize.plot_curves(records, run_dir / "curves.png")
    refs = dataset.train if gallery else dataset.test
    visualize.plot_retrieval_examples(
        dataset.test.images, dataset.test.labels, test_emb,
        refs.images, refs.labels, train_emb if gallery else test_emb,
        run_dir / "neighbours.png", class_names=names, exclude_self=not gallery,
    )
    write_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=2, default=float) + "\n")
    write_report(run_dir, metrics, config=config, dataset_note=note,
                 title=f"jaxmetric run {run_dir.name}")
    return metrics


def summary_line(metrics: Mapping[str, Any]) -> str:
    """One line of the headline numbers of :func:`evaluate_state`'s metrics."""
    loo = metrics["test_vs_test"]
    where = " on the held-out classes" if "split" in metrics else ""
    if "test_vs_train" not in metrics:
        return (f"precision@1 {loo['precision_at_1']:.4f}, recall@4 "
                f"{loo.get('recall_at_4', float('nan')):.4f}, MAP@R {loo['map_at_r']:.4f} "
                f"(test vs test, leave-one-out{where})")
    return (f"precision@1 {metrics['test_vs_train']['precision_at_1']:.4f} (test vs train), "
            f"MAP@R {loo['map_at_r']:.4f} (test vs test){where}")
