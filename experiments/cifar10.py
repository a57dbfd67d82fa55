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

from jaxmetric.config import DTYPES, LOSSES, OPTIMIZERS, TrainConfig
from jaxmetric.losses import MINING_MODES, REDUCTIONS
from jaxmetric.models import INITS, MODEL_NAMES


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m experiments.cifar10",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--loss", choices=LOSSES, required=True)
    p.add_argument("--mining", choices=MINING_MODES, help="triplet mining (default: all)")
    p.add_argument("--margin", type=float, help="default: 1.0 contrastive, 0.2 triplet")
    p.add_argument("--pos-margin", type=float, default=d.pos_margin, help="contrastive only")
    p.add_argument("--euclidean", action="store_true",
                   help="triplet on Euclidean instead of squared distances")
    p.add_argument("--power", type=float, default=d.power,
                   help="contrastive only: exponent of each hinge (2 Hadsell, 1 PML)")
    p.add_argument("--reduction", choices=REDUCTIONS, default=d.reduction,
                   help="mean over all selected pairs/triplets, or over the non-zero ones")
    p.add_argument("--model", choices=MODEL_NAMES, default=d.model)
    p.add_argument("--embed-dim", type=int, default=d.embed_dim)
    p.add_argument("--weight-init", choices=INITS, default=d.weight_init,
                   help="weight init: he (He normal, fan-out) or torch (PyTorch's default)")
    p.add_argument("--dtype", choices=DTYPES, default=d.dtype, help="compute dtype")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch")
    p.add_argument("--classes-per-batch", type=int,
                   help="P of class-balanced 'P classes x K images' batches")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    p.add_argument("--lr", type=float, help="peak learning rate (default scales with batch)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup-epochs", type=float,
                   help="linear warm-up (default: min(5, epochs / 10))")
    p.add_argument("--no-augment", action="store_true", help="no random crop / flip")
    p.add_argument("--data-dir", help="local CIFAR-10 (folder or archive); default: tfds")
    p.add_argument("--out", help="run folder (default: runs/cifar10-<loss>-<time>)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--max-train", type=int, help="first N training images, class-balanced")
    p.add_argument("--max-test", type=int, help="first N test images, class-balanced")
    p.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="precision@1 every N epochs (and at the end)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="checkpoint every N epochs (and at the end)")
    p.add_argument("--tsne-points", type=int, default=5000)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--verbose", action="store_true",
                   help="also show other libraries' INFO logs (orbax, faiss, ...)")
    dist = p.add_argument_group("several processes (see README, 'More than one machine')")
    dist.add_argument("--coordinator", help="HOST:PORT of process 0 (env JAXMETRIC_COORDINATOR)")
    dist.add_argument("--num-processes", type=int, help="env JAXMETRIC_NUM_PROCESSES")
    dist.add_argument("--process-id", type=int, help="env JAXMETRIC_PROCESS_ID")
    return p


def config_from_args(args, parser) -> TrainConfig:
    out = args.out or time.strftime(f"runs/cifar10-{args.loss}-%Y%m%d-%H%M%S")
    try:
        return TrainConfig(
            model=args.model, embed_dim=args.embed_dim, weight_init=args.weight_init, dtype=args.dtype, loss=args.loss,
            margin=args.margin, pos_margin=args.pos_margin, mining=args.mining,
            squared=not args.euclidean, power=args.power, reduction=args.reduction, epochs=args.epochs, batch_size=args.batch_size,
            classes_per_batch=args.classes_per_batch, augment=not args.no_augment,
            optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
            warmup_epochs=args.warmup_epochs, seed=args.seed, max_train=args.max_train,
            max_test=args.max_test, eval_every=args.eval_every,
            checkpoint_every=args.checkpoint_every, data_dir=args.data_dir, out=out,
        )
    except (ValueError, TypeError) as e:
        parser.error(str(e))


CPU_COMMAND = ("python -m experiments.cifar10 --loss triplet --model homebrew --batch-size 256 "
               "--epochs 10 --max-train 10000 --max-test 2000 --data-dir DATA")
"""The README's small CPU run (about 2-3 minutes of training on two cores)."""


class _TqdmHandler(logging.StreamHandler):
    """Log lines that do not tear the progress bars apart."""

    def emit(self, record):
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 (logging must never raise)
            self.handleError(record)


def setup_logging(verbose: bool) -> None:
    """jaxmetric's own lines at INFO; other libraries' INFO only with ``--verbose``."""
    handler = _TqdmHandler()
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
    if args.resume and not args.out:
        parser.error("--resume needs --out: the run folder to continue")
    config = config_from_args(args, parser)
    setup_logging(args.verbose)

    from jaxmetric import distributed

    try:
        multiprocess = distributed.initialize(args.coordinator, args.num_processes,
                                              args.process_id)
    except ValueError as e:
        parser.error(str(e))
    if multiprocess and not args.out:
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
            "triplet", config.loss)
        state = train.fit(config, dataset, config.out, resume=args.resume, eval_hook=hook,
                          mesh=mesh, progress=progress, slow_cpu_hint=hint)
    except (FileExistsError, FileNotFoundError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    metrics = report.evaluate_state(
        state, dataset, config.out, config=dataclasses.asdict(config), epoch=config.epochs, mesh=mesh,
        tsne_points=args.tsne_points, progress=progress,
    )
    if jax.process_index() == 0:
        print(f"{config.out}: {report.summary_line(metrics)}")
    # Keep every process alive until process 0 has written the report: one that exits
    # early would wait in JAX's shutdown barrier and, past its timeout, stop them all.
    distributed.barrier("report")
    return 0


if __name__ == "__main__":
    sys.exit(main())
