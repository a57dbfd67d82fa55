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

DEFAULT_IMAGE_SIZE = 32


def _class_list(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated class names")
    return names


def build_parser() -> argparse.ArgumentParser:
    """The shared command line (:func:`experiments.driver.build_parser`) plus the data
    flags of this experiment."""
    from jaxmetric.data.folders import CHANNELS
    from jaxmetric.data.tfds_benchmarks import BENCHMARKS

    p = driver.build_parser("python -m experiments.retrieval", __doc__, "retrieval")
    g = p.add_argument_group("data (an image-folder tree in --data-dir, or --tfds)")
    g.add_argument("--tfds", choices=sorted(BENCHMARKS),
                   help="a tensorflow-datasets benchmark with its standard split")
    g.add_argument("--train-classes", type=int, metavar="N",
                   help="the first N classes (sorted by name) train, the rest are held out")
    g.add_argument("--train-class-list", type=_class_list, metavar="A,B,...",
                   help="the training classes by name")
    g.add_argument("--test-class-list", type=_class_list, metavar="A,B,...",
                   help="the held-out classes by name (default: every other class)")
    g.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE, metavar="S",
                   help="side of the network's square input; images are resized on load "
                        f"(default: {DEFAULT_IMAGE_SIZE})")
    g.add_argument("--channels", type=int, choices=CHANNELS, default=3,
                   help="3: RGB (grayscale images copied to 3 channels); 1: grayscale "
                        "(default: 3)")
    return p


def data_options(args) -> dict:
    """The data flags as recorded in the report next to the config."""
    return {"tfds": args.tfds, "train_classes": args.train_classes,
            "train_class_list": args.train_class_list,
            "test_class_list": args.test_class_list, "image_size": args.image_size,
            "channels": args.channels}


def main(argv=None) -> int:
    return driver.main(build_parser(), run, argv)


def run(args, parser, config) -> int:
    """Check the data flags, then load the split, train, evaluate and report."""
    if (args.tfds is None) == (config.data_dir is None):
        parser.error("give the data: --data-dir TREE (an image-folder tree) or --tfds NAME")
    if args.image_size < 1:
        parser.error(f"--image-size must be >= 1; got {args.image_size}")
    if config.unseen_classes is not None:
        parser.error("--unseen-classes is experiments.cifar10's; here choose the training "
                     "classes with --train-classes or --train-class-list")
    chosen = [f for f in ("train_classes", "train_class_list", "test_class_list")
              if getattr(args, f) is not None]
    if args.tfds is not None and chosen:
        parser.error(f"--tfds {args.tfds} has its standard split; leave out "
                     + ", ".join("--" + f.replace("_", "-") for f in chosen))

    def load():
        from jaxmetric.data import splits
        if args.tfds is not None:
            from jaxmetric.data.tfds_benchmarks import load_tfds

            split = load_tfds(args.tfds, image_size=args.image_size, channels=args.channels)
        else:
            from jaxmetric.data.folders import load_folder

            split = load_folder(config.data_dir, image_size=args.image_size,
                                channels=args.channels, train_classes=args.train_classes,
                                train_class_list=args.train_class_list,
                                test_class_list=args.test_class_list)
        return splits.limit(split, config.max_train, config.max_test)

    return driver.train_and_report(args, parser, config, load,
                                   extra_config={"data": data_options(args)})


if __name__ == "__main__":
    sys.exit(main())
