"""Side-by-side training: jaxmetric vs a PyTorch + pytorch-metric-learning reference.

    python -m benchmarks.peer_training --losses triplet contrastive --seeds 0 1 2 \\
        --json benchmarks/results/peer-training-cpu.json
    python -m benchmarks.peer_training --seeds 0 --epochs 1 --warmup-epochs 0.5 \\
        --max-train 1024 --max-test 256                                   # smoke test
    python -m benchmarks.peer_training --torch-init he --torch-reducer mean \\
        --tag torch-like-jax --json benchmarks/results/peer-torch-like-jax.json
    python -m benchmarks.peer_training --only jaxmetric --jax-set margin=0.3 --tag m03

Trains the same network on the same data with the same recipe and evaluation twice:
once with :func:`jaxmetric.train.fit`, once with a plain PyTorch loop (written here)
around pytorch-metric-learning's loss, and reports retrieval quality and training speed
of both. Needs the ``peer`` extra (``pip install -e .[train,eval,peer]``).

**Recipe** (the defaults):

* data: :func:`jaxmetric.data.load_cifar10` with ``max_train=10000, max_test=2000``
  (the class-balanced first 10,000 training and 2,000 test images); both sides get the
  same uint8 arrays (their crc32 is recorded and compared). ``--data`` defaults to
  ``$JAXMETRIC_CIFAR10``, else ``../shared/data/cifar10-jpeg.tar.xz`` beside the
  repository. **Caveat:** that file is the JPEG-q75 copy of CIFAR-10, whose pixels
  differ slightly from the official release: the numbers are comparable with, not
  identical to, numbers on the original.
* network: ``homebrew`` -- for widths 32-64-128-128 a 3x3 conv (no bias, same padding),
  BatchNorm (momentum 0.1 in PyTorch's convention = 0.9 in flax's, eps 1e-5) and ReLU,
  a 2x2 max-pool after every block but the last; global average pool; Linear(128, 128)
  with bias; L2 normalisation ``x / max(||x||, 1e-6)``. PyTorch uses its default
  initialisation (what a PyTorch user gets) unless ``--torch-init he``: He fan-out
  normal convs, LeCun truncated-normal Linear weight and zero Linear bias, which is
  jaxmetric's initialisation.
* 10 epochs of batch 256 (shuffled every epoch, the last partial batch dropped); SGD
  with Nesterov momentum 0.9, weight decay 5e-4 added to the gradient of conv and
  linear kernels only (not BatchNorm parameters, not biases); learning rate warmed up
  linearly from 0 to 0.1 over the first epoch and then cosine-decayed to 0, per step
  (``optax.warmup_cosine_decay_schedule`` as in :func:`jaxmetric.train.make_schedule`;
  the PyTorch side computes the same values, checked at a few steps).
* augmentation: zero-pad 4, random 32x32 crop, random horizontal flip, per example,
  then per-channel normalisation with :data:`jaxmetric.data.CIFAR10_MEAN` / ``STD``
  (vectorised over the batch in both frameworks).
* losses: ``triplet`` -- all triplets, margin 0.2, squared L2; PML's
  ``TripletMarginLoss(margin=0.2, distance=LpDistance(power=2))``. ``contrastive`` --
  PML's ``ContrastiveLoss()`` (positive margin 0, negative margin 1, Euclidean
  distance); jaxmetric's ``TrainConfig(loss="contrastive", margin=1.0)``. PML reduces
  with its default ``AvgNonZeroReducer`` unless ``--torch-reducer mean``; jaxmetric
  uses ``TrainConfig``'s defaults, which ``--jax-set KEY=VALUE`` overrides. The two
  defaults are not the same loss: PML averages only the non-zero terms, jaxmetric all
  of them; for the contrastive loss jaxmetric squares the hinge terms (Hadsell) where
  PML does not, and PML's ``MeanReducer`` adds the positive-pair mean to the
  negative-pair mean where jaxmetric's ``"mean"`` averages over all pairs together.
* checkpoints: both save model and optimizer state after every epoch (jaxmetric an
  orbax checkpoint, PyTorch ``torch.save`` to a temporary file and ``os.replace``).
* evaluation, the same code for both: eval-mode embeddings of the test and training
  images (no augmentation), then :func:`jaxmetric.evaluate.evaluate_embeddings` (exact
  FAISS ``IndexFlatL2``): precision@1 and R-precision of test queries against the
  training set (the headline) and of leave-one-out test-vs-test retrieval.

**Timing.** ``train_seconds`` is the wall time of the whole training loop (model and
optimizer set-up, every epoch, checkpoints; for jaxmetric the ``fit`` call, so JAX's
compilation is in it), evaluation excluded. ``first_epoch_seconds`` is the first
epoch alone (compilation for jaxmetric). ``images_per_second`` is the images trained
over ``train_seconds``; ``steady_images_per_second`` the same over epochs 2..N, from
the epochs' own times (the train steps, checkpoint saves excluded; jaxmetric's are read
from the run's ``metrics.jsonl``). PyTorch runs eagerly (no ``torch.compile``) with
``torch.set_num_threads(os.cpu_count())``; its run also records ``augment_seconds``,
the share of the loop spent augmenting. Timings are only as quiet as the machine:
run nothing else meanwhile.

**Structure.** Every run (one side, one loss, one seed) is its own subprocess
(``--run``), so JAX and PyTorch never share a process or its thread pools (the PyTorch
run uses jaxmetric's data loader and FAISS evaluation, which need no JAX backend, and
starts none). Each run records its parameter count, the crc32 of its data and its
learning rate at a few steps; the driver checks that both sides agree. The driver
runs, per loss and seed, the two sides one after the other (jaxmetric seed 0, PyTorch
seed 0, jaxmetric seed 1, ...), so slow phases of the machine hit both, and writes one
JSON with every run, the environment and a per-loss summary (mean and sample standard
deviation over seeds, jaxmetric/PyTorch ratios); it prints a markdown table.
``--only jaxmetric|pml`` runs one side, ``--tag NAME`` names a controlled variant.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shlex
import sys
import tempfile
import time
import zlib

from benchmarks.common import (  # stdlib-only at import time: safe for both sides
    EMBED_DIM,
    LOSSES,
    MARGIN,
    MOMENTUM,
    PAD,
    PEAK_LR,
    PEER_SIDE_NAMES,
    PEER_SIDES,
    REPO,
    WARMUP_EPOCHS,
    WEIGHT_DECAY,
    WIDTHS,
    TorchAugment,
    environment,
    run_child,
    summarise_peer_runs,
    torch_checkpoint,
    torch_loss,
    torch_model,
    torch_optimizer,
    warmup_cosine_lr,
    write_json,
)

DATA_ENV = "JAXMETRIC_CIFAR10"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.xz"

TORCH_INITS = ("default", "he")
TORCH_REDUCERS = ("default", "mean")

BATCH_SIZE = 256
EMBED_BATCH = 1024


# ------------------------------------------------------------------------------ inputs


def resolve_data(path: str | None) -> pathlib.Path:
    """``--data``, else ``$JAXMETRIC_CIFAR10``, else the shared JPEG copy; must exist."""
    chosen = path or os.environ.get(DATA_ENV) or str(DEFAULT_DATA)
    p = pathlib.Path(chosen).expanduser()
    if not p.exists():
        raise SystemExit(
            f"error: CIFAR-10 not found at {p}. Pass --data PATH (a cifar-10-batches-py "
            f"folder, an image tree or a .tar.xz of one) or set ${DATA_ENV}.")
    return p.resolve()


def data_note(path) -> str:
    from jaxmetric.data import cifar10_description

    return cifar10_description(path)


def parse_jax_set(items) -> dict:
    """``["KEY=VALUE", ...]`` -> dict; each value is JSON if it parses, else a string."""
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --jax-set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def probe_steps(steps_per_epoch: int, epochs: int, warmup_epochs: float) -> list[int]:
    """Steps at which both sides record their learning rate."""
    total = epochs * steps_per_epoch
    warmup = int(round(warmup_epochs * steps_per_epoch))
    cands = [0, 1, warmup - 1, warmup, warmup + 1, (warmup + total) // 2, total - 1]
    return sorted({s for s in cands if 0 <= s < total})


def data_crc(dataset) -> dict:
    return {name: {"n": len(split), "crc32": zlib.crc32(split.images.tobytes())
                   ^ zlib.crc32(split.labels.astype("int64").tobytes())}
            for name, split in (("train", dataset.train), ("test", dataset.test))}


def timing(epoch_seconds, train_seconds, images_per_epoch) -> dict:
    epochs = len(epoch_seconds)
    steady = (images_per_epoch * (epochs - 1) / sum(epoch_seconds[1:])) if epochs > 1 else None
    return {
        "train_seconds": train_seconds,
        "first_epoch_seconds": epoch_seconds[0],
        "epoch_seconds": list(epoch_seconds),
        "images_trained": images_per_epoch * epochs,
        "images_per_second": images_per_epoch * epochs / train_seconds,
        "steady_images_per_second": steady,
    }


def score(train_emb, test_emb, dataset) -> dict:
    """jaxmetric's FAISS evaluation, identical for both sides."""
    from jaxmetric import evaluate

    t0 = time.perf_counter()
    metrics = evaluate.evaluate_embeddings(train_emb, dataset.train.labels, test_emb,
                                           dataset.test.labels, clustering=False)
    tt, ts = metrics["test_vs_train"], metrics["test_vs_test"]
    return {
        "precision_at_1": tt["precision_at_1"],
        "r_precision": tt["r_precision"],
        "map_at_r": tt["map_at_r"],
        "test_vs_test_precision_at_1": ts["precision_at_1"],
        "test_vs_test_r_precision": ts["r_precision"],
        "metrics": metrics,
        "search_seconds": time.perf_counter() - t0,
    }


# ------------------------------------------------------------------------ jaxmetric side


def jaxmetric_config(args, data_path):
    from jaxmetric.train.config import TrainConfig

    fields = dict(model="homebrew", embed_dim=EMBED_DIM, batch_size=BATCH_SIZE,
                  epochs=args.epochs, warmup_epochs=args.warmup_epochs, optimizer="sgd",
                  lr=PEAK_LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, augment=True,
                  loss=args.loss, margin=MARGIN[args.loss], seed=args.seed)
    fields |= parse_jax_set(args.jax_set)
    try:
        return TrainConfig(**fields)
    except TypeError as e:
        raise SystemExit(f"error: --jax-set: {e} (TrainConfig fields: "
                         f"{', '.join(TrainConfig.__dataclass_fields__)})") from e
    except ValueError as e:
        raise SystemExit(f"error: jaxmetric TrainConfig: {e}") from e


def run_jaxmetric(args, data_path) -> dict:
    import jax

    from jaxmetric import data, models, report, train
    from jaxmetric.models.conv import default_chunk_elements
    from jaxmetric.train import sampling

    if args.jax_cpu_devices is not None:
        train.use_cpu_devices(args.jax_cpu_devices)

    config = jaxmetric_config(args, data_path)
    dataset = data.load_cifar10(data_path, max_train=args.max_train, max_test=args.max_test)
    steps = sampling.steps_per_epoch(len(dataset.train), config.batch_size)
    with tempfile.TemporaryDirectory(prefix="peer-jaxmetric-") as tmp:
        out = pathlib.Path(tmp) / "run"
        t0 = time.perf_counter()
        state = train.fit(config, dataset, out, progress=False)
        jax.block_until_ready(state)
        train_seconds = time.perf_counter() - t0
        records = [json.loads(line) for line in
                   (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    result = timing([r["epoch_seconds"] for r in records], train_seconds,
                    steps * config.batch_size)
    result["epoch_loss"] = [r["loss"] for r in records]
    result["epoch_cpu_seconds"] = [r.get("cpu_seconds") for r in records]
    for r in records:
        print(f"  jaxmetric epoch {r['epoch']}: loss {r['loss']:.4f} "
              f"{r['images_per_second']:.0f} img/s", flush=True)
    t0 = time.perf_counter()
    train_emb, test_emb = report.embed_splits(state, dataset, progress=False)
    result["embed_seconds"] = time.perf_counter() - t0
    result |= score(train_emb, test_emb, dataset)
    schedule = train.make_schedule(config, steps)
    result |= {
        "train_config": config.to_dict(),
        "conv_chunk_elements": (default_chunk_elements() if config.conv_chunk_elements is None
                                else config.conv_chunk_elements),
        "param_count": models.count_params({"params": state.params}),
        "steps_per_epoch": steps,
        "lr_probe": {str(s): float(schedule(s))
                     for s in probe_steps(steps, config.epochs, config.warmup_epochs)},
        "data": data_crc(dataset),
        "devices": [str(d) for d in jax.devices()],
    }
    return result


# ---------------------------------------------------------------------------- torch side


def _describe_reducer(reducer) -> str:
    subs = getattr(reducer, "reducers", None)
    if subs:  # a loss with sub-losses: each reduced on its own, then added
        return " + ".join(f"{name}: {type(r).__name__}" for name, r in subs.items())
    return type(reducer).__name__


def run_pml(args, data_path) -> dict:
    import torch

    from jaxmetric import data
    from jaxmetric.data import CIFAR10_MEAN, CIFAR10_STD

    torch.set_num_threads(os.cpu_count())
    dataset = data.load_cifar10(data_path, max_train=args.max_train, max_test=args.max_test)
    n = len(dataset.train)
    if n < BATCH_SIZE:
        raise SystemExit(f"error: {n} training images give no full batch of {BATCH_SIZE}")
    steps = n // BATCH_SIZE
    images = torch.from_numpy(dataset.train.images)
    labels = torch.from_numpy(dataset.train.labels.astype("int64"))

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    augment = TorchAugment(generator, CIFAR10_MEAN, CIFAR10_STD)
    loss_fn = torch_loss(args.loss, args.torch_reducer)

    with tempfile.TemporaryDirectory(prefix="peer-pml-") as tmp:
        ckpt = pathlib.Path(tmp) / "checkpoint.pt"
        t_start = time.perf_counter()
        model = torch_model(args.torch_init)
        optimizer = torch_optimizer(model, lr=0.0)
        lr_at = lambda s: warmup_cosine_lr(s, steps_per_epoch=steps,  # noqa: E731
                                           epochs=args.epochs,
                                           warmup_epochs=args.warmup_epochs)
        epoch_seconds, epoch_loss, augment_seconds, step = [], [], 0.0, 0
        epoch_cpu_seconds = []
        for epoch in range(args.epochs):
            model.train()
            t0, c0 = time.perf_counter(), time.process_time()
            order = torch.randperm(n, generator=generator)[: steps * BATCH_SIZE]
            total = 0.0
            for idx in order.view(steps, BATCH_SIZE):
                ta = time.perf_counter()
                x = augment(images[idx])
                augment_seconds += time.perf_counter() - ta
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step)
                loss = loss_fn(model(x), labels[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item()
                step += 1
            epoch_seconds.append(time.perf_counter() - t0)
            epoch_cpu_seconds.append(time.process_time() - c0)
            epoch_loss.append(total / steps)
            if not math.isfinite(epoch_loss[-1]):
                raise FloatingPointError(f"the PyTorch loss became {epoch_loss[-1]} in epoch "
                                         f"{epoch + 1}")
            torch_checkpoint(ckpt, model, optimizer, generator, epoch + 1, step)
            print(f"  pml epoch {epoch + 1}: loss {epoch_loss[-1]:.4f} "
                  f"{steps * BATCH_SIZE / epoch_seconds[-1]:.0f} img/s", flush=True)
        train_seconds = time.perf_counter() - t_start

    result = timing(epoch_seconds, train_seconds, steps * BATCH_SIZE)
    result["epoch_cpu_seconds"] = epoch_cpu_seconds
    result["epoch_loss"] = epoch_loss
    result["augment_seconds"] = augment_seconds

    from jaxmetric import evaluate

    model.eval()

    @torch.no_grad()
    def embed_fn(batch):
        return model(augment.normalize(torch.from_numpy(batch))).numpy()

    t0 = time.perf_counter()
    train_emb = evaluate.embed(embed_fn, dataset.train.images, batch_size=EMBED_BATCH,
                               progress=False)
    test_emb = evaluate.embed(embed_fn, dataset.test.images, batch_size=EMBED_BATCH,
                              progress=False)
    result["embed_seconds"] = time.perf_counter() - t0
    result |= score(train_emb, test_emb, dataset)
    result |= {
        "torch_recipe": {
            "init": args.torch_init,
            "reducer": _describe_reducer(loss_fn.reducer),
            "loss": type(loss_fn).__name__,
            "margin": getattr(loss_fn, "margin", None),
            "pos_margin": getattr(loss_fn, "pos_margin", None),
            "neg_margin": getattr(loss_fn, "neg_margin", None),
            "distance": f"{type(loss_fn.distance).__name__}(p={loss_fn.distance.p}, "
                        f"power={loss_fn.distance.power}, "
                        f"normalize_embeddings={loss_fn.distance.normalize_embeddings})",
            "epochs": args.epochs, "batch_size": BATCH_SIZE, "optimizer": "SGD",
            "nesterov": True, "momentum": MOMENTUM, "lr": PEAK_LR,
            "warmup_epochs": args.warmup_epochs, "weight_decay": WEIGHT_DECAY,
            "weight_decay_on": "conv and linear weights (ndim > 1)",
            "max_train": args.max_train, "max_test": args.max_test,
            "threads": torch.get_num_threads(),
        },
        "param_count": sum(p.numel() for p in model.parameters()),
        "steps_per_epoch": steps,
        "lr_probe": {str(s): lr_at(s)
                     for s in probe_steps(steps, args.epochs, args.warmup_epochs)},
        "data": data_crc(dataset),
    }
    return result


def run_one(args) -> int:
    data_path = resolve_data(args.data)
    fn = run_jaxmetric if args.side == "jaxmetric" else run_pml
    result = {"side": args.side, "loss": args.loss, "seed": args.seed, "tag": args.tag}
    result |= fn(args, data_path)
    result["data_path"] = str(data_path)
    result["environment"] = environment()
    if args.json:
        write_json(args.json, result)
    print(f"{args.side} {args.loss} seed {args.seed}: P@1 {result['precision_at_1']:.4f} "
          f"R-precision {result['r_precision']:.4f}, train {result['train_seconds']:.1f} s "
          f"({result['images_per_second']:.0f} img/s)", flush=True)
    return 0


# -------------------------------------------------------------------------------- driver


def checks(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    out = {
        "param_count": {side: sorted({r["param_count"] for r in ok if r["side"] == side})
                        for side in PEER_SIDES},
        "same_data": len({json.dumps(r["data"], sort_keys=True) for r in ok}) <= 1,
    }
    diffs = []
    for r in ok:
        if r["side"] != "jaxmetric":
            continue
        for q in ok:
            if q["side"] == "pml" and q["loss"] == r["loss"] and q["seed"] == r["seed"]:
                common = set(r["lr_probe"]) & set(q["lr_probe"])
                diffs += [abs(r["lr_probe"][s] - q["lr_probe"][s]) for s in common]
    out["lr_schedule_max_abs_diff"] = max(diffs) if diffs else None
    return out


def _pct(mean, sd):
    if mean is None:
        return "–"
    return f"{100 * mean:.1f}" + (f" ± {100 * sd:.1f}" if sd is not None else "")


def _num(x, fmt, suffix=""):
    return "–" if x is None else format(x, fmt) + suffix


def markdown(summary: dict, header: str) -> str:
    lines = [header, "",
             "| loss | side | P@1 test→train (%) | R-precision (%) | train s | 1st epoch s "
             "| img/s | steady img/s |",
             "|---|---|---|---|---|---|---|---|"]
    for loss, per in summary.items():
        for side in PEER_SIDES:
            if side not in per:
                continue
            s = per[side]
            lines.append(
                f"| {loss} | {PEER_SIDE_NAMES[side]} | "
                f"{_pct(s['precision_at_1_mean'], s['precision_at_1_sd'])} | "
                f"{_pct(s['r_precision_mean'], s['r_precision_sd'])} | "
                f"{_num(s['train_seconds_mean'], '.0f')} | "
                f"{_num(s['first_epoch_seconds_mean'], '.1f')} | "
                f"{_num(s['images_per_second_mean'], '.0f')} | "
                f"{_num(s['steady_images_per_second_mean'], '.0f')} |")
        if "jaxmetric_vs_pml" in per:
            c = per["jaxmetric_vs_pml"]
            lines.append(
                f"| {loss} | jaxmetric vs PyTorch | "
                f"{c['precision_at_1_diff_points']:+.1f} pts | "
                f"{c['r_precision_diff_points']:+.1f} pts | "
                f"{_num(c['train_seconds_ratio'], '.2f', '×')} | | "
                f"{_num(c['images_per_second_ratio'], '.2f', '×')} | "
                f"{_num(c['steady_images_per_second_ratio'], '.2f', '×')} |")
    lines += ["", "P@1 and R-precision: mean ± sample sd over seeds, test queries against the "
              "training set (exact FAISS search). Comparison rows: differences in points, "
              "times and speeds as jaxmetric ÷ PyTorch."]
    return "\n".join(lines)


def drive(args, argv) -> int:
    data_path = resolve_data(args.data)
    sides = [args.only] if args.only else list(PEER_SIDES)
    if "jaxmetric" in sides:  # a bad --jax-set fails here, before any run
        for loss in args.losses:
            jaxmetric_config(argparse.Namespace(**vars(args) | {"loss": loss, "seed": 0}),
                             data_path)
    command = "python -m benchmarks.peer_training " + shlex.join(argv)
    note = data_note(data_path)
    doc = {
        "benchmark": "peer_training",
        "tag": args.tag,
        "command": command,
        "recipe": {
            "model": "homebrew", "widths": list(WIDTHS), "embed_dim": EMBED_DIM,
            "epochs": args.epochs, "batch_size": BATCH_SIZE, "optimizer": "SGD Nesterov",
            "momentum": MOMENTUM, "peak_lr": PEAK_LR, "warmup_epochs": args.warmup_epochs,
            "schedule": "linear warm-up then cosine to 0, per step",
            "weight_decay": WEIGHT_DECAY, "weight_decay_on": "conv/linear kernels",
            "augment": f"zero-pad {PAD}, random crop 32, random horizontal flip",
            "margin": MARGIN, "evaluation": "jaxmetric.evaluate.evaluate_embeddings, "
                                            "FAISS IndexFlatL2",
        },
        "options": {"sides": sides, "torch_init": args.torch_init,
                    "jax_cpu_devices": args.jax_cpu_devices,
                    "torch_reducer": args.torch_reducer, "jax_set": args.jax_set or []},
        "data": {"path": str(data_path), "note": note, "max_train": args.max_train,
                 "max_test": args.max_test},
        "environment": environment(),
        "runs": [],
    }
    plan = [(loss, seed, side) for loss in args.losses for seed in args.seeds
            for side in sides]
    out_path = pathlib.Path(args.json) if args.json else None

    def write():
        doc["summary"] = summarise_peer_runs(doc["runs"], args.losses, sides)
        doc["checks"] = checks(doc["runs"])
        if out_path is not None:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            write_json(out_path, doc)

    with tempfile.TemporaryDirectory(prefix="peer-training-") as tmp:
        for k, (loss, seed, side) in enumerate(plan):
            run_json = pathlib.Path(tmp) / f"{side}-{loss}-{seed}.json"
            cmd = [sys.executable, "-m", "benchmarks.peer_training", "--run",
                   "--side", side, "--loss", loss, "--seed", str(seed),
                   "--epochs", str(args.epochs), "--warmup-epochs", str(args.warmup_epochs),
                   "--max-train", str(args.max_train),
                   "--max-test", str(args.max_test), "--data", str(data_path),
                   "--json", str(run_json)]
            if args.tag:
                cmd += ["--tag", args.tag]
            if side == "jaxmetric":
                for item in args.jax_set or ():
                    cmd += ["--jax-set", item]
                if args.jax_cpu_devices is not None:
                    cmd += ["--jax-cpu-devices", str(args.jax_cpu_devices)]
            else:
                cmd += ["--torch-init", args.torch_init, "--torch-reducer", args.torch_reducer]
            print(f"[{k + 1}/{len(plan)}] {PEER_SIDE_NAMES[side]}, {loss}, seed {seed}", flush=True)
            t0 = time.perf_counter()
            run, error = run_child(cmd, run_json)
            doc["runs"].append(run or {"side": side, "loss": loss, "seed": seed, "error": error,
                                       "wall_seconds": time.perf_counter() - t0})
            write()

    n_train = f"{args.max_train:,}"
    epochs = f"{args.epochs} epoch" + ("s" if args.epochs != 1 else "")
    header = (f"{note}: homebrew, {epochs} of batch {BATCH_SIZE}, {n_train} train "
              f"/ {args.max_test:,} test images, seeds {' '.join(map(str, args.seeds))}, "
              f"{os.cpu_count()} CPU cores; PyTorch init {args.torch_init}, PML reducer "
              f"{args.torch_reducer}"
              + (f"; jaxmetric {' '.join(args.jax_set)}" if args.jax_set else "")
              + (f" [{args.tag}]" if args.tag else ""))
    print()
    print(markdown(doc["summary"], header))
    c = doc["checks"]
    print(f"\nparameters: {c['param_count']}; same data on both sides: {c['same_data']}; "
          f"max |lr difference| at probed steps: {c['lr_schedule_max_abs_diff']}")
    print(f"command: {command}")
    if out_path is not None:
        print(f"wrote {out_path}")
    counts = {n for side in c["param_count"].values() for n in side}
    lr_diff = c["lr_schedule_max_abs_diff"]
    if len(counts) > 1 or not c["same_data"] or (lr_diff is not None and lr_diff > 1e-6):
        print("WARNING: the two sides differ in parameter count, data or learning-rate "
              "schedule (see 'checks' in the JSON)", file=sys.stderr)
    failed = [r for r in doc["runs"] if "error" in r]
    for r in failed:
        print(f"FAILED: {r['side']} {r['loss']} seed {r['seed']}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.peer_training", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--warmup-epochs", type=float, default=WARMUP_EPOCHS,
                   help="linear warm-up length, then cosine to 0 (must be < --epochs)")
    p.add_argument("--max-train", type=int, default=10_000)
    p.add_argument("--max-test", type=int, default=2_000)
    p.add_argument("--data", help=f"CIFAR-10 source (default ${DATA_ENV}, else "
                   "../shared/data/cifar10-jpeg.tar.xz beside the repository)")
    p.add_argument("--json", help="write the results here (the driver: all runs and the "
                   "summary; --run: that run)")
    p.add_argument("--only", choices=PEER_SIDES, help="run one side only")
    p.add_argument("--tag", help="name of this variant, recorded in the JSON")
    p.add_argument("--jax-set", action="append", metavar="KEY=VALUE",
                   help="override a jaxmetric TrainConfig field (repeatable; the value is "
                   "parsed as JSON, else taken as a string), e.g. --jax-set margin=0.3")
    p.add_argument("--jax-cpu-devices", type=int, metavar="N",
                   help="jaxmetric side: split the CPU into N XLA devices "
                        "(jaxmetric.train.use_cpu_devices; the same training, N shards at once)")
    p.add_argument("--torch-init", choices=TORCH_INITS, default="default",
                   help="PyTorch's default initialisation, or jaxmetric's (he)")
    p.add_argument("--torch-reducer", choices=TORCH_REDUCERS, default="default",
                   help="PML's default AvgNonZeroReducer, or MeanReducer")
    p.add_argument("--run", action="store_true", help="(internal) one run in this process")
    p.add_argument("--side", choices=PEER_SIDES, help="with --run")
    p.add_argument("--loss", choices=LOSSES, help="with --run")
    p.add_argument("--seed", type=int, help="with --run")
    args = p.parse_args(argv)
    if args.epochs < 1 or not 0 <= args.warmup_epochs < args.epochs:
        p.error("need --epochs >= 1 and 0 <= --warmup-epochs < --epochs "
                "(e.g. --epochs 1 --warmup-epochs 0.5 for a smoke test)")
    if args.run:
        if args.side is None or args.loss is None or args.seed is None:
            p.error("--run needs --side, --loss and --seed")
        return run_one(args)
    return drive(args, argv)


if __name__ == "__main__":
    sys.exit(main())
