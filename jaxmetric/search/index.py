r"""A persistent FAISS index of a gallery: :class:`Index` (build, add, search, classify,
save, load).

**Distance.** Euclidean, :math:`\|q - g\|_2`, as in the lecture's nearest-neighbour rule.
FAISS's L2 indexes return squared distances; :meth:`Index.search` reports their square
root. The embeddings are L2-normalised, so :math:`\|q - g\|^2 = 2 - 2\langle q, g
\rangle`: the ranking is the cosine ranking and distances lie in :math:`[0, 2]`.

**Kinds** (``kind=``): ``"flat"`` -- exact brute force (``IndexFlatL2``); ``"ivfpq"`` --
inverted file + product quantisation (:func:`jaxmetric.evaluate.build_index`, its
parameters and defaults); ``"hnsw"`` -- the HNSW graph (``IndexHNSWFlat``, ``hnsw_m``
links per node, ``ef_search`` candidates per query). For the approximate kinds
:meth:`Index.build` measures recall@k against exact search on a sample of the gallery
(leave-one-out, :func:`jaxmetric.evaluate.recall_vs_exact`) and stores it.

**On disk** (:meth:`Index.save`) a folder holds ``index.faiss`` (``faiss.write_index``)
and ``metadata.json``: the ids and labels of the gallery, the dimension, distance, kind
and parameters, the run and the fingerprint of the embedder that made it, the SHA-256
of ``index.faiss``, the measured recall and (after calibration) the open-set threshold.
The folder is written whole into a temporary folder beside it and renamed into place;
an existing index is moved aside first and deleted after, so a crash leaves either the
old index or the new one (in the worst case under ``.NAME.old-*``), never a torn one.
:meth:`Index.load` checks the checksum, so a truncated or corrupted file is an error
naming it, never a silently wrong search. :meth:`Index.update_metadata` rewrites only
``metadata.json``, atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxmetric.utils import as_embeddings, check_positive_int, write_atomic

__all__ = ["DISTANCE", "FORMAT", "KINDS", "Index", "SearchError"]

KINDS = ("flat", "ivfpq", "hnsw")
DISTANCE = "euclidean"
FORMAT = 1
"""Version of the on-disk layout."""
INDEX_FILE, METADATA_FILE = "index.faiss", "metadata.json"
RECALL_K, RECALL_QUERIES = 10, 1000


class SearchError(ValueError):
    """A problem with an index or a query (corrupt file, wrong model, bad ``k``, ...)."""


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _checked(x, name: str, dim: int | None = None) -> np.ndarray:
    try:
        arr = as_embeddings(x, name)
    except (ValueError, TypeError) as e:
        raise SearchError(str(e)) from e
    if dim is not None and arr.shape[1] != dim:
        raise SearchError(f"{name} have dimension {arr.shape[1]} but the index holds "
                          f"{dim}-dimensional embeddings")
    return arr


def _json_label(v):
    return v.item() if isinstance(v, np.generic) else v


def _faiss_index(refs: np.ndarray, kind: str, params: dict[str, Any]):
    from jaxmetric.evaluate import build_index
    from jaxmetric.evaluate.knn import import_faiss

    if kind == "hnsw":
        faiss = import_faiss()
        idx = faiss.IndexHNSWFlat(refs.shape[1], check_positive_int(
            "hnsw_m", params.get("hnsw_m", 32)))
        idx.hnsw.efConstruction = check_positive_int(
            "ef_construction", params.get("ef_construction", 40))
        idx.hnsw.efSearch = check_positive_int("ef_search", params.get("ef_search", 64))
        idx.add(refs)
        return idx
    return build_index(refs, index=kind, **params)


class Index:
    """A gallery of embeddings with ids and labels (see the module docstring).

    Build with :meth:`build`, open with :meth:`load`; ``metadata`` is the JSON record.
    """

    def __init__(self, faiss_index, ids: list[str], labels: list, metadata: dict):
        self.faiss_index = faiss_index
        self.ids = list(ids)
        self.labels = list(labels)
        self.metadata = metadata

    # ------------------------------------------------------------------ build

    @classmethod
    def build(cls, embeddings, ids: Sequence, labels: Sequence | None = None, *,
              kind: str = "flat", embedder=None, **params) -> Index:
        """A new index over ``embeddings (N, D)``.

        Args:
          embeddings: finite, L2-normalised rows.
          ids: ``N`` names (paths) of the gallery items.
          labels: ``N`` labels (str/int; None where unknown) or None.
          kind: ``"flat"``, ``"ivfpq"`` or ``"hnsw"``.
          embedder: the :class:`~jaxmetric.search.Embedder` (or its ``describe()``) that
            made the embeddings; recorded so that searches with another model fail.
          params: ``nlist, m, nbits, nprobe, seed`` (ivfpq) or ``hnsw_m,
            ef_construction, ef_search`` (hnsw).

        Raises:
          SearchError: an empty gallery, NaN/inf, lengths that differ, an unknown kind,
            or parameters the data cannot support.
        """
        if kind not in KINDS:
            raise SearchError(f"unknown index kind {kind!r}; expected one of {KINDS}")
        if len(np.shape(embeddings)) == 2 and np.shape(embeddings)[0] == 0:
            raise SearchError("the gallery is empty: no embeddings to index")
        refs = _checked(embeddings, "gallery embeddings")
        ids = [str(i) for i in ids]
        labels = [None] * len(ids) if labels is None else [_json_label(v) for v in labels]
        if not len(ids) == len(labels) == len(refs):
            raise SearchError(f"{len(refs)} embeddings, {len(ids)} ids and {len(labels)} "
                              "labels: they must be as many")
        try:
            idx = _faiss_index(refs, kind, params)
        except ValueError as e:
            raise SearchError(str(e)) from e
        source = embedder.describe() if hasattr(embedder, "describe") else dict(embedder or {})
        metadata = {"format": FORMAT, "kind": kind, "distance": DISTANCE,
                    "dim": int(refs.shape[1]), "params": cls._params(idx, kind),
                    "run_dir": source.get("run_dir"), "epoch": source.get("epoch"),
                    "fingerprint": source.get("fingerprint")}
        if source.get("dim") is not None and source["dim"] != refs.shape[1]:
            raise SearchError(f"the embedder makes {source['dim']}-dimensional embeddings, "
                              f"the gallery's are {refs.shape[1]}-dimensional")
        index = cls(idx, ids, labels, metadata)
        if kind != "flat" and len(refs) > 1:
            from jaxmetric.evaluate import recall_vs_exact

            k = min(RECALL_K, len(refs) - 1)
            metadata["recall"] = {
                "k": k, "queries": min(RECALL_QUERIES, len(refs)),
                "value": recall_vs_exact(idx, refs, refs, k=k, exclude_self=True,
                                         max_queries=RECALL_QUERIES)}
        return index

    @staticmethod
    def _params(idx, kind: str) -> dict[str, Any]:
        if kind == "hnsw":
            return {"hnsw_m": int(idx.hnsw.nb_neighbors(1)),
                    "ef_construction": int(idx.hnsw.efConstruction),
                    "ef_search": int(idx.hnsw.efSearch)}
        from jaxmetric.evaluate import index_params

        return {k: v for k, v in index_params(idx).items() if k != "type"}

    def add(self, embeddings, ids: Sequence, labels: Sequence | None = None) -> None:
        """Appends items (an IVF-PQ index keeps its trained quantisers; its stored recall
        was measured on the gallery it was built with)."""
        refs = _checked(embeddings, "embeddings", self.dim)
        ids = [str(i) for i in ids]
        labels = [None] * len(ids) if labels is None else [_json_label(v) for v in labels]
        if not len(ids) == len(labels) == len(refs):
            raise SearchError(f"{len(refs)} embeddings, {len(ids)} ids and {len(labels)} "
                              "labels: they must be as many")
        self.faiss_index.add(refs)
        self.ids += ids
        self.labels += labels

    # ------------------------------------------------------------------ properties

    @property
    def dim(self) -> int:
        return int(self.metadata["dim"])

    @property
    def kind(self) -> str:
        return self.metadata["kind"]

    def __len__(self) -> int:
        return int(self.faiss_index.ntotal)

    @property
    def threshold(self) -> float | None:
        """The calibrated open-set distance threshold, if any (``python -m jaxmetric.search
        calibrate`` sets it)."""
        t = self.metadata.get("threshold")
        return None if t is None else float(t["distance"])

    def check_embedder(self, embedder) -> None:
        """Raises :class:`SearchError` unless ``embedder`` (or its ``describe()`` dict)
        is the model this index was built with (same fingerprint and dimension)."""
        info = embedder.describe() if hasattr(embedder, "describe") else dict(embedder)
        if info.get("dim") is not None and info["dim"] != self.dim:
            raise SearchError(f"the model makes {info['dim']}-dimensional embeddings but "
                              f"the index holds {self.dim}-dimensional ones")
        mine = self.metadata.get("fingerprint")
        if mine is not None and info.get("fingerprint") != mine:
            raise SearchError(
                f"the index was built with another model (fingerprint {mine}, run "
                f"{self.metadata.get('run_dir')} epoch {self.metadata.get('epoch')}); "
                f"this one is {info.get('fingerprint')} (run {info.get('run_dir')} epoch "
                f"{info.get('epoch')}): rebuild the index")

    # ------------------------------------------------------------------ search

    def search(self, queries, k: int, *, embedder=None):
        """The ``k`` nearest gallery items of each query.

        Returns:
          ``(distances (Q, k) float32 Euclidean, ids (Q, k) object, labels (Q, k)
          object)``, nearest first. An approximate index may find fewer than ``k``: the
          missing entries have distance ``inf`` and id/label None.

        Raises:
          SearchError: wrong dimension or NaN queries, ``k`` not in ``[1, len(index)]``,
            an empty index, or (given ``embedder``) another model.
        """
        if embedder is not None:
            self.check_embedder(embedder)
        q = _checked(queries, "queries", self.dim)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise SearchError(f"k must be a positive integer; got {k!r}")
        if len(self) == 0:
            raise SearchError("the index is empty")
        if k > len(self):
            raise SearchError(f"k={k} is larger than the gallery ({len(self)} items)")
        sq, ind = self.faiss_index.search(q, int(k))
        found = ind >= 0
        dist = np.where(found, np.sqrt(np.maximum(sq, 0.0)), np.inf).astype(np.float32)
        ids = np.full(ind.shape, None, object)
        labels = np.full(ind.shape, None, object)
        gallery_ids = np.array(self.ids, dtype=object)
        gallery_labels = np.empty(len(self.labels), object)
        gallery_labels[:] = self.labels
        ids[found] = gallery_ids[ind[found]]
        labels[found] = gallery_labels[ind[found]]
        return dist, ids, labels

    def classify(self, queries, k: int = 1, *, eps: float = 1e-6):
        r"""Closed-set labels: the label with the largest distance-weighted vote among the
        ``k`` nearest (weight :math:`1 / (d + \epsilon)`; ``k=1`` is the nearest
        neighbour's label).

        Returns:
          ``(labels (Q,) object, confidence (Q,) float64)``: the winner's share of the
          vote, in ``(0, 1]`` (always 1 for ``k=1``: use :func:`~jaxmetric.search.match`
          with a calibrated threshold to answer "unknown").
        """
        dist, _, labels = self.search(queries, k)
        out = np.empty(len(dist), object)
        confidence = np.empty(len(dist))
        for row, (d, lab) in enumerate(zip(dist, labels, strict=True)):
            votes: dict[Any, float] = {}
            for di, li in zip(d, lab, strict=True):
                if np.isfinite(di):
                    votes[li] = votes.get(li, 0.0) + 1.0 / (float(di) + eps)
            best = max(votes, key=votes.get)  # first seen (nearest) wins a tie
            out[row], confidence[row] = best, votes[best] / sum(votes.values())
        return out, confidence

    # ------------------------------------------------------------------ disk

    def save(self, directory) -> pathlib.Path:
        """Writes the index folder atomically (module docstring)."""
        from jaxmetric.evaluate.knn import import_faiss

        faiss = import_faiss()
        directory = pathlib.Path(directory).expanduser().absolute()
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
        try:
            faiss.write_index(self.faiss_index, str(tmp / INDEX_FILE))
            with open(tmp / INDEX_FILE, "rb") as f:
                os.fsync(f.fileno())
            self.metadata["index_sha256"] = _sha256(tmp / INDEX_FILE)
            write_atomic(tmp / METADATA_FILE, self._metadata_json())
            old = None
            if directory.exists():
                if not (directory / METADATA_FILE).is_file():
                    raise SearchError(f"{directory} exists and is not an index; not "
                                      "overwriting it")
                old = pathlib.Path(tempfile.mkdtemp(dir=directory.parent,
                                                    prefix=f".{directory.name}.old-"))
                os.replace(directory, old / "index")
            os.replace(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return directory

    def _metadata_json(self) -> str:
        return json.dumps({**self.metadata, "count": len(self), "ids": self.ids,
                           "labels": self.labels}, indent=1)

    def update_metadata(self, directory, **changes) -> None:
        """Sets ``changes`` in the metadata and rewrites ``directory/metadata.json``
        atomically (the index file is untouched; its checksum still holds)."""
        directory = pathlib.Path(directory)
        if not (directory / METADATA_FILE).is_file():
            raise SearchError(f"{directory} is not an index folder (no {METADATA_FILE})")
        self.metadata.update(changes)
        write_atomic(directory / METADATA_FILE, self._metadata_json())

    @classmethod
    def load(cls, directory) -> Index:
        """Opens an index folder, verifying the checksum and the counts.

        Raises:
          SearchError: not an index folder, unreadable metadata, a checksum mismatch
            (corrupt or truncated ``index.faiss``), or counts that disagree.
        """
        from jaxmetric.evaluate.knn import import_faiss

        directory = pathlib.Path(directory).expanduser()
        meta_file, index_file = directory / METADATA_FILE, directory / INDEX_FILE
        if not meta_file.is_file() or not index_file.is_file():
            raise SearchError(f"{directory} is not an index folder (expected {INDEX_FILE} "
                              f"and {METADATA_FILE})")
        try:
            meta = json.loads(meta_file.read_text())
            ids, labels = meta.pop("ids"), meta.pop("labels")
            count = meta.pop("count")
            expected = meta["index_sha256"]
        except (ValueError, KeyError) as e:
            raise SearchError(f"{meta_file}: unreadable index metadata ({e})") from e
        if meta.get("format") != FORMAT:
            raise SearchError(f"{meta_file}: index format {meta.get('format')}, this "
                              f"version reads format {FORMAT}")
        if _sha256(index_file) != expected:
            raise SearchError(f"{index_file} is corrupt or truncated: its SHA-256 does not "
                              "match the one recorded in metadata.json; rebuild the index")
        try:
            idx = import_faiss().read_index(str(index_file))
        except RuntimeError as e:  # pragma: no cover - the checksum catches damage first
            raise SearchError(f"{index_file}: FAISS cannot read it ({e})") from e
        with contextlib.suppress(AttributeError):
            if meta["kind"] == "ivfpq":
                idx.nprobe = int(meta["params"]["nprobe"])
            elif meta["kind"] == "hnsw":
                idx.hnsw.efSearch = int(meta["params"]["ef_search"])
        if not idx.ntotal == count == len(ids) == len(labels) or idx.d != meta["dim"]:
            raise SearchError(f"{directory}: the index holds {idx.ntotal} x {idx.d} vectors "
                              f"but its metadata {len(ids)} ids of dimension {meta['dim']}")
        return cls(idx, ids, labels, meta)
