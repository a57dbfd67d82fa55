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

**Classes never seen in training** (how metric learning is measured):
``--unseen-classes N`` holds the last N classes (label order) out of training; the
network trains on the training images of the others, and every number -- the per-epoch
precision@1 included -- is measured on the held-out classes: their test images query
their training images (``test_vs_train`` in metrics.json), and each other, leave-one-out
(``test_vs_test``). ``--max-train``/``--max-test`` select images before the split.

    python -m experiments.cifar10 --preset cpu --loss triplet --unseen-classes 5 \\
        --data-dir ../shared/data/cifar10-jpeg.tar.xz
"""

from __future__ import annotations

import sys

from experiments import driver
from jaxmetric.train.config import TrainConfig


def build_parser():
    """The command line: one flag per :class:`TrainConfig` field (:mod:`jaxmetric.train.flags`)
    plus ``--preset`` and the flags that are not part of the config
    (:func:`experiments.driver.build_parser`)."""
    return driver.build_parser("python -m experiments.cifar10", __doc__, "cifar10",
                               data_fields=DATA_FLAGS)


DATA_FLAGS = ("path", "max_train", "max_test", "unseen_classes")
"""The :class:`~jaxmetric.data.DataConfig` fields this command sets (``path`` is
``--data-dir``)."""


def config_from_args(args, parser) -> TrainConfig:
    """Defaults, then the preset, then the flags given; exits 2 on a missing loss or an
    invalid combination."""
    return driver.config_from_args(args, parser)


CPU_COMMAND = "python -m experiments.cifar10 --preset cpu --loss LOSS --data-dir DATA"
"""The small CPU run of docs/training.md (2.5-3.5 minutes of training on two cores)."""


def main(argv=None) -> int:
    return driver.main(build_parser(), run, argv)


def data_config_from_args(args, parser, config: TrainConfig):
    """The run's :class:`~jaxmetric.data.DataConfig`: CIFAR-10 from ``--data-dir`` (or
    tensorflow-datasets), the limits and ``--unseen-classes``; exits 2 on a bad value."""
    return driver.data_config_from_args(args, parser, config, source="cifar10")


def run(args, parser, config) -> int:
    """Load CIFAR-10 (split by class with ``--unseen-classes``), train, evaluate and
    report: :func:`main` after parsing and logging set-up."""
    data_config = data_config_from_args(args, parser, config)
    hint = CPU_COMMAND.replace("DATA", data_config.path or "CIFAR10_DIR").replace(
        "LOSS", config.loss)
    return driver.train_and_report(args, parser, config, data_config, hint=hint)


if __name__ == "__main__":
    sys.exit(main())
