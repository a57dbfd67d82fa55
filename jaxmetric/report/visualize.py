"""Pictures of a metric-learning run: t-SNE map, training curves, retrieval grid.

Everything renders with matplotlib's non-interactive Agg backend straight to PNG files;
no window is ever opened. matplotlib, openTSNE and FAISS are optional dependencies
(``pip install jaxmetric[eval]``).

* :func:`tsne_embed` / :func:`plot_tsne` -- 2-D map of the embedding space with
  openTSNE's FFT-accelerated t-SNE (Linderman et al. 2019), coloured by class.
* :func:`plot_curves` -- loss, active-triplet fraction, precision@1, ... against
  step/epoch from ``metrics.jsonl`` records.
* :func:`plot_neighbours` -- query images and their nearest references, framed green
  (same class) or red (different class); :func:`find_neighbours` and
  :func:`plot_retrieval_examples` pick those neighbours with FAISS.

References:
  van der Maaten, Hinton. "Visualizing Data using t-SNE". JMLR 2008.
  Linderman et al. "Fast interpolation-based t-SNE for improved visualization of
    single-cell RNA-seq data". Nature Methods 2019.
  Policar, Strazar, Zupan. "openTSNE: a modular Python library for t-SNE dimensionality
    reduction and embedding". JSS 2024.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxmetric import evaluate
from jaxmetric.utils import (
    as_embeddings,
    as_labels,
    check_positive_int,
    flatten,
    progress_bar,
    require,
)

__all__ = [
    "find_neighbours",
    "plot_curves",
    "plot_neighbours",
    "plot_retrieval_examples",
    "plot_tsne",
    "tsne_embed",
]

# Frame colours of retrieved images (RGB, uint8).
MATCH_COLOUR = (0, 170, 0)
MISMATCH_COLOUR = (220, 0, 0)

# Record keys used as x axes by plot_curves, never plotted as curves themselves.
_X_KEYS = ("step", "epoch")


def _pyplot():
    """matplotlib.pyplot on the Agg backend (file output only)."""
    require("matplotlib", "plotting").use("Agg")
    return require("matplotlib.pyplot", "plotting")


def _n_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


def _save(fig, path) -> pathlib.Path:
    plt = _pyplot()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, format="png", dpi=fig.dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def _class_name(label, class_names) -> str:
    if class_names is None:
        return str(label)
    if isinstance(class_names, Mapping):
        return str(class_names.get(label, label))
    try:
        return str(class_names[int(label)])
    except (IndexError, ValueError, TypeError):
        return str(label)


def _check_class_names(labels: np.ndarray, class_names) -> None:
    if class_names is None or isinstance(class_names, Mapping):
        return
    if isinstance(class_names, str):
        raise TypeError("class_names must be a sequence or mapping of names, not a string")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(
            f"a class_names sequence needs integer labels to index it; got dtype {labels.dtype}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise ValueError(
            f"labels span [{labels.min()}, {labels.max()}] but class_names has only "
            f"{len(class_names)} entries"
        )


def _class_colours(n: int):
    """``n`` distinguishable RGBA colours (tab10 / tab20, else evenly spaced hues)."""
    plt = _pyplot()
    if n <= 10:
        cmap = plt.get_cmap("tab10")
        return [cmap(i) for i in range(n)]
    if n <= 20:
        cmap = plt.get_cmap("tab20")
        return [cmap(i) for i in range(n)]
    cmap = plt.get_cmap("hsv")
    return [cmap(i / n) for i in range(n)]


# --------------------------------------------------------------------------------------
# t-SNE
# --------------------------------------------------------------------------------------


class _TqdmCallback:
    """openTSNE callback advancing a tqdm bar across both optimisation phases.

    openTSNE calls ``optimization_about_to_start`` before each phase (early exaggeration,
    then the main phase) and ``__call__(iteration, error, embedding)`` every
    ``callbacks_every_iters`` iterations, with ``iteration`` restarting at each phase.
    """

    def __init__(self, bar):
        self.bar = bar
        self.offset = 0
        self.last = 0

    def optimization_about_to_start(self):
        self.offset += self.last
        self.last = 0

    def __call__(self, iteration, error, embedding):
        self.last = iteration
        self.bar.n = self.offset + iteration
        self.bar.set_postfix(kl=f"{error:.3f}", refresh=False)
        self.bar.refresh()
        return False


def tsne_embed(
    embeddings,
    *,
    perplexity: float = 30.0,
    seed: int = 0,
    n_iter: int = 500,
    early_exaggeration_iter: int = 250,
    n_jobs: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """2-D t-SNE of ``embeddings`` with openTSNE (FFT-accelerated gradients).

    Uses PCA initialisation, ``negative_gradient_method="fft"`` and
    ``random_state=seed``, so the map is reproducible for a given thread count. The
    perplexity is capped at ``(N - 1) / 3`` (openTSNE's requirement for ``3 * perplexity``
    neighbours per point).

    Args:
      embeddings: ``(N, D)`` with ``N >= 4``.
      perplexity: effective number of neighbours.
      seed: random state of openTSNE.
      n_iter, early_exaggeration_iter: iterations of the main and the early-exaggeration
        phase.
      n_jobs: threads; default all CPUs available to this process.
      progress: tqdm bar over the optimisation iterations (the nearest-neighbour and
        affinity computation before it is not shown).

    Returns:
      ``(N, 2)`` float64 coordinates.
    """
    TSNE = require("openTSNE", "t-SNE").TSNE  # noqa: N806 - the class, imported lazily
    x = as_embeddings(embeddings, "embeddings")
    n = x.shape[0]
    if n < 4:
        raise ValueError(f"t-SNE needs at least 4 points; got {n}")
    if not perplexity > 0:
        raise ValueError(f"perplexity must be positive; got {perplexity}")
    perplexity = min(float(perplexity), (n - 1) / 3)
    n_iter = int(n_iter)
    early_exaggeration_iter = int(early_exaggeration_iter)
    if n_iter < 1 or early_exaggeration_iter < 0:
        raise ValueError("n_iter must be >= 1 and early_exaggeration_iter >= 0")

    bar = progress_bar(
        total=n_iter + early_exaggeration_iter, desc="t-SNE", unit="it",
        disable=not progress, leave=False,
    )
    every = max(1, min(25, n_iter, early_exaggeration_iter or n_iter))
    tsne = TSNE(
        n_components=2,
        perplexity=perplexity,
        n_iter=n_iter,
        early_exaggeration_iter=early_exaggeration_iter,
        initialization="pca",
        negative_gradient_method="fft",
        random_state=seed,
        n_jobs=_n_jobs() if n_jobs is None else int(n_jobs),
        callbacks=[_TqdmCallback(bar)] if progress else None,
        callbacks_every_iters=every,
        verbose=False,
    )
    try:
        result = tsne.fit(x)
    finally:
        bar.close()
    return np.asarray(result, dtype=np.float64)


def plot_tsne(
    embeddings,
    labels,
    path,
    *,
    class_names: Sequence[str] | Mapping[Any, str] | None = None,
    max_points: int = 5000,
    perplexity: float = 30.0,
    seed: int = 0,
    n_iter: int = 500,
    early_exaggeration_iter: int = 250,
    progress: bool = True,
    title: str | None = "t-SNE of the embeddings",
) -> pathlib.Path:
    """Scatter plot of a 2-D t-SNE map coloured by class, saved as PNG.

    If there are more than ``max_points`` points, a uniformly random subset of that size
    (``numpy.random.default_rng(seed)``) is embedded, so every run of the same data shows
    the same points.

    Args:
      embeddings: ``(N, D)``.
      labels: ``(N,)`` class labels.
      path: output PNG path (parent directories are created).
      class_names: legend names, a sequence indexed by integer label or a mapping
        label -> name; default the label values.
      max_points: subsample size.
      perplexity, seed, n_iter, early_exaggeration_iter, progress: see
        :func:`tsne_embed`.
      title: axes title (``None`` for none).

    Returns:
      ``path`` as a :class:`pathlib.Path`.
    """
    x = as_embeddings(embeddings, "embeddings")
    y = as_labels(labels, x.shape[0], "labels", "embeddings")
    max_points = check_positive_int("max_points", max_points)
    _check_class_names(y, class_names)
    if x.shape[0] > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(x.shape[0], max_points, replace=False))
        x, y = x[keep], y[keep]
    xy = tsne_embed(x, perplexity=perplexity, seed=seed, n_iter=n_iter,
                    early_exaggeration_iter=early_exaggeration_iter, progress=progress)

    plt = _pyplot()
    classes = np.unique(y)
    colours = _class_colours(len(classes))
    fig, ax = plt.subplots(figsize=(8, 8), dpi=100)
    size = 12 if len(y) < 1000 else 4
    for colour, c in zip(colours, classes, strict=True):
        sel = y == c
        ax.scatter(xy[sel, 0], xy[sel, 1], s=size, color=colour, alpha=0.75,
                   linewidths=0, label=_class_name(c, class_names))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_aspect("equal", adjustable="datalim")
    if title:
        ax.set_title(f"{title} ({len(y)} points)")
    if len(classes) <= 30:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5),
                  markerscale=2.0 if size >= 12 else 4.0, frameon=False, fontsize=9)
    return _save(fig, path)


# --------------------------------------------------------------------------------------
# Training curves
# --------------------------------------------------------------------------------------


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def plot_curves(metrics_records: Sequence[Mapping[str, Any]], path, *,
                ncols: int = 3) -> pathlib.Path:
    """Training curves from ``metrics.jsonl`` records, one panel per numeric key.

    Every numeric key other than ``step``/``epoch`` is plotted (nested dicts are flattened
    to ``outer/inner``) using only the records that contain it -- so precision@1 appears
    only at the epochs where it was evaluated. Its x axis is ``step`` if all those records
    have one, else ``epoch``, else the record's position among them. Keys seen in few
    records are drawn with markers.

    Args:
      metrics_records: list of dicts, e.g. ``{"epoch": 3, "step": 1200, "loss": 0.41,
        "active_fraction": 0.12}`` or ``{"epoch": 3, "precision_at_1": 0.83}``.
      path: output PNG path.
      ncols: panels per row.

    Returns:
      ``path`` as a :class:`pathlib.Path`.
    """
    if isinstance(metrics_records, Mapping) or not isinstance(metrics_records, Sequence):
        raise TypeError("metrics_records must be a list of dicts (one per metrics.jsonl line)")
    records = []
    for i, rec in enumerate(metrics_records):
        if not isinstance(rec, Mapping):
            raise TypeError(f"metrics_records[{i}] must be a dict; got {type(rec).__name__}")
        records.append(flatten(rec, "/"))
    keys: list[str] = []
    for rec in records:
        for key, value in rec.items():
            if key not in _X_KEYS and key not in keys and _is_number(value):
                keys.append(key)
    if not keys:
        raise ValueError(
            "no numeric metric found in metrics_records (besides 'step'/'epoch'); "
            "nothing to plot"
        )
    ncols = check_positive_int("ncols", ncols)

    plt = _pyplot()
    ncols = min(ncols, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), dpi=100,
                             squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):  # spare panels are hidden below
        rows = [r for r in records if _is_number(r.get(key))]
        ys = np.array([float(r[key]) for r in rows])
        xkey = next((k for k in _X_KEYS if all(_is_number(r.get(k)) for r in rows)), None)
        xs = np.array([float(r[xkey]) for r in rows]) if xkey else np.arange(len(rows))
        marker = "o" if len(rows) <= 50 else None
        ax.plot(xs, ys, marker=marker, markersize=3, linewidth=1.2)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel(xkey or "record")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------------------
# Retrieval grid
# --------------------------------------------------------------------------------------


def _as_images(x, name: str, ndim: int) -> np.ndarray:
    """Validate uint8 images with ``ndim`` axes (``... H, W, C``), adding C=1 if missing."""
    arr = np.asarray(x)
    if arr.dtype != np.uint8:
        raise TypeError(f"{name} must be uint8 images; got dtype {arr.dtype}")
    if arr.ndim == ndim - 1:
        arr = arr[..., None]
    if arr.ndim != ndim:
        shape = "(Q, H, W, C)" if ndim == 4 else "(Q, k, H, W, C)"
        raise ValueError(f"{name} must have shape {shape}; got {arr.shape}")
    if arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{name} must have 1, 3 or 4 channels; got {arr.shape[-1]}")
    return arr


def _framed(image: np.ndarray, colour, width: int) -> np.ndarray:
    """RGB copy of ``image (H, W, C)`` with a ``width``-pixel border of ``colour``."""
    rgb = image[..., :3] if image.shape[-1] != 1 else np.repeat(image, 3, axis=-1)
    out = np.empty((rgb.shape[0] + 2 * width, rgb.shape[1] + 2 * width, 3), np.uint8)
    out[...] = np.asarray(colour, np.uint8)
    out[width:width + rgb.shape[0], width:width + rgb.shape[1]] = rgb
    return out


def plot_neighbours(
    query_images,
    query_labels,
    neighbour_images,
    neighbour_labels,
    path,
    *,
    class_names: Sequence[str] | Mapping[Any, str] | None = None,
) -> pathlib.Path:
    """Retrieval grid: one row per query, then its neighbours in rank order.

    The query (first column) has a grey frame; each neighbour is framed green if its
    label equals the query's, red otherwise, and titled with its class name.

    Args:
      query_images: ``(Q, H, W, C)`` uint8, ``C`` in {1, 3, 4} (``(Q, H, W)`` = grey).
      query_labels: ``(Q,)``.
      neighbour_images: ``(Q, k, H, W, C)`` uint8 (same H, W, C).
      neighbour_labels: ``(Q, k)``.
      path: output PNG path.
      class_names: names for titles, sequence indexed by integer label or mapping.

    Returns:
      ``path`` as a :class:`pathlib.Path`.
    """
    qi = _as_images(query_images, "query_images", 4)
    ni = _as_images(neighbour_images, "neighbour_images", 5)
    ql = np.asarray(query_labels)
    nl = np.asarray(neighbour_labels)
    n_q = qi.shape[0]
    if n_q == 0:
        raise ValueError("query_images is empty; nothing to plot")
    if ql.shape != (n_q,):
        raise ValueError(f"query_labels must have shape (Q,) = ({n_q},); got {ql.shape}")
    if ni.shape[0] != n_q:
        raise ValueError(
            f"neighbour_images has {ni.shape[0]} queries but query_images has {n_q}"
        )
    if ni.shape[2:] != qi.shape[1:]:
        raise ValueError(
            f"neighbour images are {ni.shape[2:]} (H, W, C) but query images are {qi.shape[1:]}"
        )
    k = ni.shape[1]
    if k == 0:
        raise ValueError("neighbour_images has no neighbours (k = 0)")
    if nl.shape != (n_q, k):
        raise ValueError(f"neighbour_labels must have shape (Q, k) = ({n_q}, {k}); got {nl.shape}")
    _check_class_names(ql, class_names)
    _check_class_names(nl.reshape(-1), class_names)

    plt = _pyplot()
    h, w = qi.shape[1:3]
    width = max(1, round(min(h, w) / 12))
    cell = 1.2
    fig, axes = plt.subplots(n_q, k + 1, figsize=(cell * (k + 1), (cell + 0.25) * n_q),
                             dpi=100, squeeze=False)
    for r in range(n_q):
        ax = axes[r, 0]
        ax.imshow(_framed(qi[r], (128, 128, 128), width), interpolation="nearest")
        ax.set_title(f"query: {_class_name(ql[r], class_names)}", fontsize=7, fontweight="bold")
        for j in range(k):
            ok = nl[r, j] == ql[r]
            ax = axes[r, j + 1]
            ax.imshow(_framed(ni[r, j], MATCH_COLOUR if ok else MISMATCH_COLOUR, width),
                      interpolation="nearest")
            ax.set_title(f"{j + 1}: {_class_name(nl[r, j], class_names)}", fontsize=7,
                         color="green" if ok else "red")
    for ax in axes.flat:
        ax.set_axis_off()
    fig.tight_layout(pad=0.3)
    return _save(fig, path)


def find_neighbours(
    query_embeddings,
    reference_embeddings,
    k: int = 8,
    *,
    exclude_self: bool = False,
) -> np.ndarray:
    """Indices ``(Q, k)`` of each query's ``k`` nearest references (exact FAISS search).

    With ``exclude_self=True`` the queries must be the references and each query's own
    row is excluded by index (see :func:`jaxmetric.evaluate.search`).
    """
    _, idx = evaluate.knn_search(query_embeddings, reference_embeddings, k,
                                 exclude_self=exclude_self)
    return idx


def plot_retrieval_examples(
    query_images,
    query_labels,
    query_embeddings,
    reference_images,
    reference_labels,
    reference_embeddings,
    path,
    *,
    k: int = 8,
    n_queries: int = 8,
    seed: int = 0,
    exclude_self: bool = False,
    class_names: Sequence[str] | Mapping[Any, str] | None = None,
) -> pathlib.Path:
    """Pick ``n_queries`` random queries, retrieve their neighbours, draw the grid.

    One call from embeddings to picture: queries are drawn without replacement with
    ``numpy.random.default_rng(seed)``, neighbours are found with :func:`find_neighbours`
    among all references, then :func:`plot_neighbours` draws them. For test-vs-test
    retrieval pass the same arrays as queries and references and ``exclude_self=True``.

    Args:
      query_images, query_labels, query_embeddings: ``(Q, H, W, C)`` uint8, ``(Q,)``,
        ``(Q, D)``.
      reference_images, reference_labels, reference_embeddings: ``(N, H, W, C)`` uint8,
        ``(N,)``, ``(N, D)``.
      path: output PNG path.
      k: neighbours per query.
      n_queries: rows (capped at Q).
      seed: seed of the query choice.
      exclude_self: leave-one-out (queries are the references).
      class_names: see :func:`plot_neighbours`.

    Returns:
      ``path`` as a :class:`pathlib.Path`.
    """
    qe = as_embeddings(query_embeddings, "query_embeddings")
    re = as_embeddings(reference_embeddings, "reference_embeddings")
    ql = as_labels(query_labels, qe.shape[0], "query_labels", "query_embeddings")
    rl = as_labels(reference_labels, re.shape[0], "reference_labels",
                             "reference_embeddings")
    qi = _as_images(query_images, "query_images", 4)
    ri = _as_images(reference_images, "reference_images", 4)
    if qi.shape[0] != qe.shape[0]:
        raise ValueError(
            f"query_images has {qi.shape[0]} images but query_embeddings has {qe.shape[0]} rows"
        )
    if ri.shape[0] != re.shape[0]:
        raise ValueError(
            f"reference_images has {ri.shape[0]} images but reference_embeddings has "
            f"{re.shape[0]} rows"
        )
    n_queries = check_positive_int("n_queries", n_queries)
    rows = np.sort(np.random.default_rng(seed).choice(
        qe.shape[0], min(n_queries, qe.shape[0]), replace=False))
    if exclude_self:
        if qe.shape != re.shape:
            raise ValueError("exclude_self=True needs the queries to be the references")
        _, idx = evaluate.search(evaluate.build_index(re), qe[rows], k, exclude_ids=rows)
    else:
        idx = find_neighbours(qe[rows], re, k)
    return plot_neighbours(qi[rows], ql[rows], ri[idx], rl[idx], path, class_names=class_names)
