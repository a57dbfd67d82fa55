"""``python -m jaxmetric.search``: build an index of a gallery, query it, calibrate it.

* ``build RUN --images DIR_OR_ARCHIVE --out INDEX`` -- embeds every image of a folder
  tree or tar archive (``--under train`` for a part of it; labels are the class
  folders) with the run's model and saves an index (``--index flat|ivfpq|hnsw``). An
  undecodable image stops the build naming the file, unless ``--skip-bad-images``
  (then their count is printed).
* ``query INDEX IMAGE...`` -- the ``-k`` nearest gallery images of each image (rank,
  distance, label, path) and its predicted label: with a calibrated threshold the
  nearest label or ``unknown`` (:func:`~jaxmetric.search.match`), without one the
  distance-weighted vote of the k (:meth:`~jaxmetric.search.Index.classify`);
  ``--picture PNG`` draws each query beside its neighbours.
* ``calibrate INDEX --images LABELLED`` -- embeds labelled images (their classes may be
  absent from the gallery: those are the "unknown" cases), finds the distance threshold
  at which ``match``'s answers reach ``--target-precision``, and stores it in the
  index's metadata (atomically).

The model is the run recorded in the index (its folder and epoch; ``--run`` when it has
moved); an index built by other weights is refused. Every bad input -- a corrupt index,
another run's index, an undecodable or empty gallery, ``k`` above the gallery size --
ends with ``error: ...`` and exit status 1; bad flags exit with 2 (argparse).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxmetric.search",
                                description="Search images with a trained jaxmetric run.")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="embed a gallery and save its index")
    b.add_argument("run", help="a run folder (python -m experiments.cifar10 --out RUN)")
    b.add_argument("--images", required=True,
                   help="the gallery: a folder tree or a .tar/.tar.gz/.tar.xz archive")
    b.add_argument("--under", help="only the images below this sub-folder (e.g. train)")
    b.add_argument("--out", required=True, help="the index folder to write")
    b.add_argument("--index", choices=("flat", "ivfpq", "hnsw"), default="flat")
    b.add_argument("--epoch", type=int, help="checkpoint epoch (default: the latest)")
    b.add_argument("--skip-bad-images", action="store_true",
                   help="leave undecodable images out instead of stopping")

    q = sub.add_parser("query", help="the nearest gallery images of some images")
    q.add_argument("index", help="an index folder written by build")
    q.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    q.add_argument("-k", type=int, default=8, help="neighbours per image (default 8)")
    q.add_argument("--picture", help="draw the queries and their neighbours into this PNG")

    c = sub.add_parser("calibrate", help="store an open-set distance threshold")
    c.add_argument("index", help="an index folder written by build")
    c.add_argument("--images", required=True, help="labelled images: folder tree or archive")
    c.add_argument("--under", help="only the images below this sub-folder (e.g. test)")
    c.add_argument("--target-precision", type=float, default=0.99)

    for s in (b, q, c):
        s.add_argument("--run", dest="run_override" if s is not b else "run_unused",
                       help=argparse.SUPPRESS if s is b else
                       "the run folder, when it moved since the index was built")
        s.add_argument("--batch-size", type=int, default=64)
        s.add_argument("--no-progress", action="store_true")
    return p


def _embedder_for(index, args):
    from jaxmetric.search import Embedder, SearchError

    run = args.run_override or index.metadata.get("run_dir")
    if run is None:
        raise SearchError("the index records no run folder: pass --run")
    embedder = Embedder.from_run(run, index.metadata.get("epoch"), batch_size=args.batch_size)
    index.check_embedder(embedder)
    return embedder


def _build(args) -> int:
    from jaxmetric.search import Embedder, Index

    embedder = Embedder.from_run(args.run, args.epoch, batch_size=args.batch_size)
    got = embedder.embed_folder(args.images, under=args.under, skip_bad=args.skip_bad_images,
                                progress=not args.no_progress)
    index = Index.build(got.embeddings, got.ids, got.labels, kind=args.index,
                        embedder=embedder)
    index.metadata["images"] = str(pathlib.Path(args.images).resolve())
    index.save(args.out)
    recall = index.metadata.get("recall")
    print(f"{args.out}: {len(index)} images, {index.kind} index, dim {index.dim}, "
          f"model {embedder.fingerprint}"
          + (f", recall@{recall['k']} vs exact {recall['value']:.3f}" if recall else ""))
    if got.skipped:
        print(f"skipped {len(got.skipped)} undecodable image(s), e.g. {got.skipped[0]}")
    return 0


def _query(args) -> int:
    from jaxmetric.search import Index, match

    index = Index.load(args.index)
    embedder = _embedder_for(index, args)
    got = embedder.embed_paths(args.images)
    dist, ids, labels = index.search(got.embeddings, args.k, embedder=embedder)
    if index.threshold is not None:
        predicted, _ = match(index, got.embeddings)
        how = f"threshold {index.threshold:.4f}"
    else:
        predicted, _ = index.classify(got.embeddings, args.k)
        how = f"vote of {args.k}, no calibrated threshold"
    for i, path in enumerate(got.ids):
        print(f"{path}: predicted {predicted[i]} ({how})")
        for r in range(args.k):
            print(f"  {r + 1:>3}  {dist[i, r]:.4f}  {labels[i, r]}  {ids[i, r]}")
    if args.picture:
        _draw(embedder, got, ids, labels, predicted, args.picture)
        print(f"picture: {args.picture}")
    return 0


def _draw(embedder, got, ids, labels, predicted, path) -> None:
    import numpy as np

    from jaxmetric.report.visualize import plot_neighbours
    from jaxmetric.search.sources import read_sources

    sources = read_sources({i for i in ids.reshape(-1) if i is not None})
    blank = np.zeros((embedder.image_side, embedder.image_side, embedder.channels), np.uint8)
    queries = np.stack([embedder.decode(pathlib.Path(p)) for p in got.ids])
    neighbours = np.stack([[embedder.decode(sources[i], i) if i is not None else blank
                            for i in row] for row in ids])
    # A query in a class folder of the gallery's classes is framed against its own class
    # (right / wrong neighbours); any other query against the predicted label.
    known = {str(v) for v in labels.reshape(-1) if v is not None}
    truth = [pathlib.Path(p).parent.name if pathlib.Path(p).parent.name in known else q
             for p, q in zip(got.ids, predicted, strict=True)]
    plot_neighbours(queries, np.asarray(truth, str),
                    neighbours, np.asarray(labels, str), path)


FEW_ANSWERED = 0.05
"""``calibrate`` warns when its threshold answers fewer than this share of the images."""


def _calibrate(args) -> int:
    from jaxmetric.search import Index, SearchError, nearest_comparisons, threshold_for_precision

    index = Index.load(args.index)
    embedder = _embedder_for(index, args)
    got = embedder.embed_folder(args.images, under=args.under, progress=not args.no_progress)
    if any(v is None for v in got.labels):
        raise SearchError(f"{args.images}: calibration images need labels (class folders)")
    d, correct = nearest_comparisons(index, got.embeddings, got.labels)
    t = threshold_for_precision(d, correct, args.target_precision)
    answered = float((d <= t.distance).mean())
    if not (d <= t.distance).any():  # met only by answering nothing: no use
        raise SearchError(
            f"no distance threshold reaches precision {args.target_precision} on these "
            f"{len(got.ids)} images (the nearest neighbour is right for "
            f"{float(correct.mean()):.3f} of them); lower --target-precision. The index "
            "keeps its previous threshold")
    record = t.to_dict() | {"images": len(got.ids), "source": str(args.images)}
    index.update_metadata(args.index, threshold=record)
    print(f"{args.index}: threshold {t.distance:.4f} (precision {t.precision:.3f} on the "
          f"{answered:.3f} of {len(got.ids)} images answered, the rest unknown; "
          f"{t.recall:.3f} of the right answers kept)")
    if answered < FEW_ANSWERED:
        print(f"warning: at precision {args.target_precision} the index answers only "
              f"{100 * answered:.1f}% of these images and says \"unknown\" to the rest; a "
              "lower --target-precision answers more", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    """The command line; returns the exit status (1 for bad input, with a message)."""
    args = _parser().parse_args(argv)
    if getattr(args, "batch_size", 1) < 1:
        _parser().error("--batch-size must be at least 1")
    if args.command == "query" and args.k < 1:
        _parser().error("-k must be at least 1")

    from jaxmetric.data.types import DataError
    from jaxmetric.search.index import SearchError

    try:
        return {"build": _build, "query": _query, "calibrate": _calibrate}[args.command](args)
    except (SearchError, DataError, FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
