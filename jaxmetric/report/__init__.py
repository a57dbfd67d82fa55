"""Evaluate a trained run and write its report.

The top floor of jaxmetric: it uses the training code (the model), the data and
:mod:`jaxmetric.evaluate` (FAISS retrieval metrics), and nothing below imports it. For a
run folder it writes

    metrics.json     both retrieval protocols + clustering, with epoch and data note
    report.md        the metrics tables and the pictures
    tsne.png         openTSNE map of the test embeddings
    curves.png       training curves from metrics.jsonl
    neighbours.png   test queries and their nearest training images

* :mod:`~jaxmetric.report.visualize` -- the pictures: t-SNE map, training curves,
  retrieval grid (matplotlib and openTSNE only; importing it loads no training code);
* :mod:`~jaxmetric.report.markdown` -- :func:`write_report`, the ``report.md`` writer;
* :mod:`~jaxmetric.report.run` -- :func:`evaluate_state` (embed, score, draw, write),
  :func:`precision_at_1_hook` for the per-epoch P@1 during training (and
  :func:`retrieval_hook` for another per-epoch score), :func:`embed_splits`,
  :func:`summary_line`; the data is named by its ``Dataset.description``;
* :mod:`~jaxmetric.report.cli` -- :func:`main`, the command line of
  ``python -m jaxmetric.report``.

Re-evaluate a saved run without training (latest checkpoint)::

    python -m jaxmetric.report runs/cifar10-triplet-20261129-101500
    python -m jaxmetric.report RUN_DIR --data-dir ../shared/data/cifar10-jpeg.tar.xz
"""

from jaxmetric.report.cli import main
from jaxmetric.report.markdown import write_report
from jaxmetric.report.run import (
    EMBED_BATCH,
    embed_splits,
    evaluate_state,
    precision_at_1_hook,
    retrieval_hook,
    summary_line,
)

__all__ = [
    "EMBED_BATCH",
    "embed_splits",
    "evaluate_state",
    "main",
    "precision_at_1_hook",
    "retrieval_hook",
    "summary_line",
    "write_report",
]
