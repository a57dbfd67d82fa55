"""Where gallery and query images come from: image files, folder trees and tar archives.

:func:`iter_images` yields one :class:`ImageItem` per image of a location, in a fixed
order, without reading more than one file at a time:

* **a folder** -- every ``.jpg``/``.jpeg``/``.png`` file below it (hidden files and
  folders skipped), sorted by path; the label of an image is the name of the folder it
  sits in (``ROOT/<class>/x.jpg``, or ``ROOT/train/<class>/x.jpg``), ``None`` for an
  image directly in ``ROOT``; the id is the file's path;
* **a tar archive** (``.tar``, ``.tar.gz``, ``.tar.xz``, ``.tar.bz2``, ``.tgz``) --
  its members are read in archive order as a stream (``tarfile`` mode ``"r|*"``: one
  pass, no seeking, no extraction to disk); labels as for a folder, the id
  ``ARCHIVE::member/name.jpg``.

``under`` keeps only what lies below a sub-path (``"train"`` of a CIFAR-10 tree).
:func:`read_sources` fetches the bytes or paths of given ids again (for pictures): files
directly, archive members in one more streaming pass over the archive.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import tarfile
from collections.abc import Iterable, Iterator

from jaxmetric.data.images import is_image_name
from jaxmetric.data.types import DataError

__all__ = ["ARCHIVE_SEPARATOR", "ImageItem", "is_archive", "iter_images", "read_sources"]

ARCHIVE_SEPARATOR = "::"
"""Between an archive's path and a member's name in an image id."""

_ARCHIVE_ENDINGS = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2")


@dataclasses.dataclass(frozen=True)
class ImageItem:
    """One image: ``id`` (a path, or ``ARCHIVE::member``), ``label`` (its folder's name,
    or None) and ``source`` (a path, or the member's bytes) for
    :func:`jaxmetric.data.images.decode_image`."""

    id: str
    label: str | None
    source: pathlib.Path | bytes


def is_archive(path) -> bool:
    """Whether ``path`` names a tar archive (by its ending)."""
    return str(path).lower().endswith(_ARCHIVE_ENDINGS)


def _label_of(parts: tuple[str, ...]) -> str | None:
    return parts[-2] if len(parts) >= 2 else None


def _visible(parts: Iterable[str]) -> bool:
    return not any(p.startswith(".") for p in parts)


def _iter_folder(root: pathlib.Path, under: str | None) -> Iterator[ImageItem]:
    top = root / under if under else root
    if not top.is_dir():
        raise DataError(f"{top} is not a folder")
    found = []
    for folder, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(pathlib.Path(folder, f) for f in files if is_image_name(f))
    for path in sorted(found):
        yield ImageItem(str(path), _label_of(path.relative_to(top).parts), path)


def _member_parts(name: str) -> tuple[str, ...]:
    return tuple(p for p in pathlib.PurePosixPath(name).parts if p not in ("", "."))


def _iter_archive(archive: pathlib.Path, under: str | None) -> Iterator[ImageItem]:
    prefix = _member_parts(under) if under else ()
    try:
        with tarfile.open(archive, "r|*") as tar:
            for member in tar:
                parts = _member_parts(member.name)
                if (not member.isfile() or not is_image_name(parts[-1])
                        or not _visible(parts) or parts[:len(prefix)] != prefix):
                    continue
                data = tar.extractfile(member).read()
                yield ImageItem(f"{archive}{ARCHIVE_SEPARATOR}{member.name}",
                                _label_of(parts[len(prefix):]), data)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{archive}: cannot read the archive ({e})") from e


def iter_images(location, *, under: str | None = None) -> Iterator[ImageItem]:
    """The images of a folder tree or a tar archive, one at a time (module docstring).

    Raises:
      DataError: ``location`` does not exist, ``under`` is not a folder in it, or the
        archive is corrupt or truncated (when the stream reaches the damage).
    """
    # Absolute, so the ids stay valid when the index is used from another folder.
    location = pathlib.Path(location).expanduser().resolve()
    if not location.exists():
        raise DataError(f"{location} does not exist")
    if location.is_file():
        if not is_archive(location):
            raise DataError(f"{location} is neither a folder nor a tar archive "
                            f"({', '.join(_ARCHIVE_ENDINGS)})")
        return _iter_archive(location, under)
    return _iter_folder(location, under)


def read_sources(ids: Iterable[str]) -> dict[str, pathlib.Path | bytes]:
    """``{id: source}`` for image ids of :func:`iter_images` (paths are returned as
    paths; each archive is streamed once for its members)."""
    out: dict[str, pathlib.Path | bytes] = {}
    wanted: dict[str, set[str]] = {}
    for i in ids:
        archive, sep, member = i.partition(ARCHIVE_SEPARATOR)
        if sep:
            wanted.setdefault(archive, set()).add(member)
        else:
            out[i] = pathlib.Path(i)
    for archive, members in wanted.items():
        try:
            with tarfile.open(archive, "r|*") as tar:
                for member in tar:
                    if member.name in members:
                        out[f"{archive}{ARCHIVE_SEPARATOR}{member.name}"] = \
                            tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DataError(f"{archive}: cannot read the archive ({e})") from e
        missing = members - {k.partition(ARCHIVE_SEPARATOR)[2] for k in out}
        if missing:
            raise DataError(f"{archive}: has no member {sorted(missing)[0]}")
    return out
