"""The metric-learning benchmarks of tensorflow-datasets, with their standard splits.

Each data set is split by class, as the deep-metric-learning literature evaluates it
(Song et al. 2016; Musgrave et al. 2020): the network trains on some classes, and
retrieval is measured on the others, every image of a held-out class querying all the
other held-out images (leave-one-out; no gallery):

============================  ==========================  ==========================
tfds name                     training classes (images)   held-out classes (images)
============================  ==========================  ==========================
``caltech_birds2011``         1-100 (5,864)               101-200 (5,924)
``cars196``                   1-98 (8,054)                99-196 (8,131)
``stanford_online_products``  ``Ebay_train``: 11,318      ``Ebay_test``: 11,316
                              (59,551)                    (60,502)
============================  ==========================  ==========================

tfds splits CUB-200-2011 and Cars196 for classification (every class in both halves),
so their ``train`` and ``test`` splits are merged and cut by label (``label < 100``,
``label < 98``; tfds numbers the classes from 0 in the official order); Stanford Online
Products' tfds splits already are the class-disjoint ``Ebay_train`` / ``Ebay_test``
lists (label: ``class_id``).

Images are resized on load as for image folders (:func:`jaxmetric.data.images.fit_image`,
:func:`jaxmetric.data.images.stored_size`), with per-channel statistics from the training
images. The first use downloads and prepares the data under ``~/tensorflow_datasets``
(``$TFDS_DATA_DIR``); tfds runs TensorFlow on the CPU only
(:func:`jaxmetric.data.tensorflow_on_cpu_only`). Memory: every image is held as uint8
at the stored size (Stanford Online Products at ``image_size=224``: ~24 GB).

References:
  Wah et al. "The Caltech-UCSD Birds-200-2011 Dataset". 2011.
  Krause et al. "3D Object Representations for Fine-Grained Categorization". 2013.
  Song, Xiang, Jegelka, Savarese. "Deep Metric Learning via Lifted Structured Feature
    Embedding". CVPR 2016 (Stanford Online Products; the class-disjoint protocol).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np

from jaxmetric.data.cifar10 import tensorflow_on_cpu_only
from jaxmetric.data.images import CHANNELS, fit_image, stored_size
from jaxmetric.data.splits import ClassSplit, split_classes
from jaxmetric.data.types import DataError, Dataset, Split
from jaxmetric.utils import check_choice

__all__ = ["BENCHMARKS", "Benchmark", "load_tfds", "split_examples"]


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """How one tfds data set is split.

    Attributes:
      label: the feature holding the class.
      train_below: classes with a smaller label train, the others are held out (tfds's
        ``train`` and ``test`` merged first); None: tfds's ``train`` split trains and
        its ``test`` split is held out (already class-disjoint).
    """

    label: str
    train_below: int | None


BENCHMARKS = {
    "caltech_birds2011": Benchmark("label", 100),
    "cars196": Benchmark("label", 98),
    "stanford_online_products": Benchmark("class_id", None),
}
"""The supported data sets by tfds name."""


def split_examples(
    examples: Iterable[tuple[np.ndarray, int, str]],
    benchmark: Benchmark,
    class_names: Sequence[str],
    *,
    image_size: int,
    channels: int = 3,
    description: str | None = None,
) -> ClassSplit:
    """The class-disjoint :class:`ClassSplit` of ``(image uint8 (H, W, C), label,
    tfds split)`` examples, each image resized to :func:`~jaxmetric.data.images.stored_size`.
    Held-out images are all queries (no gallery)."""
    from PIL import Image

    check_choice("channels", channels, CHANNELS)
    size = stored_size(image_size)
    sides: dict[str, tuple[list[np.ndarray], list[int]]] = {"train": ([], []), "test": ([], [])}
    for image, label, split in examples:
        label = int(label)
        if benchmark.train_below is None:
            side = "train" if split == "train" else "test"
        else:
            side = "train" if label < benchmark.train_below else "test"
        image = np.asarray(image, np.uint8)
        pil = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1
                              else image)
        sides[side][0].append(fit_image(pil, size, channels))
        sides[side][1].append(label)
    splits = {}
    for side, (images, labels) in sides.items():
        if not images:
            raise DataError(f"{description or 'the data set'}: no {side} images")
        splits[side] = Split(np.stack(images), np.asarray(labels, np.int32))
    names = tuple(str(n) for n in class_names)
    dataset = Dataset(splits["train"], splits["test"], names, description=description,
                      input_size=image_size if size != image_size else None)
    present = [np.unique(splits[s].labels) for s in ("train", "test")]
    return split_classes(dataset, [names[i] for i in present[0]],
                         [names[i] for i in present[1]])


def load_tfds(name: str, *, image_size: int, channels: int = 3,
              data_dir: str | None = None) -> ClassSplit:
    """Downloads (the first time) and reads the tfds data set ``name`` (one of
    :data:`BENCHMARKS`) into its standard class-disjoint split.

    Raises:
      ValueError: an unknown name.
      DataError: tensorflow-datasets is missing or cannot prepare or read the data.
    """
    check_choice("tfds data set", name, tuple(BENCHMARKS))
    benchmark = BENCHMARKS[name]
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(f"tensorflow-datasets is not installed ({e}); pip install -e "
                        "'.[data]', or pass an image-folder tree") from None
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        tensorflow_on_cpu_only()
        builder.download_and_prepare()
        class_names = builder.info.features[benchmark.label].names

        def examples():
            for split in ("train", "test"):
                for ex in tfds.as_numpy(builder.as_dataset(split=split)):
                    yield ex["image"], ex[benchmark.label], split

        return split_examples(examples(), benchmark, class_names, image_size=image_size,
                              channels=channels, description=f"{name} (tensorflow-datasets)")
    except (DataError, ValueError):
        raise
    except Exception as e:  # tfds/tf raise a zoo of types; all mean "not available"
        raise DataError(f"tensorflow-datasets could not load {name} "
                        f"({type(e).__name__}: {e})") from e
