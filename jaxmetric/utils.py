"""Small helpers shared across jaxmetric: argument checks, atomic files, optional imports.

Only the standard library and NumPy are imported here, so every layer (the JAX core,
data, training, evaluation, plotting) can use this module without pulling in anything
heavier.

* checks: :func:`check_positive_int`, :func:`check_choice`, :func:`check_number` (a
  loss's hyper-parameter, passing traced values through), and the array checks of the
  evaluation and plotting code, :func:`as_embeddings`, :func:`as_labels`,
  :func:`check_same_dim`, :func:`check_ks`;
* :func:`write_atomic` / :func:`atomic_writer`: a file is replaced whole or not at all
  (temporary file in the same folder, flushed and fsync'ed, then ``os.replace``);
  :func:`read_jsonl` reads a file of JSON lines whose last line a crash may have torn;
* :func:`require` imports an optional dependency or says how to install it;
  :func:`progress_bar` is a tqdm bar;
* :func:`flatten` turns nested dicts into one level with joined keys;
* :data:`NORM_EPS`, the norm floor of every L2 normalisation in jaxmetric.
"""

from __future__ import annotations

import contextlib
import importlib
import operator
import os
import pathlib
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import IO, Any

import numpy as np

__all__ = [
    "INSTALL_HINT",
    "NORM_EPS",
    "as_embeddings",
    "as_labels",
    "atomic_writer",
    "check_choice",
    "check_number",
    "check_ks",
    "check_positive_int",
    "check_same_dim",
    "flatten",
    "progress_bar",
    "read_jsonl",
    "require",
    "write_atomic",
]

NORM_EPS = 1e-6
"""Floor on the norm in L2 normalisation: ``x / max(||x||, NORM_EPS)``.

Used by the JAX normalisation of the model head and the cosine distances
(:func:`jaxmetric.distances.l2_normalize`) and by the NumPy one of the evaluation
(:func:`jaxmetric.evaluate.l2_normalize`). An all-zero row stays zero (finite values and
gradients instead of NaN); rows with a larger norm come out with unit norm. In float32,
``NORM_EPS ** 2 = 1e-12`` is a normal number, so the squared-norm form is safe too.
"""

INSTALL_HINT = "pip install jaxmetric[eval]"
"""The extra that brings FAISS, scikit-learn, openTSNE, matplotlib and tqdm."""


# --------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------


def check_positive_int(name: str, value, *, allow_none: bool = False) -> int | None:
    """``value`` as a Python int if it is an integer >= 1 (``None`` passes if allowed).

    Integers of any type with ``__index__`` (Python and NumPy integers) are accepted;
    booleans, floats and strings are not.

    Raises:
      ValueError: otherwise, naming ``name``.
    """
    if value is None and allow_none:
        return None
    message = f"{name} must be a positive integer{' or None' if allow_none else ''}; got {value!r}"
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(message)
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(message) from None
    if value < 1:
        raise ValueError(message)
    return int(value)


def check_choice(name: str, value, options: Sequence) -> None:
    """Raise ``ValueError("unknown {name} ...; expected one of ...")`` unless ``value`` is in
    ``options``."""
    if value not in options:
        raise ValueError(
            f"unknown {name} {value!r}; expected one of {', '.join(map(str, options))}"
        )


def check_number(name: str, value, *, minimum=None, positive=False, maximum=None):
    """Raises ``ValueError`` naming ``name`` if the concrete number ``value`` is NaN or out
    of range (``>= minimum``, ``> 0`` when ``positive``, ``<= maximum``); returns it.

    A traced (jitted) value cannot be checked and is passed through unchanged: a loss's
    hyper-parameters may be learned or scheduled.
    """
    try:
        v = float(value)
    except TypeError:  # a tracer (jax's ConcretizationTypeError is a TypeError)
        return value
    low = (minimum is not None and v < minimum) or (positive and v <= 0)
    if v != v or low or (maximum is not None and v > maximum):
        bounds = [b for b in ("> 0" if positive else None,
                              None if minimum is None else f">= {minimum}",
                              None if maximum is None else f"<= {maximum}") if b]
        raise ValueError(f"{name} must be {' and '.join(bounds) or 'a number'}; got {value}")
    return value


def as_embeddings(x, name: str) -> np.ndarray:
    """Check a ``(N, D)`` embedding matrix and return it as C-contiguous float32.

    Raises:
      ValueError: not 2-D, empty, or holding NaN / infinite values.
      TypeError: not real numbers.
    """
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (N, D); got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty; got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{name} must hold real numbers; got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def as_labels(y, n: int, name: str, emb_name: str) -> np.ndarray:
    """Check ``(N,)`` labels belonging to the ``n`` rows of ``emb_name``; returns an array."""
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array (N,); got shape {arr.shape}")
    if arr.shape[0] != n:
        raise ValueError(
            f"{name} has {arr.shape[0]} entries but {emb_name} has {n} rows; "
            "they must have the same length"
        )
    return arr


def check_same_dim(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    """Raise unless the ``(N, D)`` matrices ``a`` and ``b`` have the same ``D``."""
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{name_a} has dimension {a.shape[1]} but {name_b} has dimension {b.shape[1]}"
        )


def check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """A non-empty sequence of positive integers (the k of Recall@k), as a tuple of ints."""
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks must contain at least one k")
    for k in ks:
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"every k in ks must be a positive integer; got {k!r}")
    return tuple(int(k) for k in ks)


# --------------------------------------------------------------------------------------
# Atomic files
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_writer(path, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` atomically.

    The temporary file is created in the same folder (so ``os.replace`` is a rename on one
    file system), flushed and fsync'ed before the rename, and removed if the block
    raises. Readers therefore see the old file or the complete new one, never a torn one.

    Args:
      path: destination; its folder must exist.
      mode: ``"w"`` (text, UTF-8) or ``"wb"`` (binary).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb'; got {mode!r}")
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_atomic(path, data: str | bytes) -> None:
    """Write ``data`` (text or bytes) to ``path`` atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


# --------------------------------------------------------------------------------------
# Optional dependencies
# --------------------------------------------------------------------------------------


def require(module: str, purpose: str, *, install: str = INSTALL_HINT):
    """Import and return an optional dependency, or explain how to install it.

    Args:
      module: dotted module name, e.g. ``"faiss"`` or ``"sklearn.metrics"``.
      purpose: what needs it, for the message ("nearest-neighbour search").
      install: the command that installs it.

    Raises:
      ImportError: ``"{purpose} needs {module}; install it with `{install}`."``
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{purpose} needs {module}; install it with `{install}`.") from e


def progress_bar(**kwargs):
    """``tqdm.auto.tqdm(**kwargs)``; tqdm is optional (``pip install jaxmetric[eval]``)."""
    return require("tqdm.auto", "the progress bar").tqdm(**kwargs)


# --------------------------------------------------------------------------------------
# Nested dicts
# --------------------------------------------------------------------------------------


def read_jsonl(path) -> tuple[list[dict], str | None]:
    """The records of a JSON-lines file (``[]`` when it does not exist) and its torn last
    line, if any (else None).

    A line is appended whole or, when the process is killed mid-write, cut short: only
    the last line can be torn, and it is left out (the caller says so and rewrites the
    file). A bad line before the last is not a torn write: ``ValueError`` names the file
    and the line.
    """
    import json

    path = pathlib.Path(path)
    if not path.exists():
        return [], None
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records, torn = [], None
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if i == len(lines) - 1:
                torn = line
                break
            raise ValueError(f"{path}, line {i + 1}: not a JSON record ({e}); fix or "
                             "remove that line") from None
        records.append(record)
    return records, torn


def flatten(d: Mapping, sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (nested dicts joined with ``sep``)."""
    flat: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, sep, name + sep))
        else:
            flat[name] = value
    return flat
