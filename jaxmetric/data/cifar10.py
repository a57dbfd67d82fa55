"""CIFAR-10 sources, loaded into uint8 arrays in host memory.

``load_cifar10(data_dir)`` picks the source from what ``data_dir`` points at:

* ``None``: tensorflow-datasets' ``cifar10`` (imported lazily; fails fast with one
  :class:`DataError` when it is not installed or cannot download). tfds prepares and
  reads it through TensorFlow, which is kept off every GPU so that it never takes device
  memory from JAX.
* a ``cifar-10-batches-py`` folder (the official Python release: ``data_batch_1`` ..
  ``data_batch_5``, ``test_batch``, ``batches.meta``), or a folder that contains one.
  The pickles are read with a restricted unpickler that admits only the globals a
  numpy array needs, so a malicious file cannot run code.
* an image-folder tree ``train/<class>/*.jpg`` and ``test/<class>/*.jpg`` (also
  ``.jpeg``/``.png``), optionally inside one top-level folder.
* a ``.tar``/``.tar.gz``/``.tgz``/``.tar.xz``/``.tar.bz2`` archive of such a tree (or of
  a ``cifar-10-batches-py`` folder, e.g. the official ``cifar-10-python.tar.gz``), read
  as a stream, never extracted to disk.

Class names of an image tree are its class-folder names in sorted order. CIFAR-10's own
label order (airplane=0 ... truck=9) happens to be alphabetical, so a CIFAR-10 tree gets
the official labels.

``max_train``/``max_test`` keep the first N images of a split, balanced over classes:
``N // n_classes`` per class, the remainder going one each to the lowest labels, and a
class with too few images gives its shortfall to the others. "First" means sorted by
file name within a class for trees and archives (whose other images are then never
decoded), and in stored order for the batches and tfds sources.

Images of trees and archives come out grouped by class (label order, then file name).
Every image must already be 32x32; other sizes are rejected, not resized.

Decoding JPEGs (:func:`jaxmetric.data.images.decode_image`) is the slow part, so arrays
decoded from trees and archives are cached (:mod:`jaxmetric.data.cache`) in an ``.npz``
under ``cache_dir`` (default ``$XDG_CACHE_HOME/jaxmetric`` or
``~/.cache/jaxmetric``; ``cache_dir=False`` disables the cache). The cache key covers
the source path, the size and modification time of the archive (of every image file for
a tree) and ``max_train``/``max_test``, so a stale cache is never used; files are
written atomically and a corrupt one is ignored and rebuilt. The other two sources are
not cached: they are already stored as arrays.

**What the model needs from the data** travels with the
:class:`~jaxmetric.data.Dataset`: the image shape and the per-channel mean and standard
deviation used to normalise its pixels. The CIFAR-10 source gives the published
statistics :data:`CIFAR10_MEAN` / :data:`CIFAR10_STD` and a description for reports
(:func:`cifar10_description`); nothing outside this module
assumes CIFAR-10.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import logging
import os
import pathlib
import pickle
import socket
import tarfile
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal

import numpy as np

from jaxmetric.data.cache import cached
from jaxmetric.data.images import IMAGE_EXTENSIONS, decode_image, is_image_name
from jaxmetric.data.types import (
    DataError,
    Dataset,
    Split,
    balanced_counts,
    balanced_subset,
)
from jaxmetric.utils import check_positive_int

try:  # numpy >= 2
    from numpy._core import multiarray as _np_multiarray
    from numpy._core import numeric as _np_numeric
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _np_multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _np_numeric  # type: ignore[no-redef]

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "cifar10_description",
    "load_cifar10",
    "tensorflow_on_cpu_only",
]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
"""Per-channel (RGB) mean of CIFAR-10's training images, in [0, 1] units (the published
values every CIFAR recipe normalises with)."""
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
"""Per-channel standard deviation of CIFAR-10's training images, in [0, 1] units."""
IMAGE_SHAPE = (32, 32, 3)
SPLITS = ("train", "test")
BATCH_FILES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
META_FILE = "batches.meta"
BATCHES_FOLDER = "cifar-10-batches-py"

DATA_DIR_HINT = (
    "pass --data-dir PATH: a cifar-10-batches-py folder, an image-folder tree "
    "(train/<class>/*.jpg and test/<class>/*.jpg) or a .tar.xz/.tar.gz of one"
)
_TFDS_HOST = ("www.cs.toronto.edu", 443)  # where tfds downloads CIFAR-10 from
_NETWORK_PROBE_TIMEOUT_S = 3.0








# --------------------------------------------------------------------------- public API




def cifar10_description(data_dir: PathLike | None) -> str:
    """How reports name CIFAR-10 loaded from ``data_dir`` (a JPEG copy is not the
    original: its pixels differ slightly from the official release)."""
    if data_dir is None:
        return "CIFAR-10 (tensorflow-datasets)"
    name = pathlib.Path(str(data_dir)).name
    if "jpeg" in name.lower() or "jpg" in name.lower():
        return (f"CIFAR-10 (JPEG q75 copy, {name}: pixels differ slightly from the official "
                "release)")
    return f"CIFAR-10 ({name})"


def load_cifar10(
    data_dir: PathLike | None = None,
    *,
    max_train: int | None = None,
    max_test: int | None = None,
    cache_dir: PathLike | None | Literal[False] = None,
) -> Dataset:
    """Loads CIFAR-10 (or any 32x32 RGB data set laid out like it) into uint8 arrays.

    Args:
      data_dir: None for tensorflow-datasets, else a ``cifar-10-batches-py`` folder, an
        image-folder tree or a tar archive of either (see the module docstring).
      max_train: keep at most this many training images, balanced over classes.
      max_test: likewise for the test split.
      cache_dir: where decoded trees/archives are cached; None for the user cache
        directory (:func:`default_cache_dir`), False for no cache.

    Returns:
      A :class:`Dataset` with CIFAR-10's published normalisation statistics
      (:data:`CIFAR10_MEAN`, :data:`CIFAR10_STD`) and a description of the source
      (:func:`cifar10_description`).

    Raises:
      DataError: the source is missing, malformed or corrupt (the message names it).
      ValueError: ``max_train``/``max_test`` is not a positive integer.
    """
    max_train = check_positive_int("max_train", max_train, allow_none=True)
    max_test = check_positive_int("max_test", max_test, allow_none=True)
    dataset = _load_cifar10(data_dir, max_train, max_test, cache_dir)
    return dataclasses.replace(dataset, mean=CIFAR10_MEAN, std=CIFAR10_STD,
                               description=cifar10_description(data_dir))


def _load_cifar10(
    data_dir: PathLike | None,
    max_train: int | None,
    max_test: int | None,
    cache_dir: PathLike | None | Literal[False],
) -> Dataset:
    if data_dir is None:
        return _take_balanced(_load_tfds(), max_train, max_test)

    path = pathlib.Path(data_dir).expanduser()
    if not path.exists():
        raise DataError(f"data directory {path} does not exist; {DATA_DIR_HINT}")
    if path.is_dir():
        batches_dir = _find_batches_dir(path)
        if batches_dir is not None:
            return _take_balanced(_load_batches_dir(batches_dir), max_train, max_test)
        root = _find_tree_root(path)
        files = _scan_tree(root)
        fingerprint = _tree_fingerprint(root, files)
        build = lambda: _load_tree(root, files, max_train, max_test)  # noqa: E731
    elif path.is_file():
        stat = path.stat()
        fingerprint = f"file:{stat.st_size}:{stat.st_mtime_ns}"
        build = lambda: _load_archive(path, max_train, max_test)  # noqa: E731
    else:
        raise DataError(f"{path} is neither a folder nor a file; {DATA_DIR_HINT}")
    return cached(path, fingerprint, max_train, max_test, cache_dir, build)






# --------------------------------------------------------------------------- helpers




def _take_balanced(dataset: Dataset, max_train: int | None, max_test: int | None) -> Dataset:
    """Applies ``max_train``/``max_test`` to an in-memory data set."""

    def take(split: Split, n: int | None) -> Split:
        if n is None or n >= len(split):
            return split
        idx = balanced_subset(split.labels, n, len(dataset.class_names))
        return Split(split.images[idx], split.labels[idx])

    return Dataset(
        take(dataset.train, max_train), take(dataset.test, max_test), dataset.class_names
    )


def _class_order(names: Iterable[str]) -> tuple[str, ...]:
    """Sorted class names; for CIFAR-10 this is its official label order."""
    return tuple(sorted(set(names)))






def _decode_split(
    per_class: Mapping[str, Sequence[tuple[str, Callable[[], bytes]]]],
    class_names: Sequence[str],
) -> Split:
    """Decodes ``{class: [(name, read_bytes), ...]}`` into a Split, grouped by class."""
    total = sum(len(per_class.get(c, ())) for c in class_names)
    images = np.empty((total,) + IMAGE_SHAPE, dtype=np.uint8)
    labels = np.empty((total,), dtype=np.int32)
    i = 0
    for label, cls in enumerate(class_names):
        for name, read in per_class.get(cls, ()):
            images[i] = decode_image(read(), name, size=IMAGE_SHAPE[0], resize=False)
            labels[i] = label
            i += 1
    return Split(images, labels)


def _select(
    tree: Mapping[str, Mapping[str, Sequence[tuple[str, Callable[[], bytes]]]]],
    max_per_split: Mapping[str, int | None],
    source: str,
) -> Dataset:
    """Checks a ``{split: {class: [(name, read)]}}`` listing, keeps the balanced first
    images per split and decodes them. Entries within a class must be sorted by name."""
    for split in SPLITS:
        if not tree.get(split):
            raise DataError(
                f"{source}: no '{split}/' folder with class folders of images; expected "
                "train/<class>/*.jpg and test/<class>/*.jpg"
            )
    train_classes, test_classes = set(tree["train"]), set(tree["test"])
    if train_classes != test_classes:
        raise DataError(
            f"{source}: train/ and test/ hold different classes: only in train/: "
            f"{sorted(train_classes - test_classes)}, only in test/: "
            f"{sorted(test_classes - train_classes)}"
        )
    for split in SPLITS:
        for cls, entries in sorted(tree[split].items()):
            if not entries:
                raise DataError(
                    f"{source}: class folder {split}/{cls}/ holds no images "
                    f"({', '.join(IMAGE_EXTENSIONS)})"
                )
    class_names = _class_order(train_classes)
    splits = {}
    for split in SPLITS:
        entries = [tree[split][c] for c in class_names]
        n = max_per_split[split]
        counts = (
            [len(e) for e in entries]
            if n is None
            else balanced_counts([len(e) for e in entries], n)
        )
        chosen = {c: e[:k] for c, e, k in zip(class_names, entries, counts, strict=True)}
        splits[split] = _decode_split(chosen, class_names)
    return Dataset(splits["train"], splits["test"], class_names)


# --------------------------------------------------------------------------- image trees


def _find_tree_root(path: pathlib.Path) -> pathlib.Path:
    """``path`` if it holds train/ or test/, else its single subfolder that does."""
    if any((path / s).is_dir() for s in SPLITS):
        return path
    subdirs = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if len(subdirs) == 1 and any((subdirs[0] / s).is_dir() for s in SPLITS):
        return subdirs[0]
    raise DataError(
        f"{path}: not a CIFAR-10 folder: found neither train/ and test/ image folders nor "
        f"{BATCHES_FOLDER} files ({', '.join(BATCH_FILES['train'][:1] + BATCH_FILES['test'])}, "
        f"...); {DATA_DIR_HINT}"
    )


def _scan_tree(root: pathlib.Path) -> dict[str, dict[str, list[pathlib.Path]]]:
    """``{split: {class: [image paths sorted by name]}}`` of an image-folder tree."""
    tree: dict[str, dict[str, list[pathlib.Path]]] = {}
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        tree[split] = {}
        for class_dir in sorted(split_dir.iterdir()):
            if class_dir.is_dir() and not class_dir.name.startswith("."):
                tree[split][class_dir.name] = sorted(
                    (p for p in class_dir.iterdir() if is_image_name(p.name) and p.is_file()),
                    key=lambda p: p.name,
                )
    return tree


def _tree_fingerprint(
    root: pathlib.Path, tree: Mapping[str, Mapping[str, list[pathlib.Path]]]
) -> str:
    """Hash of every image's relative path, size and mtime: changes when any file does."""
    digest = hashlib.sha256()
    for split in sorted(tree):
        for cls in sorted(tree[split]):
            for p in tree[split][cls]:
                st = p.stat()
                digest.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return "tree:" + digest.hexdigest()


def _load_tree(
    root: pathlib.Path,
    tree: Mapping[str, Mapping[str, list[pathlib.Path]]],
    max_train: int | None,
    max_test: int | None,
) -> Dataset:
    listing = {
        split: {
            cls: [(str(p), functools.partial(_read_file, p)) for p in paths]
            for cls, paths in classes.items()
        }
        for split, classes in tree.items()
    }
    return _select(listing, {"train": max_train, "test": max_test}, str(root))


def _read_file(path: pathlib.Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from e


# --------------------------------------------------------------------------- tar archives


def _parse_member(name: str) -> tuple[str, str, str, str] | None:
    """(top folder or "", split, class, file name) of an image in an archive, else None."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p.startswith(".") or p == "__MACOSX" for p in parts):  # hidden / macOS metadata
        return None
    if len(parts) == 3 and parts[0] in SPLITS:
        parts = [""] + parts
    elif not (len(parts) == 4 and parts[1] in SPLITS):
        return None
    return parts[0], parts[1], parts[2], parts[3]


class _FirstByName:
    """Keeps the bytes of the ``limit`` smallest-named files seen (all when None)."""

    def __init__(self, limit: int | None):
        self.limit = limit
        self.items: list[tuple[str, bytes]] = []

    def add(self, key: str, data: bytes) -> None:
        self.items.append((key, data))
        if self.limit is not None and len(self.items) > 2 * self.limit:
            self.items.sort(key=lambda kv: kv[0])
            del self.items[self.limit :]

    def sorted(self) -> list[tuple[str, bytes]]:
        self.items.sort(key=lambda kv: kv[0])
        return self.items if self.limit is None else self.items[: self.limit]


def _load_archive(path: pathlib.Path, max_train: int | None, max_test: int | None) -> Dataset:
    """Reads an image tree (or a cifar-10-batches-py folder) from a tar archive, streaming.

    Every member is read once in archive order; only the images that the balanced
    ``max_train``/``max_test`` selection keeps are decoded.
    """
    limits = {"train": max_train, "test": max_test}
    kept: dict[tuple[str, str, str], _FirstByName] = {}  # (top, split, class) -> files
    batch_files: dict[str, bytes] = {}
    batch_names = set(BATCH_FILES["train"] + BATCH_FILES["test"] + (META_FILE,))
    try:
        with tarfile.open(path, mode="r|*") as archive:
            for member in archive:
                if member.isdir():  # registers class folders, so empty ones are reported
                    parsed = _parse_member(member.name.rstrip("/") + "/-")
                    if parsed is not None:
                        top, split, cls, _ = parsed
                        kept.setdefault((top, split, cls), _FirstByName(limits[split]))
                    continue
                if not member.isfile():
                    continue
                parsed = _parse_member(member.name)
                basename = member.name.rsplit("/", 1)[-1]
                if basename in batch_names:
                    batch_files[basename] = _read_member(archive, member, path)
                elif parsed is not None and is_image_name(parsed[3]):
                    top, split, cls, fname = parsed
                    data = _read_member(archive, member, path)
                    kept.setdefault((top, split, cls), _FirstByName(limits[split])).add(
                        f"{fname}\0{member.name}", data
                    )
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(
            f"{path}: cannot read the archive, it is not a tar file or it is corrupt ({e})"
        ) from e

    has_images = any(files.items for files in kept.values())
    if batch_files and not has_images:
        return _take_balanced(
            _dataset_from_batches(lambda name: batch_files.get(name), f"{path}:"),
            max_train,
            max_test,
        )
    tops = sorted({top for top, _, _ in kept})
    if len(tops) > 1:
        raise DataError(
            f"{path}: the archive holds several trees (top folders {tops}); expected one"
        )
    if not kept:
        raise DataError(
            f"{path}: the archive holds no train/<class>/*.jpg and test/<class>/*.jpg images "
            f"and no {BATCHES_FOLDER} files; {DATA_DIR_HINT}"
        )
    tree: dict[str, dict[str, list[tuple[str, Callable[[], bytes]]]]] = {}
    for (_, split, cls), files in kept.items():
        tree.setdefault(split, {})[cls] = [
            (f"{path}:{key.split(chr(0), 1)[1]}", (lambda d=data: d))
            for key, data in files.sorted()
        ]
    return _select(tree, limits, str(path))


def _read_member(archive: tarfile.TarFile, member: tarfile.TarInfo, path: pathlib.Path) -> bytes:
    f = archive.extractfile(member)
    if f is None:
        raise DataError(f"{path}:{member.name}: cannot read this archive member")
    data = f.read()
    if len(data) != member.size:
        raise DataError(f"{path}:{member.name}: archive member is truncated")
    return data


# --------------------------------------------------------------------------- batches-py


def _latin1_encode(text, encoding="latin1"):
    """Stand-in for ``_codecs.encode``, which Python 3 pickles (protocol < 3) use for
    ``bytes``; it only performs the latin-1 encoding that use needs."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(
            f"_codecs.encode is only allowed as a latin-1 bytes literal, got {encoding!r}"
        )
    return text.encode("latin-1")


_ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("numpy.core.multiarray", "_reconstruct"): _np_multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_multiarray._reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _np_numeric._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _np_numeric._frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays, and nothing else.

    Every global a pickle references (the only way it can reach a callable) goes through
    ``find_class``; anything not in ``_ALLOWED_GLOBALS`` is refused before it is
    imported, let alone called.
    """

    def __init__(self, file, source: str):
        super().__init__(file, encoding="bytes")  # Python 2 str -> bytes, as released
        self._source = source

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(
                f"{self._source}: refusing to unpickle forbidden global '{module}.{name}'; "
                "a CIFAR-10 batch file holds only numpy arrays, lists and strings, so this "
                "file is not one (it may be malicious)"
            ) from None


def _unpickle(data: bytes, source: str):
    try:
        return _RestrictedUnpickler(io.BytesIO(data), source).load()
    except DataError:
        raise
    except Exception as e:  # pickle raises many types on garbage input
        raise DataError(
            f"{source}: not a valid pickle file, it is corrupt or truncated "
            f"({type(e).__name__}: {e})"
        ) from e


def _str_keys(obj, source: str) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"{source}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _parse_batch(obj, source: str, num_classes: int) -> Split:
    batch = _str_keys(obj, source)
    if "data" not in batch or "labels" not in batch:
        raise DataError(f"{source}: batch dict lacks 'data' or 'labels' (keys: {sorted(batch)})")
    data, labels = batch["data"], batch["labels"]
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3072
    ):
        raise DataError(
            f"{source}: 'data' must be a uint8 array (N, 3072), got "
            f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}"
        )
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{source}: 'labels' is not a list of integers ({e})") from e
    if labels.shape != (len(data),):
        raise DataError(f"{source}: {len(data)} images but labels of shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{source}: labels outside [0, {num_classes})")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # rows are CHW planes
    return Split(np.ascontiguousarray(images), labels.astype(np.int32))


def _dataset_from_batches(read: Callable[[str], bytes | None], prefix: str) -> Dataset:
    """Builds a Dataset from the official batch files; ``read(name)`` gives their bytes."""

    def load(name: str):
        data = read(name)
        if data is None:
            raise DataError(
                f"{prefix}{name} is missing; a {BATCHES_FOLDER} folder has "
                f"{', '.join(BATCH_FILES['train'] + BATCH_FILES['test'] + (META_FILE,))}"
            )
        return _unpickle(data, prefix + name)

    meta = _str_keys(load(META_FILE), prefix + META_FILE)
    names = meta.get("label_names")
    if not isinstance(names, list) or not names:
        raise DataError(f"{prefix}{META_FILE}: lacks a non-empty 'label_names' list")
    class_names = tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names)
    splits = {}
    for split, files in BATCH_FILES.items():
        parts = [_parse_batch(load(f), prefix + f, len(class_names)) for f in files]
        splits[split] = Split(
            np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts])
        )
    return Dataset(splits["train"], splits["test"], class_names)


def _find_batches_dir(path: pathlib.Path) -> pathlib.Path | None:
    """``path`` or ``path/cifar-10-batches-py`` when it holds the official batch files."""
    for candidate in (path, path / BATCHES_FOLDER):
        if any((candidate / f).is_file() for f in BATCH_FILES["train"][:1] + BATCH_FILES["test"]):
            return candidate
    return None


def _load_batches_dir(path: pathlib.Path) -> Dataset:
    def read(name: str) -> bytes | None:
        try:
            return (path / name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise DataError(f"{path / name}: cannot read ({e})") from e

    return _dataset_from_batches(read, f"{path}{os.sep}")


# --------------------------------------------------------------------------- tfds


def _load_tfds() -> Dataset:
    """CIFAR-10 from tensorflow-datasets; one DataError when unavailable or offline."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(f"tensorflow-datasets is not installed ({e}); {DATA_DIR_HINT}") from None
    try:
        builder = tfds.builder("cifar10")
        prepared = os.path.exists(os.path.join(os.fspath(builder.data_dir), "dataset_info.json"))
        if not prepared:
            _check_online()
        tensorflow_on_cpu_only()  # before tfds runs any TensorFlow op
        if not prepared:
            builder.download_and_prepare()
        splits = {}
        for split in SPLITS:
            images, labels = tfds.as_numpy(
                builder.as_dataset(split=split, batch_size=-1, as_supervised=True)
            )
            splits[split] = Split(np.asarray(images, np.uint8), np.asarray(labels, np.int32))
        class_names = tuple(builder.info.features["label"].names)
    except DataError:
        raise
    except Exception as e:  # tfds/tf raise a zoo of types; all mean "not available"
        raise DataError(
            f"tensorflow-datasets could not load cifar10 ({type(e).__name__}: {e}); {DATA_DIR_HINT}"
        ) from e
    return Dataset(splits["train"], splits["test"], class_names)


def tensorflow_on_cpu_only() -> None:
    """Hides every GPU from TensorFlow, which tfds uses to prepare and read its data sets.

    TensorFlow is only a host-side reader here; on a GPU build it would otherwise
    reserve most of each GPU's memory at its first op, memory JAX then cannot have. This
    must run before TensorFlow's runtime starts; on the CPU-only build it changes nothing.
    """
    try:
        import tensorflow as tf
    except ImportError as e:
        raise DataError(
            f"tensorflow-datasets needs TensorFlow to prepare and read cifar10, and it is not "
            f"installed ({e}); install the data extra (pip install -e '.[data]'), or "
            f"{DATA_DIR_HINT}"
        ) from None
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError as e:  # the runtime already started: TensorFlow was used before
        if tf.config.get_visible_devices("GPU"):
            warnings.warn(
                f"TensorFlow was initialised before jaxmetric could hide the GPUs from it ({e}); "
                "it may hold GPU memory that JAX needs. Call "
                "tf.config.set_visible_devices([], 'GPU') before using TensorFlow.",
                RuntimeWarning,
                stacklevel=4,
            )


def _check_online() -> None:
    """Fails within seconds when CIFAR-10's download host is unreachable (tfds would
    otherwise retry for minutes). Skipped behind a proxy, which tfds uses itself."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    try:
        socket.create_connection(_TFDS_HOST, timeout=_NETWORK_PROBE_TIMEOUT_S).close()
    except OSError as e:
        raise DataError(
            f"tensorflow-datasets has not downloaded cifar10 yet and {_TFDS_HOST[0]} is "
            f"unreachable ({e}); {DATA_DIR_HINT}"
        ) from None










