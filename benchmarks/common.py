"""What the benchmarks share: paths, the environment record, child runs, synthetic inputs,
the PyTorch reference pieces and the peer-training summary.

Every module under ``benchmarks/`` imports what it shares with another benchmark from
here, and from no other benchmark module (``tests/test_benchmarks_layout.py`` checks
that). A piece lives here once at least two benchmarks use it; what only one benchmark
needs stays in it.

**Standard library only at import time.** This module imports nothing but the standard
library when it is imported: NumPy, JAX, jaxmetric, PyTorch and pytorch-metric-learning
are imported inside the functions that need them. So it is safe for both sides of a
side-by-side benchmark -- the PyTorch runs of :mod:`benchmarks.peer_training` and
:mod:`benchmarks.cpu.step_parts` are subprocesses that never start JAX -- and importing
it starts no JAX backend, so a benchmark may still set ``XLA_FLAGS`` or split the CPU
into devices after importing it (:mod:`benchmarks.cpu.op_profile`,
:mod:`benchmarks.cpu.device_sync`). Keep it that way.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata

REPO = pathlib.Path(__file__).resolve().parents[1]
"""The repository root: the working directory of every child run."""

# The losses and networks that have a PyTorch counterpart here.
LOSSES = ("triplet", "contrastive")
MODELS = ("homebrew", "resnet18")
CLASSES = 10  # of the synthetic inputs (CIFAR-10 shaped)
EMBED_DIM = 128

# The two sides of benchmarks.peer_training (and of its result files).
PEER_SIDES = ("jaxmetric", "pml")
PEER_SIDE_NAMES = {"jaxmetric": "jaxmetric", "pml": "PyTorch + PML"}

# The reference recipe of benchmarks.peer_training that the PyTorch pieces below use.
MARGIN = {"triplet": 0.2, "contrastive": 1.0}
WIDTHS = (32, 64, 128, 128)
PEAK_LR = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
WARMUP_EPOCHS = 1
PAD = 4
BN_EPS = 1e-5
NORM_EPS = 1e-6


# ------------------------------------------------------------------ drivers and runs


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def environment() -> dict:
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "versions": {d: _version(d) for d in (
            "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "torch",
            "pytorch-metric-learning", "faiss-cpu", "numpy")},
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def git_state() -> dict:
    def git(*cmd):
        try:
            return subprocess.run(["git", "--no-optional-locks", *cmd], cwd=REPO, text=True,
                                  capture_output=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return None

    commit = git("rev-parse", "--short", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    changed = [line[3:] for line in status.splitlines() if line.strip()] if status else []
    commit = commit.strip() if commit else None
    return {"commit": commit, "dirty": bool(changed), "changed_files": changed}


def write_json(path, obj) -> None:
    """``obj`` as indented JSON, written whole or not at all
    (:func:`jaxmetric.utils.write_atomic`)."""
    from jaxmetric.utils import write_atomic

    write_atomic(path, json.dumps(obj, indent=1, default=float) + "\n")


def run_child(cmd: list[str], run_json: pathlib.Path,
              env: dict | None = None) -> tuple[dict | None, str | None]:
    """Run one benchmark process (in ``env``, default this one's); ``(its JSON result,
    None)`` or ``(None, the error)``."""
    proc = subprocess.run(cmd, cwd=REPO, env=env)
    if proc.returncode != 0 or not run_json.exists():
        return None, f"exit status {proc.returncode}"
    return json.loads(run_json.read_text()), None


def finish_driver(doc: dict, json_path: str | None, table: str, failed: list[str]) -> int:
    """End of a benchmark driver: write ``doc`` (if it has runs), print the table and the
    failed runs; the exit status (1 if any failed)."""
    if json_path and doc["runs"]:
        write_json(pathlib.Path(json_path), doc)
    print()
    print(table)
    for f in failed:
        print(f"FAILED: {f}", file=sys.stderr)
    return 1 if failed else 0


# ------------------------------------------------------------------ synthetic inputs


def synthetic_arrays(n: int, seed: int = 0):
    """``n`` random uint8 CIFAR-shaped images and labels cycling over :data:`CLASSES`
    (NumPy only: the PyTorch side uses them as they are)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = (np.arange(n) % CLASSES).astype(np.int32)
    return images, labels


def synthetic_dataset(n: int, seed: int = 0):
    """:func:`synthetic_arrays` as a :class:`jaxmetric.data.Dataset` (train = test), with
    CIFAR-10's class names and normalisation statistics."""
    from jaxmetric import data

    split = data.Split(*synthetic_arrays(n, seed))
    return data.Dataset(train=split, test=split, class_names=data.CIFAR10_CLASSES,
                        mean=data.CIFAR10_MEAN, std=data.CIFAR10_STD)


def unit_embeddings(b: int, seed: int = 1):
    """``b`` random unit vectors of :data:`EMBED_DIM` dimensions, float32 (NumPy)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, EMBED_DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def batch_indices(n: int, b: int, count: int, seed: int = 2):
    """``count`` batches of ``b`` distinct indices below ``n``, int32 (NumPy)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.permutation(n)[:b].astype(np.int32) for _ in range(count)]


# ------------------------------------------------------------------ jaxmetric runs


def whole_loop(config, dataset, mesh) -> float:
    """:func:`jaxmetric.train.fit` of ``config`` (a ``TrainConfig``) on ``dataset`` in a
    temporary folder; the last epoch's images/s from its ``metrics.jsonl``."""
    from jaxmetric import train

    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "run"
        train.fit(config, dataset, out, mesh=mesh, progress=False)
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return records[-1]["images_per_second"]


def collect(run_dir, *, command: str, device: str | None = None) -> dict:
    """A finished ``experiments.cifar10`` run folder as one results dict (the keys are in
    :mod:`benchmarks.collect_run`); ``device`` defaults to a description of
    ``jax.devices()``."""
    import jax

    run_dir = pathlib.Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    speeds = [r["images_per_second"] for r in records[1:]] or [records[0]["images_per_second"]]
    if device is None:
        d = jax.devices()[0]
        device = f"{jax.device_count()} x {d.device_kind} ({d.platform})"
    return {
        "loss": config["loss"],
        "mining": config.get("mining"),
        "model": config["model"],
        "epochs": len(records),
        "precision_at_1": metrics["test_vs_train"]["precision_at_1"],
        "r_precision": metrics["test_vs_test"]["r_precision"],
        "map_at_r": metrics["test_vs_test"]["map_at_r"],
        "train_seconds": sum(r["epoch_seconds"] for r in records),
        "images_per_second": statistics.median(speeds),
        "device": device,
        "date": time.strftime("%Y-%m-%d"),
        "command": command,
        "dataset": metrics.get("run", {}).get("dataset"),
        "config": config,
        "metrics": metrics,
    }


# ------------------------------------------------------------ the PyTorch reference


def warmup_cosine_lr(step: int, *, steps_per_epoch: int, epochs: int,
                     warmup_epochs: float = WARMUP_EPOCHS, peak: float = PEAK_LR) -> float:
    """The learning rate before update ``step`` (0-based), as jaxmetric computes it.

    ``optax.warmup_cosine_decay_schedule(0, peak, warmup, max(total, warmup + 1), 0)``
    with ``warmup = round(warmup_epochs * steps_per_epoch)`` (jaxmetric.train.make_schedule):
    linear from 0 over ``warmup`` steps, then a half cosine reaching 0 at step ``total``.
    """
    total = epochs * steps_per_epoch
    warmup = int(round(warmup_epochs * steps_per_epoch))
    decay_steps = max(total, warmup + 1)
    if step < warmup:
        return peak * step / warmup
    t = min(step - warmup, decay_steps - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * t / (decay_steps - warmup)))


def torch_model(init: str):
    """The homebrew network in PyTorch (NCHW), initialised as ``init`` says."""
    from torch import nn

    class Homebrew(nn.Module):
        def __init__(self):
            super().__init__()
            layers, cin = [], 3
            for i, width in enumerate(WIDTHS):
                layers += [nn.Conv2d(cin, width, 3, padding=1, bias=False),
                           nn.BatchNorm2d(width, eps=BN_EPS, momentum=0.1),
                           nn.ReLU(inplace=True)]
                if i < len(WIDTHS) - 1:
                    layers.append(nn.MaxPool2d(2))
                cin = width
            self.trunk = nn.Sequential(*layers)
            self.head = nn.Linear(cin, EMBED_DIM)

        def forward(self, x):
            x = self.head(self.trunk(x).mean(dim=(2, 3)))
            return x / x.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)

    model = Homebrew()
    if init == "he":
        # jaxmetric's initialisation: He fan-out normal convs (untruncated), flax's
        # Dense default (LeCun normal truncated at 2 sd) and a zero bias.
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                std = math.sqrt(1.0 / m.in_features) / 0.87962566103423978
                nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
                nn.init.zeros_(m.bias)
    elif init != "default":
        raise ValueError(f"unknown --torch-init {init!r}")
    return model


def torch_loss(loss: str, reducer: str):
    from pytorch_metric_learning import distances, losses, reducers

    kwargs = {}
    if reducer == "mean":
        kwargs["reducer"] = reducers.MeanReducer()
    elif reducer != "default":
        raise ValueError(f"unknown --torch-reducer {reducer!r}")
    if loss == "triplet":
        return losses.TripletMarginLoss(margin=MARGIN["triplet"],
                                        distance=distances.LpDistance(power=2), **kwargs)
    return losses.ContrastiveLoss(**kwargs)


def torch_optimizer(model, lr: float, weight_decay: float = WEIGHT_DECAY):
    """SGD with Nesterov momentum, weight decay on kernels (ndim > 1) only: jaxmetric's
    ``make_optimizer`` for ``optimizer="sgd"``."""
    import torch

    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=lr, momentum=MOMENTUM, nesterov=True)


def torch_checkpoint(path, model, optimizer, generator, epoch: int, step: int) -> None:
    """What the PyTorch loop saves every epoch, written whole or not at all."""
    import torch

    from jaxmetric.utils import atomic_writer

    with atomic_writer(path, "wb") as f:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "epoch": epoch, "step": step, "generator": generator.get_state()}, f)


class TorchAugment:
    """Zero-pad, per-example random crop + flip, normalise: uint8 NHWC -> float NCHW.

    Vectorised over the batch: the crop offsets and flips become one index tensor into
    the flattened padded batch (the flip folded into the column order) and a single
    ``torch.take`` gathers every crop; no Python loop over images.
    """

    def __init__(self, generator, mean, std):
        import torch

        self.torch = torch
        self.generator = generator
        mean = torch.tensor(mean, dtype=torch.float32)
        std = torch.tensor(std, dtype=torch.float32)
        # (x / 255 - mean) / std as one multiply-add per channel
        self.scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1)
        self.shift = (-mean / std).view(1, -1, 1, 1)

    def normalize(self, images):
        x = images.permute(0, 3, 1, 2).to(self.torch.float32,
                                          memory_format=self.torch.contiguous_format)
        return x.mul_(self.scale).add_(self.shift)

    def __call__(self, images):
        torch = self.torch
        b, h, w, c = images.shape
        hp, wp = h + 2 * PAD, w + 2 * PAD
        padded = torch.zeros((b, hp, wp, c), dtype=images.dtype)
        padded[:, PAD:PAD + h, PAD:PAD + w] = images
        offsets = torch.randint(0, 2 * PAD + 1, (b, 2), generator=self.generator)
        flips = torch.rand(b, generator=self.generator) < 0.5
        rows = offsets[:, :1] + torch.arange(h)
        cols = offsets[:, 1:] + torch.arange(w)
        cols = torch.where(flips[:, None], cols.flip(1), cols)
        pixel = (torch.arange(b)[:, None, None] * (hp * wp) + rows[:, :, None] * wp
                 + cols[:, None, :])
        crops = torch.take(padded, pixel[..., None] * c + torch.arange(c))
        return self.normalize(crops)


# -------------------------------------------------------- peer-training summaries


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _sd(values):
    values = [v for v in values if v is not None]
    return statistics.stdev(values) if len(values) > 1 else None


SUMMARY_KEYS = ("train_seconds", "first_epoch_seconds", "images_per_second",
                "steady_images_per_second", "embed_seconds", "search_seconds")


def steady_cpu_use(run: dict) -> dict:
    """The CPU the run used in epochs 2..N, from its per-epoch process CPU and wall times.

    ``cpu_seconds_per_epoch`` is the work done (all threads' CPU time, averaged over the
    epochs), ``cores_busy`` = CPU seconds / wall seconds, how many cores it kept busy on
    average. Both ``None`` for a run without two epochs of CPU times.
    """
    cpu = run.get("epoch_cpu_seconds") or []
    wall = run.get("epoch_seconds") or []
    if len(cpu) != len(wall):
        return {"cpu_seconds_per_epoch": None, "cores_busy": None}
    pairs = [(c, w) for c, w in zip(cpu[1:], wall[1:], strict=True) if c is not None]
    if not pairs:
        return {"cpu_seconds_per_epoch": None, "cores_busy": None}
    c, w = sum(c for c, _ in pairs), sum(w for _, w in pairs)
    return {"cpu_seconds_per_epoch": c / len(pairs), "cores_busy": c / w}


def summarise_peer_runs(runs: list[dict], losses, sides) -> dict:
    """Per loss and side, over the runs of :mod:`benchmarks.peer_training` (those without
    an error): the seeds, mean and sample sd of the retrieval metrics, mean times and
    speeds, steady CPU use; and per loss the jaxmetric-vs-PyTorch differences and
    ratios (``jaxmetric_vs_pml``) where both sides ran."""
    out = {}
    for loss in losses:
        per = {}
        for side in sides:
            rs = [r for r in runs if r["loss"] == loss and r["side"] == side and "error" not in r]
            if not rs:
                continue
            s = {"n": len(rs), "seeds": [r["seed"] for r in rs]}
            for key in ("precision_at_1", "r_precision", "map_at_r",
                        "test_vs_test_precision_at_1"):
                s[f"{key}_mean"] = _mean([r[key] for r in rs])
                s[f"{key}_sd"] = _sd([r[key] for r in rs])
            for key in SUMMARY_KEYS:
                s[f"{key}_mean"] = _mean([r[key] for r in rs])
            for key in ("cpu_seconds_per_epoch", "cores_busy"):
                s[f"steady_{key}_mean"] = _mean([steady_cpu_use(r)[key] for r in rs])
            per[side] = s
        if "jaxmetric" in per and "pml" in per:
            j, p = per["jaxmetric"], per["pml"]
            def ratio(k, j=j, p=p):
                return (j[k] / p[k]) if j[k] and p[k] else None

            per["jaxmetric_vs_pml"] = {
                "precision_at_1_diff_points": 100 * (j["precision_at_1_mean"]
                                                     - p["precision_at_1_mean"]),
                "r_precision_diff_points": 100 * (j["r_precision_mean"]
                                                  - p["r_precision_mean"]),
                "images_per_second_ratio": ratio("images_per_second_mean"),
                "steady_images_per_second_ratio": ratio("steady_images_per_second_mean"),
                "train_seconds_ratio": ratio("train_seconds_mean"),
                "steady_cpu_seconds_per_epoch_ratio": ratio("steady_cpu_seconds_per_epoch_mean"),
                "steady_cores_busy_ratio": ratio("steady_cores_busy_mean"),
            }
        out[loss] = per
    return out
