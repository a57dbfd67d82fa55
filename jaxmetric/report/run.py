"""Evaluate a trained run: embed both splits, score, draw the pictures, write the files.

The glue between :mod:`jaxmetric.train` (the model), :mod:`jaxmetric.evaluate` (FAISS
retrieval metrics), :mod:`jaxmetric.visualize` (pictures) and
:mod:`jaxmetric.report.markdown` (``report.md``). Training code is imported only inside
the functions that use a trained state, so that importing this module stays light.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxmetric import distributed, evaluate, visualize
from jaxmetric.report.markdown import write_report
from jaxmetric.utils import write_atomic

__all__ = [
    "EMBED_BATCH",
    "embed_splits",
    "evaluate_state",
    "precision_at_1_hook",
    "summary_line",
]

EMBED_BATCH = 1024


def embed_splits(state, dataset, *, mesh=None, progress: bool = True):
    """L2-normalised float32 embeddings of the training and test images."""
    from jaxmetric import train

    embed_fn = train.make_embed_fn(state, mesh=mesh)
    batch = EMBED_BATCH
    if mesh is not None:
        batch = -(-batch // mesh.size) * mesh.size
    train_emb = evaluate.embed(embed_fn, dataset.train.images, batch_size=batch,
                               progress=progress, desc="embed train")
    test_emb = evaluate.embed(embed_fn, dataset.test.images, batch_size=batch,
                              progress=progress, desc="embed test")
    return train_emb, test_emb


def precision_at_1_hook(dataset, *, mesh=None, progress: bool = False):
    """``hook(state, epoch) -> {"precision_at_1": ...}`` for :func:`train.fit`.

    Test queries against the training set with an exact FAISS index (the lecture's P@1);
    computed on process 0 and broadcast, so every process logs the same record.
    """

    def hook(state, epoch):
        train_emb, test_emb = embed_splits(state, dataset, mesh=mesh, progress=progress)
        p1 = 0.0
        if jax.process_index() == 0:
            m = evaluate.retrieval_metrics(
                test_emb, dataset.test.labels, train_emb, dataset.train.labels, ks=(1,)
            )
            p1 = float(m["precision_at_1"])
        p1 = float(distributed.broadcast_from_primary(np.float32(p1)))
        return {"precision_at_1": p1}

    return hook


def _read_records(path: pathlib.Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
) -> dict:
    """Embed, score, draw and report a trained ``state``; returns the metrics dict.

    Every process takes part in embedding; process 0 alone computes the metrics and
    writes files (the others return an empty dict). The data is named in the report and
    in ``metrics["run"]["dataset"]`` by ``dataset.description`` where it has one.
    """
    run_dir = pathlib.Path(run_dir)
    train_emb, test_emb = embed_splits(state, dataset, mesh=mesh, progress=progress)
    if jax.process_index() != 0:
        return {}
    config = dict(config or {})
    note = getattr(dataset, "description", None)
    metrics = evaluate.evaluate_embeddings(
        train_emb, dataset.train.labels, test_emb, dataset.test.labels, progress=progress
    )
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
    visualize.plot_retrieval_examples(
        dataset.test.images, dataset.test.labels, test_emb,
        dataset.train.images, dataset.train.labels, train_emb,
        run_dir / "neighbours.png", class_names=names,
    )
    write_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=2, default=float) + "\n")
    write_report(run_dir, metrics, config=config, dataset_note=note,
                 title=f"jaxmetric run {run_dir.name}")
    return metrics


def summary_line(metrics: Mapping[str, Any]) -> str:
    """One line of the headline numbers of :func:`evaluate_state`'s metrics."""
    return (f"precision@1 {metrics['test_vs_train']['precision_at_1']:.4f} (test vs train), "
            f"MAP@R {metrics['test_vs_test']['map_at_r']:.4f} (test vs test)")
