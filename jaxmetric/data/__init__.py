"""The data a run trains and is evaluated on.

* :mod:`~jaxmetric.data.config` -- :class:`DataConfig`, the data of a run described
  once (saved in its ``config.json``), and :func:`load`, which rebuilds it;
* :mod:`~jaxmetric.data.types` -- the generic :class:`Dataset` / :class:`Split` /
  :class:`DataError` and the class-balanced "first N images";
* :mod:`~jaxmetric.data.images` -- the one image decoder of every source;
* :mod:`~jaxmetric.data.cache` -- the on-disk cache of decoded images;
* :mod:`~jaxmetric.data.cifar10` -- CIFAR-10 from an image tree, an archive of one, the
  original pickled batches or tensorflow-datasets;
* :mod:`~jaxmetric.data.folders` -- any class-per-folder image tree;
* :mod:`~jaxmetric.data.tfds_benchmarks` -- the tfds metric-learning benchmarks;
* :mod:`~jaxmetric.data.splits` -- class-disjoint splits (train on some classes,
  retrieve the others).
"""

from jaxmetric.data.cache import default_cache_dir
from jaxmetric.data.cifar10 import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    cifar10_description,
    load_cifar10,
    tensorflow_on_cpu_only,
)
from jaxmetric.data.config import DataConfig, load
from jaxmetric.data.types import DataError, Dataset, Split, balanced_subset, channel_stats

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DataConfig",
    "DataError",
    "Dataset",
    "Split",
    "balanced_subset",
    "channel_stats",
    "cifar10_description",
    "default_cache_dir",
    "load",
    "load_cifar10",
    "tensorflow_on_cpu_only",
]
