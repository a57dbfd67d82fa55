"""Loss + gradient benchmark: jaxmetric vs the lecture's loops and its B×B×B mask.

    python -m benchmarks.losses                      # default table (README)
    python -m benchmarks.losses --sizes 1024 4096 --modes all semihard
    python -m benchmarks.losses --json benchmarks/results/losses-cpu.json
    python -m benchmarks.losses --pml-python /path/to/venv-with-pml/bin/python
    python -m benchmarks.losses --losses proxy_anchor arcface --sizes 1024 4096

Every configuration runs in a fresh subprocess so that its peak memory is its own:
``peak_rss_mib`` is the process's peak resident set during the warm-up and timed calls
minus its resident set after compiling (Linux: the peak is reset through
``/proc/self/clear_refs`` once compiled), so it is the working memory of the computation
(allocator caches included) and not JAX or the compiler, and
``xla_temp_mib`` is XLA's own estimate of the compiled program's temporary buffers.
Inputs: B unit-norm embeddings of dimension D = 128, labels uniform over 10 classes,
squared L2, margin 0.2, reduction "mean". Times are medians of ``--repeats`` calls of
``jax.value_and_grad`` (loss and gradient with respect to the embeddings).

``--losses`` adds the losses of rows against learned class vectors (Proxy-Anchor,
Proxy-NCA, ArcFace, CosFace) with their defaults, one (C, D) = (10, 128) array of
class vectors drawn from N(0, 1), gradient with respect to the embeddings and the class
vectors; PML's counterpart beside them (same defaults; ``ProxyNCALoss`` puts the own
proxy in the denominator, ``ArcFaceLoss`` thresholds large angles, which costs the same).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

DIM, CLASSES, MARGIN = 128, 10, 0.2
IMPLS = ("jaxmetric", "lecture_mask_jax", "python_loops", "pml")
CLASS_LOSSES = ("proxy_anchor", "proxy_nca", "arcface", "cosface")
"""Losses of rows against learned class vectors; PML runs them at every size."""
# The references are only run where they fit this 24 GiB / 2-core machine in seconds.
MAX_B = {"lecture_mask_jax": 512, "python_loops": 128, "pml": 1024}


def _inputs(b):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(b, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, rng.integers(0, CLASSES, b).astype(np.int32)


def _lecture_mask_loss(x, labels):
    """The lecture's construction: B×B distance matrix, B×B×B triplet mask, mean."""
    import jax.numpy as jnp

    from jaxmetric import distances, masks

    d = distances.pairwise_squared_distances(x)
    m = masks.triplet_mask(labels)
    per = jnp.maximum(d[:, :, None] - d[:, None, :] + MARGIN, 0.0)
    return jnp.sum(jnp.where(m, per, 0.0)) / jnp.maximum(jnp.sum(m), 1)


def _python_loops_loss(x, labels):
    """The lecture's loop listing: positive pairs, then one triplet per negative."""
    import numpy as np

    b = len(labels)
    positive_pairs = [(i, j) for i in range(b) for j in range(b)
                      if i != j and labels[i] == labels[j]]
    triplets = [(a, p, n) for (a, p) in positive_pairs for n in range(b) if labels[a] != labels[n]]
    total = 0.0
    for a, p, n in triplets:
        total += max(float(np.sum((x[a] - x[p]) ** 2) - np.sum((x[a] - x[n]) ** 2)) + MARGIN, 0.0)
    return total / max(len(triplets), 1)


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss_kib():
    """Resets the peak-RSS counter where Linux allows it; returns the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_rss_kib():
    try:
        return _status_kib("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _pml_fn(x, labels):
    """pytorch-metric-learning's TripletMarginLoss set to the same loss: all triplets,
    squared L2, mean over all of them; loss and backward on the CPU."""
    import torch
    from pytorch_metric_learning import distances, losses, reducers

    loss_fn = losses.TripletMarginLoss(
        margin=MARGIN, triplets_per_anchor="all", reducer=reducers.MeanReducer(),
        distance=distances.LpDistance(normalize_embeddings=False, p=2, power=2),
    )
    y = torch.from_numpy(labels.astype("int64"))

    def run():
        e = torch.from_numpy(x.copy()).requires_grad_(True)
        loss_fn(e, y).backward()
        return e.grad

    return run


def _class_vectors():
    import numpy as np

    return np.random.default_rng(1).normal(size=(CLASSES, DIM)).astype(np.float32)


def _pml_class_loss_fn(name, x, labels, w):
    """PML's counterpart of a class-vector loss with jaxmetric's defaults; loss and
    backward (embeddings and class vectors) on the CPU."""
    import math

    import torch
    from pytorch_metric_learning import losses

    if name == "proxy_anchor":
        loss_fn = losses.ProxyAnchorLoss(CLASSES, DIM, margin=0.1, alpha=32)
        param = loss_fn.proxies
    elif name == "proxy_nca":
        loss_fn = losses.ProxyNCALoss(CLASSES, DIM, softmax_scale=1)
        param = loss_fn.proxies
    else:
        cls = losses.ArcFaceLoss if name == "arcface" else losses.CosFaceLoss
        margin = math.degrees(0.5) if name == "arcface" else 0.35
        loss_fn = cls(CLASSES, DIM, margin=margin, scale=64)
        param = loss_fn.W
        w = w.T.copy()  # PML's weights are (D, C)
    param.data = torch.from_numpy(w)
    y = torch.from_numpy(labels.astype("int64"))

    def run():
        param.grad = None
        e = torch.from_numpy(x.copy()).requires_grad_(True)
        loss_fn(e, y).backward()
        return e.grad, param.grad

    return run


def _jax_loss(impl, mode, labels):
    """The jaxmetric or lecture-mask loss as a function of (embeddings, class vectors)."""
    from jaxmetric import losses

    if mode in CLASS_LOSSES:
        fn = getattr(losses, f"{mode}_loss")
        return lambda e, w: fn(e, labels, w)[0]
    if impl == "jaxmetric":
        return lambda e, w: losses.triplet_loss(e, labels, margin=MARGIN, mining=mode)[0]
    return lambda e, w: _lecture_mask_loss(e, labels)


def run_one(impl: str, mode: str, b: int, repeats: int) -> dict:
    x, labels = _inputs(b)
    w = _class_vectors()
    xla_temp = None
    base = None
    if impl == "pml" and mode in CLASS_LOSSES:
        fn = _pml_class_loss_fn(mode, x, labels, w)
        base = _reset_peak_rss_kib()
        fn()  # warm-up
    elif impl == "pml":
        fn = _pml_fn(x, labels)
        base = _reset_peak_rss_kib()
        fn()  # warm-up
    elif impl == "python_loops":
        fn = lambda: _python_loops_loss(x, labels)  # noqa: E731  (forward only)
        repeats = 1
    else:
        import jax

        argnums = (0, 1) if mode in CLASS_LOSSES else 0
        compiled = jax.jit(jax.value_and_grad(_jax_loss(impl, mode, labels), argnums)).lower(
            x, w).compile()
        analysis = compiled.memory_analysis()
        if analysis is not None:
            xla_temp = analysis.temp_size_in_bytes / 2**20
        fn = lambda: jax.block_until_ready(compiled(x, w))  # noqa: E731
        base = _reset_peak_rss_kib()
        fn()  # warm-up
    if base is None:
        base = _reset_peak_rss_kib()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    peak = _peak_rss_kib()
    return {
        "impl": impl,
        "mining": mode,  # the triplet loss's mining mode, or a class-vector loss's name
        "batch_size": b,
        "median_s": statistics.median(times),
        "peak_rss_mib": (peak - base) / 1024,
        "xla_temp_mib": xla_temp,
    }


def _worker(impl, mode, b, repeats, timeout, python=sys.executable):
    cmd = [python, "-m", "benchmarks.losses", "--worker", impl, mode, str(b), str(repeats)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        return {"impl": impl, "mining": mode, "batch_size": b, "error": f"timeout {timeout}s"}
    except subprocess.CalledProcessError as e:
        return {"impl": impl, "mining": mode, "batch_size": b, "error": e.stderr.strip()[-300:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt(r):
    if "error" in r:
        return f"| {r['impl']} | {r['mining']} | {r['batch_size']} | – | – | – | {r['error']} |"
    xla = "–" if r["xla_temp_mib"] is None else f"{r['xla_temp_mib']:.0f}"
    return (
        f"| {r['impl']} | {r['mining']} | {r['batch_size']} | {r['median_s']:.3f} | "
        f"{r['peak_rss_mib']:.0f} | {xla} | |"
    )


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:  # runs in the measured interpreter (PML's has no JAX)
        impl, mode, b, repeats = argv[1:5]
        print(json.dumps(run_one(impl, mode, int(b), int(repeats))))
        return

    from jaxmetric.losses import MINING_MODES

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 512, 1024, 4096, 16384])
    p.add_argument("--modes", nargs="+", default=list(MINING_MODES), choices=MINING_MODES)
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--losses", nargs="+", default=["triplet"],
                   choices=("triplet",) + CLASS_LOSSES,
                   help="the triplet loss (with --modes) and/or the class-vector losses")
    p.add_argument("--large-modes", nargs="+", default=["all"], choices=MINING_MODES,
                   help="modes also run at B > 4096 (slow on a CPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--pml-python", help="a Python with torch and pytorch-metric-learning: "
                   "also time PML's TripletMarginLoss (skipped when not given)")
    args = p.parse_args(argv)

    import jax

    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"jax {jax.__version__} on {jax.devices()[0].platform}")
    print(f"# loss + grad, D={DIM}, {CLASSES} classes, triplet margin {MARGIN}, mean ({machine})")
    print("| impl | mining / loss | B | median s | peak RSS MiB | XLA temp MiB | note |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for b in args.sizes:
        for impl in args.impls:
            if impl == "pml" and not args.pml_python:
                continue
            modes = []
            if "triplet" in args.losses and b <= MAX_B.get(impl, b):
                modes += args.modes if impl == "jaxmetric" else ["all"]
            if impl in ("jaxmetric", "pml"):
                modes += [name for name in args.losses if name in CLASS_LOSSES]
            for mode in modes:
                if b > 4096 and mode not in args.large_modes + list(CLASS_LOSSES):
                    continue
                python = args.pml_python if impl == "pml" else sys.executable
                r = _worker(impl, mode, b, args.repeats, args.timeout, python)
                rows.append(r)
                print(_fmt(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
