"""Benchmark of the evaluation stack: FAISS Flat vs IVF-PQ search, full metrics, t-SNE.

Synthetic data shaped like CIFAR-10 embeddings: ``--n-refs`` references and
``--n-queries`` queries of dimension ``--dim``, unit vectors scattered around
``--classes`` random unit class centres (Gaussian noise of norm ~``--noise``), so that
neighbour recall and precision@1 are meaningful.

Timed:
  * Flat (``IndexFlatL2``): add, and search of the top ``--k`` for every query;
  * IVF-PQ: train + add, search, and its recall@k against the exact top-k;
  * ``retrieval_metrics`` test-vs-train with the flat index, i.e. including MAP@R,
    whose top-R search (R = class size, ~``n_refs / classes``) dominates;
  * openTSNE (FFT) of ``--tsne-points`` points.

Prints a markdown table; ``--json PATH`` also writes the numbers.

Usage:
  python benchmarks/retrieval.py [--json benchmarks/results/retrieval.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time

import numpy as np

from jaxmetric import evaluate as ev
from jaxmetric.report import visualize as vz


def make_data(n: int, dim: int, centres: np.ndarray, noise: float,
              rng) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors ``normalize(centre_y + noise * g / sqrt(dim))``, ``g ~ N(0, I)``."""
    y = rng.integers(0, len(centres), n)
    x = centres[y] + noise * rng.normal(size=(n, dim)) / np.sqrt(dim)
    return ev.l2_normalize(x), y


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-refs", type=int, default=50_000)
    p.add_argument("--n-queries", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--noise", type=float, default=3.0)
    p.add_argument("--k", type=int, default=10, help="neighbours searched / recall@k")
    p.add_argument("--nlist", type=int, default=None)
    p.add_argument("--m", type=int, default=None)
    p.add_argument("--nbits", type=int, default=8)
    p.add_argument("--nprobe", type=int, action="append", default=None,
                   help="IVF cells probed; repeat for several rows (default: build_index's "
                        "default nlist // 8, and 4x that)")
    p.add_argument("--tsne-points", type=int, default=10_000)
    p.add_argument("--skip-full-metrics", action="store_true",
                   help="skip the MAP@R / R-precision evaluation (top-R search)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=pathlib.Path, default=None, help="also write results here")
    args = p.parse_args(argv)

    import faiss  # noqa: PLC0415

    rng = np.random.default_rng(args.seed)
    centres = ev.l2_normalize(rng.normal(size=(args.classes, args.dim)))
    refs, ref_labels = make_data(args.n_refs, args.dim, centres, args.noise, rng)
    queries, query_labels = make_data(args.n_queries, args.dim, centres, args.noise, rng)
    k = args.k
    rows = []

    def p_at_1(ind):
        return float(np.mean(ref_labels[ind[:, 0]] == query_labels))

    flat, t_build = timed(ev.build_index, refs)
    (_, exact), t_search = timed(ev.search, flat, queries, k)
    rows.append(dict(task=f"search top-{k}", index="Flat", params="exact",
                     build_s=t_build, run_s=t_search, recall_vs_exact=1.0,
                     precision_at_1=p_at_1(exact)))

    nprobes = args.nprobe or [None]
    ivf, t_build = timed(ev.build_index, refs, index="ivfpq", nlist=args.nlist, m=args.m,
                         nbits=args.nbits, nprobe=nprobes[0], seed=args.seed)
    if args.nprobe is None:
        nprobes = [ivf.nprobe, min(ivf.nlist, 4 * ivf.nprobe)]
    ivfpq_params = []
    for nprobe in nprobes:
        ivf.nprobe = nprobe
        params = ev.index_params(ivf)
        ivfpq_params.append(params)
        (_, approx), t_search = timed(ev.search, ivf, queries, k)
        rows.append(dict(
            task=f"search top-{k}", index="IVF-PQ",
            params="nlist={nlist} m={m} nbits={nbits} nprobe={nprobe}".format(**params),
            build_s=t_build, run_s=t_search,
            recall_vs_exact=ev.neighbour_recall(approx, exact), precision_at_1=p_at_1(approx)))
        t_build = None  # trained once; later rows only change nprobe

    if not args.skip_full_metrics:
        max_r = int(np.bincount(ref_labels).max())
        metrics, t_metrics = timed(ev.retrieval_metrics, queries, query_labels, refs,
                                   ref_labels, index=flat)
        rows.append(dict(task=f"P@1, R-prec, MAP@R (top-R, R<={max_r})", index="Flat",
                         params="exact", build_s=None, run_s=t_metrics, recall_vs_exact=None,
                         precision_at_1=metrics["precision_at_1"],
                         map_at_r=metrics["map_at_r"]))

    n_tsne = min(args.tsne_points, args.n_queries)
    _, t_tsne = timed(vz.tsne_embed, queries[:n_tsne], seed=args.seed, progress=False)
    rows.append(dict(task=f"t-SNE of {n_tsne} points", index="openTSNE FFT",
                     params="perplexity=30, 250+500 it", build_s=None, run_s=t_tsne,
                     recall_vs_exact=None, precision_at_1=None))

    env = dict(
        n_refs=args.n_refs, n_queries=args.n_queries, dim=args.dim, classes=args.classes,
        noise=args.noise, k=k, faiss=faiss.__version__, faiss_threads=faiss.omp_get_max_threads(),
        cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        machine=platform.processor() or platform.machine(),
    )

    def fmt(v, spec):
        return "" if v is None else format(v, spec)

    print(f"{args.n_queries} queries x {args.n_refs} references, D={args.dim}, "
          f"{args.classes} classes, noise={args.noise}; faiss {env['faiss']} with "
          f"{env['faiss_threads']} threads on {env['cpus']} CPUs\n")
    print("| task | index | parameters | build (s) | run (s) | recall@k vs exact | P@1 |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['task']} | {r['index']} | {r['params']} | {fmt(r['build_s'], '.2f')} | "
              f"{fmt(r['run_s'], '.2f')} | {fmt(r['recall_vs_exact'], '.3f')} | "
              f"{fmt(r['precision_at_1'], '.3f')} |")

    result = {"config": env, "rows": rows, "ivfpq_params": ivfpq_params}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.json}")
    return result


if __name__ == "__main__":
    main()
