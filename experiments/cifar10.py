"""Train an embedding network on CIFAR-10 with a contrastive or triplet loss.

    python -m experiments.cifar10 --loss contrastive
    python -m experiments.cifar10 --loss triplet --mining semihard --epochs 30
    python -m experiments.cifar10 --loss triplet --model homebrew --epochs 3 \\
        --max-train 5000 --max-test 1000 --data-dir ../shared/data/cifar10-jpeg.tar.xz

Trains data-parallel on every local device (or, with ``--coordinator``, on every device
of several processes), checkpoints every epoch, then evaluates retrieval with FAISS and
leaves a run folder (``--out``):

    config.json      the run's configuration (TrainConfig)
    metrics.jsonl    one record per epoch (loss, active fraction, images/s, P@1 ...)
    checkpoints/     orbax checkpoints of the last epochs (--resume continues from them)
    metrics.json     final retrieval and clustering metrics
    report.md        the metrics table and the three pictures below
    tsne.png, curves.png, neighbours.png

``--data-dir`` takes a ``cifar-10-batches-py`` folder, an image-folder tree
``train|test/<class>/*.jpg`` or a ``.tar.xz``/``.tar.gz`` of one; without it the data
comes from tensorflow-datasets (needs the internet the first time).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time

from experiments.presets import PRESETS
from jaxmetric import flags
from jaxmetric.config import TrainConfig


def build_parser() -> argparse.ArgumentParser:
    """The command line: one flag per :class:`TrainConfig` field (:mod:`jaxmetric.flags`)
    plus ``--preset`` and the flags that are not part of the config."""
    p = argparse.ArgumentParser(
        prog="python -m experiments.cifar10",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="start from this recipe (experiments/presets.py); flags given "
                        "here override it")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--tsne-points", type=int, default=5000)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--verbose", action="store_true",
                   help="also show other libraries' INFO logs (orbax, faiss, ...)")
    flags.add_config_arguments(p.add_argument_group(
        "training configuration (jaxmetric.config.TrainConfig; without --out the run "
        "folder is runs/cifar10-<loss>-<time>)"), required=("loss",))
    dist = p.add_argument_group("several processes (see README, 'More than one machine')")
    dist.add_argument("--coordinator", help="HOST:PORT of process 0 (env JAXMETRIC_COORDINATOR)")
    dist.add_argument("--num-processes", type=int, help="env JAXMETRIC_NUM_PROCESSES")
    dist.add_argument("--process-id", type=int, help="env JAXMETRIC_PROCESS_ID")
    return p


def config_from_args(args, parser) -> TrainConfig:
    """Defaults, then the preset, then the flags given; exits 2 (``parser.error``) on a
    missing loss or an invalid combination."""
    values = dict(PRESETS[args.preset]) if args.preset else {}
    values |= flags.given_values(args)
    if "loss" not in values:
        parser.error("--loss is required (or a --preset that sets it)")
    if values.get("out") is None:
        values["out"] = time.strftime(f"runs/cifar10-{values['loss']}-%Y%m%d-%H%M%S")
    try:
        return TrainConfig(**values)
    except (ValueError, TypeError) as e:
        parser.error(str(e))


def out_given(args) -> bool:
    """Whether the run folder was named (by --out or the preset), not made up."""
    preset = PRESETS[args.preset] if args.preset else {}
    return getattr(args, "out", preset.get("out")) is not None


CPU_COMMAND = "python -m experiments.cifar10 --preset cpu --loss LOSS --data-dir DATA"
"""The README's small CPU run (2.5-3.5 minutes of training on two cores)."""


def setup_logging(verbose: bool) -> None:
    """jaxmetric's own lines at INFO; other libraries' INFO only with ``--verbose``."""
    handler = logging.StreamHandler()  # main() routes it through tqdm.write
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    for name in ("jaxmetric", "experiments", __name__):
        logging.getLogger(name).setLevel(logging.INFO)
    if not verbose:
        try:  # orbax logs through absl, which has a verbosity of its own
            from absl import logging as absl_logging

            absl_logging.set_verbosity(absl_logging.WARNING)
        except ImportError:
            pass


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume and not out_given(args):
        parser.error("--resume needs --out: the run folder to continue")
    config = config_from_args(args, parser)
    setup_logging(args.verbose)
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():  # log lines that do not tear the progress bars apart
        return run(args, parser, config)


def run(args, parser, config) -> int:
    """Train, evaluate and report: :func:`main` after parsing and logging set-up."""
    from jaxmetric import distributed

    try:
        multiprocess = distributed.initialize(args.coordinator, args.num_processes,
                                              args.process_id)
    except ValueError as e:
        parser.error(str(e))
    if multiprocess and not out_given(args):
        parser.error("--out is required with several processes: the same shared folder "
                     "on every host (the default name holds each host's start time)")

    import jax

    from jaxmetric import data, report, train

    progress = not args.no_progress
    try:
        dataset = data.load_cifar10(config.data_dir, max_train=config.max_train,
                                    max_test=config.max_test)
    except data.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    mesh = train.make_mesh(jax.devices())  # every device of every process
    try:
        config.check_devices(mesh.size)
    except ValueError as e:
        parser.error(str(e))
    hook = report.precision_at_1_hook(dataset, mesh=mesh)
    try:
        hint = CPU_COMMAND.replace("DATA", config.data_dir or "CIFAR10_DIR").replace(
            "LOSS", config.loss)
        state = train.fit(config, dataset, config.out, resume=args.resume, eval_hook=hook,
                          mesh=mesh, progress=progress, slow_cpu_hint=hint)
    except (FileExistsError, FileNotFoundError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    metrics = report.evaluate_state(
        state, dataset, config.out, config=dataclasses.asdict(config), epoch=config.epochs,
        mesh=mesh, tsne_points=args.tsne_points, progress=progress,
    )
    if jax.process_index() == 0:
        print(f"{config.out}: {report.summary_line(metrics)}")
    # Keep every process alive until process 0 has written the report: one that exits
    # early would wait in JAX's shutdown barrier and, past its timeout, stop them all.
    distributed.barrier("report")
    return 0


if __name__ == "__main__":
    sys.exit(main())
