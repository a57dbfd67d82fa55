"""Every loss trained with the same CPU recipe: one table of retrieval quality.

    python -m benchmarks.loss_table --data-dir ../shared/data/cifar10-jpeg.tar.xz \\
        --seeds 0 --json benchmarks/results/loss-table-cpu.json

Runs ``python -m experiments.cifar10 --preset cpu --loss NAME --seed S`` (the homebrew
CNN, the first 10,000 training and 2,000 test images, 10 epochs, batch 256) for each
loss of :data:`jaxmetric.losses.registry.NAMES` (or ``--losses``) and seed, one process at a
time, each with the loss's defaults (``jaxmetric.losses.registry.LOSSES`` and the loss
function's own), and collects each run folder (:func:`benchmarks.common.collect`:
P@1 test→train, R-precision and MAP@R test→test, training seconds, images/s), with the
settings each run trained with (:func:`settings`: the optimizer, the peak learning rate
and the loss's tuned values). Extra flags for every run go after ``--`` (``-- --unseen-classes
5`` for the class-disjoint protocol). A finished run folder is collected again instead of
being trained twice, so an interrupted table can be completed.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import statistics
import subprocess
import sys

from benchmarks.common import collect
from jaxmetric.losses import registry
from jaxmetric.train.config import LOSSES, TrainConfig
from jaxmetric.tune import space
from jaxmetric.utils import write_atomic


def run_one(loss: str, seed: int, args, extra: list[str]) -> dict:
    out = pathlib.Path(args.runs) / f"{loss}-seed{seed}"
    cmd = [sys.executable, "-m", "experiments.cifar10", "--preset", "cpu", "--loss", loss,
           "--seed", str(seed), "--tsne-points", "0", "--no-progress",
           "--eval-every", "10", "--out", str(out)]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    cmd += extra
    command = shlex.join(["python", *cmd[1:]])
    if not (out / "metrics.json").is_file():
        print(f"$ {command}", flush=True)
        subprocess.run(cmd, check=True)
    return collect(out, command=command)


def settings(config: dict) -> str:
    """What a run's ``config.json`` resolved to, in short: ``"adamw, lr 0.000777; margin
    0.354, scale 30.6; weights at 22.4 x lr"`` -- the optimizer and peak learning rate, the
    loss keywords its search space tunes or its registry entry sets (and its margin), and
    the learning-rate multiplier of its learned argument."""
    c = TrainConfig.from_dict(config)
    entry = registry.get(c.loss)
    names = [n for n in {**entry.tuning_space, **dict.fromkeys(entry.options)}
             if n not in ("optimizer", "lr_factor", "loss_lr_multiplier")]
    values = space.default_values(c.to_dict(), dict.fromkeys(names))
    shown = [f"{k} {v:.3g}" if isinstance(v, (int, float)) and not isinstance(v, bool)
             else f"{k} {v}" for k, v in values.items()]
    parts = [f"{c.run_optimizer}, lr {c.peak_lr:.3g}", ", ".join(shown)]
    if entry.learned is not None:
        parts.append(f"{entry.learned} at {c.loss_lr_scale:.3g} x lr")
    return "; ".join(p for p in parts if p)


def table(results: list[dict]) -> str:
    by_loss: dict[str, list[dict]] = {}
    for r in results:
        by_loss.setdefault(r["loss"], []).append(r)
    lines = ["| loss | settings | seeds | P@1 (test→train) | R-precision | MAP@R | training s "
             "| images/s |", "|---|---|---|---|---|---|---|---|"]

    def pct(rs, key):
        values = [100 * r[key] for r in rs]
        if len(values) == 1:
            return f"{values[0]:.1f} %"
        return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f} %"

    for loss, rs in by_loss.items():
        lines.append(
            f"| `{loss}` | {settings(rs[0]['config'])} | {len(rs)} | "
            f"{pct(rs, 'precision_at_1')} | {pct(rs, 'r_precision')} | "
            f"{pct(rs, 'map_at_r')} | {statistics.mean(r['train_seconds'] for r in rs):.0f} | "
            f"{statistics.mean(r['images_per_second'] for r in rs):.0f} |")
    return "\n".join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--data-dir", help="CIFAR-10 folder or archive (default: tfds)")
    p.add_argument("--runs", default="runs/loss-table", help="where the run folders go")
    p.add_argument("--json", help="write every run's results here")
    args = p.parse_args(argv)
    results = []
    for loss in args.losses:
        for seed in args.seeds:
            r = run_one(loss, seed, args, extra)
            results.append({k: v for k, v in r.items() if k != "metrics"})
            print(f"{loss} seed {seed}: P@1 {100 * r['precision_at_1']:.1f} %", flush=True)
            if args.json:  # after every run: a partial table survives an interruption
                write_atomic(args.json, json.dumps(results, indent=1) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
