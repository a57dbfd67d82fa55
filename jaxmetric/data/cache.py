"""The on-disk cache of decoded images: a source decoded once, read back in seconds.

Decoding JPEGs is the slow part of loading an image tree or archive, so the arrays are
cached in an ``.npz`` under ``cache_dir`` (default ``$XDG_CACHE_HOME/jaxmetric`` or
``~/.cache/jaxmetric``; ``cache_dir=False`` disables the cache). The cache key covers
the source path, a fingerprint of its files (the loader's: sizes and modification
times) and ``max_train``/``max_test``, so a stale cache is never used; files are
written atomically and a corrupt one is ignored (with a warning) and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import time
import warnings
import zipfile
from collections.abc import Callable
from typing import Literal

import numpy as np

from jaxmetric.data.types import Dataset, Split
from jaxmetric.utils import atomic_writer

__all__ = ["CACHE_FORMAT_VERSION", "cached", "default_cache_dir"]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike
CACHE_FORMAT_VERSION = 1


def default_cache_dir() -> pathlib.Path:
    """``$XDG_CACHE_HOME/jaxmetric``, else ``~/.cache/jaxmetric``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "jaxmetric"


def cached(
    source: pathlib.Path,
    fingerprint: str,
    max_train: int | None,
    max_test: int | None,
    cache_dir: PathLike | None | Literal[False],
    build: Callable[[], Dataset],
) -> Dataset:
    """``build()``, or its result from the .npz cache when source and options match."""
    if cache_dir is False:
        return _timed_build(source, build)
    cache_dir = default_cache_dir() if cache_dir is None else pathlib.Path(cache_dir).expanduser()
    key = json.dumps(
        {
            "version": CACHE_FORMAT_VERSION,
            "source": str(source.resolve()),
            "fingerprint": fingerprint,
            "max_train": max_train,
            "max_test": max_test,
        },
        sort_keys=True,
    )
    stem = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in source.name)[:60]
    cache_file = cache_dir / f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz"
    dataset = _read_cache(cache_file, key)
    if dataset is not None:
        log.info("loaded %s from cache %s", source, cache_file)
        return dataset
    dataset = _timed_build(source, build)
    try:
        _write_cache(cache_file, key, dataset)
    except OSError as e:
        warnings.warn(
            f"could not write the data cache {cache_file} ({e}); continuing without it",
            stacklevel=3,
        )
    return dataset


def _timed_build(source: pathlib.Path, build: Callable[[], Dataset]) -> Dataset:
    start = time.perf_counter()
    dataset = build()
    log.info(
        "decoded %d + %d images from %s in %.1f s",
        len(dataset.train),
        len(dataset.test),
        source,
        time.perf_counter() - start,
    )
    return dataset


def _read_cache(cache_file: pathlib.Path, key: str) -> Dataset | None:
    """The cached Dataset, or None when the file is absent, stale or corrupt."""
    if not cache_file.is_file():
        return None
    try:
        with np.load(cache_file, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            return Dataset(
                Split(z["train_images"], z["train_labels"]),
                Split(z["test_images"], z["test_labels"]),
                tuple(str(n) for n in z["class_names"]),
            )
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        warnings.warn(
            f"ignoring the unreadable data cache {cache_file} ({e}); rebuilding it", stacklevel=4
        )
        return None


def _write_cache(cache_file: pathlib.Path, key: str, dataset: Dataset) -> None:
    """Writes the cache atomically: a temporary file in the same folder, then rename."""
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(cache_file, "wb") as f:
        np.savez(
            f,
            key=np.array(key),
            train_images=dataset.train.images,
            train_labels=dataset.train.labels,
            test_images=dataset.test.images,
            test_labels=dataset.test.labels,
            class_names=np.array(dataset.class_names, dtype=str),
        )

