"""Loss + gradient benchmark: jaxmetric vs the lecture's loops and its B×B×B mask.

    python -m benchmarks.losses                      # default table (docs/benchmarks)
    python -m benchmarks.losses --sizes 1024 4096 --modes all semihard
    python -m benchmarks.losses --json benchmarks/results/losses-cpu.json
    python -m benchmarks.losses --pml-python /path/to/venv-with-pml/bin/python
    python -m benchmarks.losses --losses supcon circle proxy_anchor --sizes 1024 4096 \
        --pml-python /path/to/venv-with-pml/bin/python    # the other losses

``--losses`` picks the losses (default: the triplet loss, every mining mode, as in the
loss-kernel table). The others (:data:`OTHER_LOSSES`) run their defaults, jaxmetric against
PML's class set to the same loss where ``--pml-python`` is given: ``soft_triplet`` is
``triplet_loss(margin="soft")`` over all triplets vs ``TripletMarginLoss(margin=0,
smooth_loss=True)``; ``multi_similarity`` includes PML's ``MultiSimilarityMiner``;
``lifted_structure`` and ``margin`` use the Euclidean distance of the unit rows
(``margin`` with ``pairs="triplets"``, PML's ``MarginLoss``). The losses of rows against
learned class vectors (:data:`CLASS_LOSSES`: Proxy-Anchor, Proxy-NCA, ArcFace, CosFace)
use one (C, D) = (10, 128) array of class vectors drawn from N(0, 1) and take the
gradient with respect to the embeddings and the class vectors, on both sides
(``ProxyNCALoss`` puts the own proxy in the denominator, ``ArcFaceLoss`` thresholds large
angles, which costs the same).

Every configuration runs in a fresh subprocess so that its peak memory is its own:
``peak_rss_mib`` is the process's peak resident set during the warm-up and timed calls
minus its resident set after compiling (Linux: the peak is reset through
``/proc/self/clear_refs`` once compiled), so it is the working memory of the computation
(allocator caches included) and not JAX or the compiler, and
``xla_temp_mib`` is XLA's own estimate of the compiled program's temporary buffers.
Inputs: B unit-norm embeddings of dimension D = 128, labels uniform over 10 classes,
squared L2, margin 0.2, reduction "mean". Times are medians of ``--repeats`` calls of
``jax.value_and_grad`` (loss and gradient with respect to the embeddings).
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
# The references are only run where they fit this 24 GiB / 2-core machine in seconds.
MAX_B = {"lecture_mask_jax": 512, "python_loops": 128, "pml": 1024}
CLASS_LOSSES = ("proxy_anchor", "proxy_nca", "arcface", "cosface")
"""Losses of rows against learned class vectors."""
OTHER_LOSSES = ("soft_triplet", "supcon", "ntxent", "multi_similarity", "circle",
                "lifted_structure", "margin") + CLASS_LOSSES
LOSSES = ("triplet",) + OTHER_LOSSES
# PML's all-triplet losses build B×B×B tensors; the pair losses are O(B²) in PML too.
MAX_B_PML = {"soft_triplet": 1024, "margin": 1024}


def _jaxmetric_loss(loss: str, labels):
    """``embeddings -> loss`` of jaxmetric's ``loss`` at its defaults."""
    from jaxmetric import losses

    fns = {
        "soft_triplet": lambda e: losses.triplet_loss(e, labels, margin="soft"),
        "supcon": lambda e: losses.supcon_loss(e, labels),
        "ntxent": lambda e: losses.ntxent_loss(e, labels),
        "multi_similarity": lambda e: losses.multi_similarity_loss(e, labels),
        "circle": lambda e: losses.circle_loss(e, labels),
        "lifted_structure": lambda e: losses.lifted_structure_loss(e, labels),
        "margin": lambda e: losses.margin_loss(e, labels, 1.2, pairs="triplets"),
    }
    return lambda e: fns[loss](e)[0]


def _pml_other_fn(loss: str, x, labels):
    """PML's class set to jaxmetric's ``loss``; loss and backward on the CPU."""
    import torch
    from pytorch_metric_learning import distances, losses, miners

    l2 = distances.LpDistance(normalize_embeddings=False)
    miner = None
    if loss == "soft_triplet":
        fn = losses.TripletMarginLoss(margin=0.0, smooth_loss=True,
                                      distance=distances.LpDistance(
                                          normalize_embeddings=False, power=2))
    elif loss == "supcon":
        fn = losses.SupConLoss(temperature=0.1)
    elif loss == "ntxent":
        fn = losses.NTXentLoss(temperature=0.07)
    elif loss == "multi_similarity":
        fn, miner = losses.MultiSimilarityLoss(), miners.MultiSimilarityMiner(0.1)
    elif loss == "circle":
        fn = losses.CircleLoss()
    elif loss == "lifted_structure":
        fn = losses.GeneralizedLiftedStructureLoss(distance=l2)
    else:
        fn = losses.MarginLoss(margin=0.2, beta=1.2, distance=l2)
    y = torch.from_numpy(labels.astype("int64"))

    def run():
        e = torch.from_numpy(x.copy()).requires_grad_(True)
        pairs = None if miner is None else miner(e, y)
        fn(e, y, pairs).backward()
        return e.grad

    return run


def _inputs(b):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(b, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, rng.integers(0, CLASSES, b).astype(np.int32)


def _lecture_mask_loss(x, labels):
    """The lecture's construction: B×B distance matrix, B×B×B triplet mask, mean."""
    import jax.numpy as jnp

    from jaxmetric import distances, mining

    d = distances.pairwise_squared_distances(x)
    m = mining.triplet_mask(labels)
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


def run_one(impl: str, mode: str, b: int, repeats: int, loss_name: str = "triplet") -> dict:
    x, labels = _inputs(b)
    xla_temp = None
    base = None
    w = _class_vectors()
    if impl == "pml" and loss_name in CLASS_LOSSES:
        fn = _pml_class_loss_fn(loss_name, x, labels, w)
        base = _reset_peak_rss_kib()
        fn()  # warm-up
    elif impl == "pml":
        fn = _pml_fn(x, labels) if loss_name == "triplet" else _pml_other_fn(loss_name, x,
                                                                              labels)
        base = _reset_peak_rss_kib()
        fn()  # warm-up
    elif impl == "python_loops":
        fn = lambda: _python_loops_loss(x, labels)  # noqa: E731  (forward only)
        repeats = 1
    else:
        import jax

        from jaxmetric import losses

        args, argnums = (x,), 0
        if loss_name in CLASS_LOSSES:  # gradient for the embeddings and the class vectors
            class_loss = getattr(losses, f"{loss_name}_loss")
            loss = lambda e, v: class_loss(e, labels, v)[0]  # noqa: E731
            args, argnums = (x, w), (0, 1)
        elif impl == "jaxmetric" and loss_name != "triplet":
            loss = _jaxmetric_loss(loss_name, labels)
        elif impl == "jaxmetric":
            loss = lambda e: losses.triplet_loss(e, labels, margin=MARGIN, mining=mode)[0]  # noqa: E731
        else:
            loss = lambda e: _lecture_mask_loss(e, labels)  # noqa: E731
        compiled = jax.jit(jax.value_and_grad(loss, argnums)).lower(*args).compile()
        analysis = compiled.memory_analysis()
        if analysis is not None:
            xla_temp = analysis.temp_size_in_bytes / 2**20
        fn = lambda: jax.block_until_ready(compiled(*args))  # noqa: E731
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
        "loss": loss_name,
        "mining": mode,
        "batch_size": b,
        "median_s": statistics.median(times),
        "peak_rss_mib": (peak - base) / 1024,
        "xla_temp_mib": xla_temp,
    }


def _worker(impl, mode, b, repeats, timeout, python=sys.executable, loss="triplet"):
    cmd = [python, "-m", "benchmarks.losses", "--worker", impl, mode, str(b), str(repeats),
           loss]
    row = {"impl": impl, "loss": loss, "mining": mode, "batch_size": b}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        return row | {"error": f"timeout {timeout}s"}
    except subprocess.CalledProcessError as e:
        return row | {"error": e.stderr.strip()[-300:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt(r):
    loss = r.get("loss", "triplet")
    if "error" in r:
        return (f"| {r['impl']} | {loss} | {r['mining']} | {r['batch_size']} | – | – | – | "
                f"{r['error']} |")
    xla = "–" if r["xla_temp_mib"] is None else f"{r['xla_temp_mib']:.0f}"
    return (
        f"| {r['impl']} | {loss} | {r['mining']} | {r['batch_size']} | {r['median_s']:.3f} | "
        f"{r['peak_rss_mib']:.0f} | {xla} | |"
    )


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:  # runs in the measured interpreter (PML's has no JAX)
        impl, mode, b, repeats = argv[1:5]
        loss = argv[5] if len(argv) > 5 else "triplet"
        print(json.dumps(run_one(impl, mode, int(b), int(repeats), loss)))
        return

    from jaxmetric.losses import MINING_MODES

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 512, 1024, 4096, 16384])
    p.add_argument("--modes", nargs="+", default=list(MINING_MODES), choices=MINING_MODES)
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--large-modes", nargs="+", default=["all"], choices=MINING_MODES,
                   help="modes also run at B > 4096 (slow on a CPU)")
    p.add_argument("--losses", nargs="+", default=["triplet"], choices=LOSSES,
                   help="losses to time (default: the triplet loss, every --modes); the "
                   "others run at their defaults, beside PML's where --pml-python is given")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--pml-python", help="a Python with torch and pytorch-metric-learning: "
                   "also time PML's TripletMarginLoss (skipped when not given)")
    args = p.parse_args(argv)

    import jax

    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"jax {jax.__version__} on {jax.devices()[0].platform}")
    print(f"# loss + grad, D={DIM}, {CLASSES} classes, triplet margin {MARGIN}, mean "
          f"({machine})")
    print("| impl | loss | mining | B | median s | peak RSS MiB | XLA temp MiB | note |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for b in args.sizes:
        for loss in args.losses:
            for impl in args.impls:
                if loss == "triplet":
                    if b > MAX_B.get(impl, b):
                        continue
                    modes = args.modes if impl == "jaxmetric" else ["all"]
                elif impl in ("jaxmetric", "pml"):
                    if impl == "pml" and b > MAX_B_PML.get(loss, b):
                        continue
                    modes = ["all" if loss == "soft_triplet" else "-"]
                else:
                    continue
                if impl == "pml" and not args.pml_python:
                    continue
                for mode in modes:
                    if loss == "triplet" and b > 4096 and mode not in args.large_modes:
                        continue
                    python = args.pml_python if impl == "pml" else sys.executable
                    r = _worker(impl, mode, b, args.repeats, args.timeout, python, loss)
                    rows.append(r)
                    print(_fmt(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
