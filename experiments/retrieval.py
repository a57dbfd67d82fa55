"""Train an embedding network on some classes of any image data set and measure
retrieval on the classes it never saw (the deep-metric-learning protocol).

    python -m experiments.retrieval --loss triplet --data-dir TREE --train-classes 100
    python -m experiments.retrieval --loss triplet --data-dir TREE \\
        --train-class-list cat,dog,frog --test-class-list ship,truck
    python -m experiments.retrieval --loss triplet --tfds caltech_birds2011 --image-size 224

**Data.** ``--data-dir`` takes an image-folder tree (:mod:`jaxmetric.data.folders`):

* ``TREE/<class>/*.jpg|png`` -- the training classes' images are trained on; every
  image of a held-out class queries all the other held-out images (leave-one-out);
* ``TREE/train/<class>/...`` + ``TREE/test/<class>/...`` -- the training classes'
  ``train/`` images are trained on; a held-out class's ``test/`` images query its
  ``train/`` images (the gallery, ``test_vs_train`` in metrics.json) and each other
  (leave-one-out, ``test_vs_test``). When ``train/`` and ``test/`` hold disjoint classes
  that is the split, and evaluation is leave-one-out.

Classes are sorted by name; ``--train-classes N`` trains on the first N and holds out
the rest, ``--train-class-list a,b,c`` (with ``--test-class-list``, default: every other
class) names them. ``--tfds NAME`` instead reads a tensorflow-datasets benchmark with
its standard split (:mod:`jaxmetric.data.tfds_benchmarks`):

    caltech_birds2011          CUB-200-2011: classes 1-100 train, 101-200 held out
    cars196                    Cars196: classes 1-98 train, 99-196 held out
    stanford_online_products   its own Ebay_train / Ebay_test class lists

**Images** are resized on load: the shorter side to the stored size, then the centred
square. ``--image-size S`` below 64 stores S x S and trains with the pad-4 crop + flip;
from 64 up, images are stored at round(S * 8/7) (256 for 224) and training takes
random-resized crops of S + flip, evaluation the centre crop. ``--channels 3`` (the
default) copies grayscale images to RGB; ``--channels 1`` makes every image grayscale.
Pixels are normalised with the per-channel mean and standard deviation of the training
classes' training images (not ImageNet's: the networks train from scratch). For images
of 64 pixels and more use ``--stem imagenet`` (7x7 stride-2 conv + max-pool) with a
ResNet.

The run folder (``--out``, default ``runs/retrieval-<loss>-<time>``) is that of
``python -m experiments.cifar10``; metrics.json holds Recall@1/2/4/8, R-precision and
MAP@R on the held-out classes, and the per-epoch precision@1 is measured on them too.
``--max-train N`` keeps the first N training images (class-balanced), ``--max-test N``
the first N queries; the gallery is kept whole.
"""

from __future__ import annotations

import argparse
import sys

from experiments import driver

DATA_FLAGS = ("path", "tfds", "max_train", "max_test", "train_classes", "train_class_list",
              "test_class_list", "image_size", "channels")
"""The :class:`~jaxmetric.data.DataConfig` fields this command sets (``path`` is
``--data-dir``)."""


def build_parser() -> argparse.ArgumentParser:
    """The shared command line (:func:`experiments.driver.build_parser`) with this
    experiment's data flags."""
    return driver.build_parser("python -m experiments.retrieval", __doc__, "retrieval",
                               data_fields=DATA_FLAGS)


def data_config_from_args(args, parser, config):
    """The run's :class:`~jaxmetric.data.DataConfig`: an image-folder tree
    (``--data-dir``) or a tfds benchmark (``--tfds``); exits 2 on a bad combination."""
    tfds = getattr(args, "tfds", None) is not None
    if tfds == (getattr(args, "path", None) is not None):
        parser.error("give the data: --data-dir TREE (an image-folder tree) or --tfds NAME")
    source = "tfds" if tfds else "folder"
    return driver.data_config_from_args(args, parser, config, source=source)


def main(argv=None) -> int:
    return driver.main(build_parser(), run, argv)


def run(args, parser, config) -> int:
    """Check the data flags, then load the split, train, evaluate and report."""
    data_config = data_config_from_args(args, parser, config)
    return driver.train_and_report(args, parser, config, data_config)


if __name__ == "__main__":
    sys.exit(main())
