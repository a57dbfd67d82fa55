"""Search at scale: flat, IVF-PQ and HNSW side by side, and the embedder's throughput.

    python -m benchmarks.search --json benchmarks/results/search-cpu.json
    python -m benchmarks.search --n 100000 --queries 500                  # quicker
    python -m benchmarks.search --run runs/cpu-triplet \\
        --images ../shared/data/cifar10-jpeg.tar.xz --json benchmarks/results/search-cifar10.json

**Synthetic gallery** (the default): ``--n`` (1,000,000) unit vectors of dimension
``--dim`` (128) drawn around ``--clusters`` (1,000) random centres (Gaussian noise of
standard deviation ``--spread`` per coordinate, then L2-normalised, the way trained
embeddings of many classes sit on the sphere), and ``--queries`` (1,000) more from the
same mixture. For each index kind of :class:`jaxmetric.search.Index` (its defaults:
IVF-PQ with ``min(4 sqrt(N), N // 39)`` cells, the largest PQ split of at most ``D / 4``
sub-vectors of 8 bits, ``nlist / 8`` cells probed; HNSW with 32 links, efConstruction 40,
efSearch 64) it measures, in one process, one after the other:

* build seconds (``Index.build``, including its own recall check on 1,000 gallery
  vectors), and the bytes of the serialised FAISS index (its memory, give or take);
* queries per second of ``Index.search(queries, 10)`` (all queries in one call, every
  core);
* recall@10 of the queries against the exact (flat) index's answers.

**A real run** (``--run RUN --images TREE_OR_ARCHIVE``): the run's
:class:`~jaxmetric.search.Embedder` embeds the gallery images streamed from disk
(decode + preprocessing + network, in batches) and the same images already decoded in
memory through the bare jitted forward (:func:`jaxmetric.train.make_embed_fn` on the
stored uint8 arrays): the gap is the cost of decoding and streaming. The index kinds are
then compared on those embeddings, queries being the first ``--queries`` of them (each
one's own entry excluded from the recall).

Timings depend on the machine and on what else runs on it: compare rows of one run.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

from benchmarks.common import environment, git_state, write_json

KINDS = ("flat", "ivfpq", "hnsw")
K = 10


def clustered_unit_vectors(n: int, dim: int, clusters: int, spread: float, seed: int):
    """``n`` float32 unit vectors around ``clusters`` random unit centres."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, dim), np.float32)
    step = 100_000
    for start in range(0, n, step):  # in slices: no (n, dim) float64 temporary
        stop = min(n, start + step)
        x = centres[rng.integers(0, clusters, stop - start)]
        x = x + spread * rng.standard_normal(x.shape).astype(np.float32)
        out[start:stop] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def compare_indexes(gallery, queries, *, exclude_first: bool = False) -> list[dict]:
    """Build each kind over ``gallery``, search ``queries``; recall against flat's answers.
    ``exclude_first``: the queries are the gallery's first rows (their own entry is not a
    neighbour)."""
    import faiss
    import numpy as np

    from jaxmetric.search import Index

    ids = np.arange(len(gallery)).astype(str)
    k = K + 1 if exclude_first else K
    rows, exact = [], None
    for kind in KINDS:
        t0 = time.perf_counter()
        index = Index.build(gallery, ids, kind=kind)
        build = time.perf_counter() - t0
        size = int(faiss.serialize_index(index.faiss_index).size)
        t0 = time.perf_counter()
        _, found, _ = index.search(queries, k)
        search = time.perf_counter() - t0
        found = found.astype(np.int64)
        if exclude_first:  # drop each query's own entry (or its last neighbour)
            own = np.arange(len(queries))[:, None]
            found = np.array([[f for f in row if f != q][:K]
                              for row, q in zip(found, own[:, 0], strict=True)])
        if kind == "flat":
            exact = found
        recall = float(np.mean([len(set(a) & set(b)) / K
                                for a, b in zip(found, exact, strict=True)]))
        rows.append({"kind": kind, "build_seconds": round(build, 2), "index_bytes": size,
                     "queries_per_second": round(len(queries) / search, 1),
                     "recall_at_10": round(recall, 4), "params": index.metadata["params"]})
        print(f"{kind:>6}: build {build:7.1f} s, {size / 2**20:8.1f}"
              f" MiB, {len(queries) / search:9.0f} queries/s, recall@10 {recall:.3f}",
              flush=True)
    return rows


def embedder_throughput(run_dir, images, limit: int | None) -> tuple[dict, object]:
    """Images/s of the Embedder streaming ``images`` from disk vs the bare jitted forward
    on the same images decoded in memory; returns the numbers and the embeddings."""
    import itertools

    import jax
    import numpy as np

    from jaxmetric import train
    from jaxmetric.search import Embedder
    from jaxmetric.search.sources import iter_images

    embedder = Embedder.from_run(run_dir, batch_size=256)
    items = list(itertools.islice(iter_images(images, under="train"), limit))
    embedder.embed_items(items[:512])  # compile
    t0 = time.perf_counter()
    got = embedder.embed_items(items)
    streamed = time.perf_counter() - t0
    stored = np.stack([embedder.decode(item.source, item.id) for item in items])
    embed_fn = train.make_embed_fn(embedder.state)
    batch = 256
    jax.block_until_ready(embed_fn(stored[:batch]))  # compile
    t0 = time.perf_counter()
    for start in range(0, len(stored) - batch + 1, batch):
        jax.block_until_ready(embed_fn(stored[start:start + batch]))
    bare = time.perf_counter() - t0
    n_bare = (len(stored) // batch) * batch
    numbers = {"images": len(items), "embedder_images_per_second": round(len(items) / streamed),
               "bare_forward_images_per_second": round(n_bare / bare),
               "embedder_overhead": round((len(items) / streamed) ** -1
                                          / (n_bare / bare) ** -1 - 1, 3)}
    print(f"embedder {numbers['embedder_images_per_second']} img/s (decode + stream + "
          f"network) vs bare forward {numbers['bare_forward_images_per_second']} img/s "
          f"(overhead {100 * numbers['embedder_overhead']:.0f}%)", flush=True)
    return numbers, got.embeddings


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.search", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="synthetic gallery size")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--spread", type=float, default=0.05)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run", help="a run folder: measure its Embedder and its embeddings")
    p.add_argument("--images", help="with --run: the gallery (its train/ part)")
    p.add_argument("--limit", type=int, help="with --run: at most this many images")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if (args.run is None) != (args.images is None):
        p.error("--run and --images go together")
    if min(args.n, args.dim, args.clusters, args.queries) < 1:
        p.error("--n, --dim, --clusters and --queries must be >= 1")
    doc = {"command": "python -m benchmarks.search " + " ".join(argv or sys.argv[1:]),
           "environment": environment(), "git": git_state(), "k": K}
    if args.run is None:
        gallery = clustered_unit_vectors(args.n, args.dim, args.clusters, args.spread,
                                         args.seed)
        queries = clustered_unit_vectors(args.queries, args.dim, args.clusters, args.spread,
                                         args.seed + 1)
        doc["gallery"] = {"kind": "synthetic", "n": args.n, "dim": args.dim,
                          "clusters": args.clusters, "spread": args.spread}
        doc["indexes"] = compare_indexes(gallery, queries)
    else:
        numbers, embeddings = embedder_throughput(pathlib.Path(args.run), args.images,
                                                  args.limit)
        doc["gallery"] = {"kind": "run", "run": args.run, "images": args.images,
                          "n": len(embeddings), "dim": int(embeddings.shape[1])}
        doc["embedder"] = numbers
        doc["indexes"] = compare_indexes(embeddings, embeddings[:args.queries],
                                         exclude_first=True)
    if args.json:
        write_json(pathlib.Path(args.json), doc)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
