"""A trained run as an object: :class:`Embedder` turns images into its embeddings.

``Embedder.from_run(run_dir)`` restores the run's checkpoint
(:func:`jaxmetric.train.restore_state`) and embeds with exactly the preprocessing the run
trained with, read from the checkpoint's :class:`~jaxmetric.train.state.InputSpec`:

1. decode (:func:`jaxmetric.data.images.decode_image`, ``resize=True``): the shorter side
   resized to the *stored* side and the centred square kept, converted to the run's 1 or 3
   channels. The stored side is the input side for ``crop="pad"`` runs (CIFAR: a 32x32
   image is used as it is) and :func:`~jaxmetric.data.images.stored_size` of it for
   ``crop="resized"`` runs (256 for 224);
2. :func:`~jaxmetric.train.step.eval_view` (the centre crop of ``"resized"`` runs) and the
   run's per-channel normalisation, then the network in eval mode
   (:func:`jaxmetric.train.make_embed_fn`: every local device, BatchNorm running stats);
3. L2 normalisation (:func:`jaxmetric.evaluate.l2_normalize`).

Images are streamed: files are decoded ``batch_size`` at a time and each batch is
embedded before the next is read, so memory holds one batch of pixels plus the
``(N, D)`` float32 embeddings, never the whole gallery. Every call of the network sees
exactly ``batch_size`` images (the last batch is padded by repeating its last image and
the padding dropped, :func:`jaxmetric.evaluate.embed`), so it compiles once.

:attr:`Embedder.fingerprint` names the weights (SHA-256 of every parameter and BatchNorm
statistic with its path); an index records it so that queries embedded by another model
are refused. :meth:`Embedder.export` writes the embedding function as a ``jax.export``
artefact that runs without jaxmetric or flax (``jax.export.deserialize(b).call(x)``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import pathlib
from collections.abc import Iterable, Sequence

import numpy as np

from jaxmetric.data.images import decode_image, stored_size
from jaxmetric.data.types import DataError
from jaxmetric.search.sources import ImageItem, iter_images
from jaxmetric.utils import atomic_writer, check_positive_int, progress_bar

__all__ = ["Embedded", "Embedder", "save_embeddings"]


@dataclasses.dataclass(frozen=True)
class Embedded:
    """What :meth:`Embedder.embed_items` returns: ``embeddings (N, D)`` float32 with unit
    rows, the ``ids`` and ``labels`` (None where unknown) of the images embedded, in
    order, and ``skipped``: the ids of undecodable images left out."""

    embeddings: np.ndarray
    ids: list[str]
    labels: list[str | None]
    skipped: list[str]


def _fingerprint(tree) -> str:
    import jax

    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        arr = np.asarray(leaf)
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(f"{arr.dtype}{arr.shape}".encode())
        digest.update(np.ascontiguousarray(arr).tobytes())
    return digest.hexdigest()[:16]


class Embedder:
    """Embeds images with a trained state (see the module docstring).

    Args:
      state: a :class:`~jaxmetric.train.TrainState` with its ``inputs``.
      batch_size: images per network call (rounded up to a multiple of the local device
        count).
      run_dir, epoch: where the state came from (recorded in indexes), if known.
    """

    def __init__(self, state, *, batch_size: int = 64, run_dir=None, epoch=None):
        import jax

        from jaxmetric.train import make_embed_fn, make_mesh

        if state.inputs is None:
            raise ValueError("the state records no InputSpec (image shape and "
                             "normalisation); restore it with restore_state(..., inputs=)")
        h, w, channels = state.inputs.shape
        if h != w:
            raise ValueError(f"the model takes {h}x{w} images; only square inputs are "
                             "supported")
        self.state = state
        self.inputs = state.inputs
        self.channels = channels
        self.image_side = h if self.inputs.crop == "pad" else stored_size(h)
        """Side of the decoded images before :func:`eval_view`."""
        devices = jax.local_devices()
        n = len(devices)
        self.batch_size = -(-check_positive_int("batch_size", batch_size) // n) * n
        self.run_dir = None if run_dir is None else str(pathlib.Path(run_dir).resolve())
        self.epoch = epoch
        self._embed_fn = make_embed_fn(state, mesh=make_mesh(devices))
        self._variables = {"params": state.params, "batch_stats": state.batch_stats}
        self._fingerprint = None
        self._dim = None

    @classmethod
    def from_run(cls, run_dir, epoch: int | None = None, *, batch_size: int = 64) -> Embedder:
        """The embedder of a run folder (its latest checkpoint, or ``epoch``).

        Raises:
          FileNotFoundError: not a run folder, or no such checkpoint.
        """
        import jax

        from jaxmetric.train import make_mesh, restore_state

        _, state, epoch = restore_state(run_dir, epoch=epoch,
                                        mesh=make_mesh(jax.local_devices()))
        return cls(state, batch_size=batch_size, run_dir=run_dir, epoch=epoch)

    # ----------------------------------------------------------------- identity

    @property
    def fingerprint(self) -> str:
        """16 hex digits of the SHA-256 of the weights (paths, dtypes, shapes, bytes)."""
        if self._fingerprint is None:
            self._fingerprint = _fingerprint(self._variables)
        return self._fingerprint

    @property
    def dim(self) -> int:
        """The embedding dimension D."""
        if self._dim is None:
            blank = np.zeros((1, self.image_side, self.image_side, self.channels), np.uint8)
            self._dim = int(self.embed_images(blank, progress=False).shape[1])
        return self._dim

    def describe(self) -> dict:
        """``{"run_dir", "epoch", "fingerprint", "dim"}``: what an index records."""
        return {"run_dir": self.run_dir, "epoch": self.epoch,
                "fingerprint": self.fingerprint, "dim": self.dim}

    # ----------------------------------------------------------------- embedding

    def embed_images(self, images, *, progress: bool = False) -> np.ndarray:
        """uint8 ``(N, side, side, C)`` images (already decoded at :attr:`image_side`)
        -> ``(N, D)`` float32 unit rows."""
        from jaxmetric.evaluate import embed

        images = np.asarray(images)
        expected = (self.image_side, self.image_side, self.channels)
        if images.ndim != 4 or images.dtype != np.uint8 or images.shape[1:] != expected:
            raise ValueError(f"expected uint8 images (N, {', '.join(map(str, expected))}); "
                             f"got {images.dtype} {images.shape}")
        if len(images) == 0:
            raise ValueError("no images to embed (N = 0)")
        return embed(self._embed_fn, images, batch_size=self.batch_size, progress=progress)

    def decode(self, source, name: str | None = None) -> np.ndarray:
        """One image file (path or bytes) decoded as this run's model expects it
        (step 1 of the module docstring); :class:`~jaxmetric.data.DataError` if not."""
        return decode_image(source, name, size=self.image_side, channels=self.channels,
                            resize=True)

    def embed_items(self, items: Iterable[ImageItem], *, skip_bad: bool = False,
                    progress: bool = True, total: int | None = None,
                    desc: str = "embed") -> Embedded:
        """Embeds a stream of images ``batch_size`` at a time (bounded memory).

        Args:
          items: :class:`~jaxmetric.search.sources.ImageItem` s, e.g. of
            :func:`~jaxmetric.search.sources.iter_images`.
          skip_bad: leave undecodable images out (listed in ``skipped``) instead of
            stopping.
          progress, total, desc: the tqdm bar.

        Raises:
          DataError: an image cannot be decoded (naming it, without ``skip_bad``), or the
            stream holds no image at all.
        """
        chunks, ids, labels, skipped = [], [], [], []
        batch: list[np.ndarray] = []
        bar = progress_bar(total=total, desc=desc, unit="img", disable=not progress,
                           leave=False)

        def flush():
            if batch:
                chunks.append(self.embed_images(np.stack(batch)))
                bar.update(len(batch))
                batch.clear()

        try:
            for item in items:
                try:
                    image = self.decode(item.source, item.id)
                except DataError:
                    if not skip_bad:
                        raise
                    skipped.append(item.id)
                    continue
                batch.append(image)
                ids.append(item.id)
                labels.append(item.label)
                if len(batch) == self.batch_size:
                    flush()
            flush()
        finally:
            bar.close()
        if not ids:
            raise DataError("no image to embed" + (
                f" ({len(skipped)} undecodable image(s) skipped)" if skipped else
                ": the gallery is empty"))
        return Embedded(np.concatenate(chunks), ids, labels, skipped)

    def embed_shared(self, items: Iterable[ImageItem], *, progress: bool = False) -> Embedded:
        """:meth:`embed_items` split over the processes of a ``jax.distributed`` job.

        Every process reads the same stream; process ``k`` of ``P`` decodes and embeds
        items ``k, k + P, k + 2P, ...`` on its own devices, and the embeddings are then
        all-gathered (``multihost_utils.process_allgather``), so every process returns
        the whole :class:`Embedded` in stream order -- the same as one process would.
        A collective: every process must call it with the same stream. An undecodable
        image stops every process (:func:`jaxmetric.distributed.agree`), naming it on
        the process that met it. In a single-process run this is :meth:`embed_items`.
        """
        import jax

        from jaxmetric import distributed

        count, me = jax.process_count(), jax.process_index()
        if count == 1:
            return self.embed_items(items, progress=progress)
        ids, labels, taken = [], [], []

        def mine():
            for i, item in enumerate(items):
                ids.append(item.id)
                labels.append(item.label)
                if i % count == me:
                    taken.append(i)
                    yield item

        error, got = None, None
        try:
            got = self.embed_items(mine(), progress=progress)
        except DataError as e:
            if taken or not ids:  # a bad image, or an empty stream (not just a short one)
                error = e
        distributed.agree(error)
        from jax.experimental import multihost_utils

        per = -(-len(ids) // count)
        local = np.zeros((per, self.dim), np.float32)
        if got is not None:
            local[:len(got.embeddings)] = got.embeddings
        gathered = np.asarray(multihost_utils.process_allgather(local))  # (P, per, D)
        out = np.empty((len(ids), local.shape[1]), np.float32)
        for k in range(count):
            n_k = len(range(k, len(ids), count))
            out[k::count] = gathered[k, :n_k]
        return Embedded(out, ids, labels, [])

    def embed_paths(self, paths: Sequence, *, skip_bad: bool = False,
                    progress: bool = False) -> Embedded:
        """Image files (labels None) -> :class:`Embedded`."""
        items = (ImageItem(str(p), None, pathlib.Path(p)) for p in paths)
        return self.embed_items(items, skip_bad=skip_bad, progress=progress,
                                total=len(paths))

    def embed_folder(self, location, *, under: str | None = None, skip_bad: bool = False,
                     progress: bool = True) -> Embedded:
        """Every image of a folder tree or tar archive, labelled by its class folder
        (:func:`~jaxmetric.search.sources.iter_images`) -> :class:`Embedded`."""
        return self.embed_items(iter_images(location, under=under), skip_bad=skip_bad,
                                progress=progress)

    # ----------------------------------------------------------------- export

    def export(self, path, *, platforms: Sequence[str] | None = None,
               batch_size: int | None = None) -> pathlib.Path:
        """Writes the embedding function as a serialized ``jax.export.Exported``.

        The artefact maps uint8 ``(N, H, W, C)`` images, decoded as :meth:`decode` does,
        to float32 ``(N, D)`` L2-normalised embeddings (crop, normalisation, network in
        eval mode, the weights baked in as constants). Its batch dimension is symbolic
        (any N) unless ``batch_size`` fixes it. Load it anywhere jax runs, without flax
        or jaxmetric: ``jax.export.deserialize(open(path, "rb").read()).call(x)``.
        ``platforms`` defaults to the current backend (e.g. ``("cpu", "cuda")`` for both).
        """
        import jax
        import jax.numpy as jnp

        from jaxmetric.distances import l2_normalize
        from jaxmetric.train.augment import normalize
        from jaxmetric.train.step import eval_view

        model = self.state.apply_fn.__self__
        if hasattr(model, "conv_chunk_elements"):  # chunking needs a static batch size
            model = model.clone(conv_chunk_elements=0)
        variables, inputs = self._variables, self.inputs

        def embed(images):
            x = normalize(eval_view(images, inputs), inputs.mean, inputs.std)
            return l2_normalize(model.apply(variables, x, train=False).astype(jnp.float32))

        n = jax.export.symbolic_shape("n")[0] if batch_size is None else \
            check_positive_int("batch_size", batch_size)
        spec = jax.ShapeDtypeStruct((n, self.image_side, self.image_side, self.channels),
                                    jnp.uint8)
        kwargs = {} if platforms is None else {"platforms": tuple(platforms)}
        exported = jax.export.export(jax.jit(embed), **kwargs)(spec)
        path = pathlib.Path(path)
        with atomic_writer(path, "wb") as f:
            f.write(exported.serialize())
        return path


def save_embeddings(path, embeddings, ids, labels=None) -> pathlib.Path:
    """Writes ``embeddings (N, D)``, ``ids (N,)`` and ``labels (N,)`` (strings; "" where
    unknown) to an ``.npz`` file atomically; read back with ``np.load(path)``."""
    emb = np.asarray(embeddings, np.float32)
    ids = np.asarray([str(i) for i in ids])
    if emb.ndim != 2 or len(ids) != len(emb):
        raise ValueError(f"need (N, D) embeddings and N ids; got {emb.shape} and {len(ids)}")
    labels = np.asarray(["" if v is None else str(v) for v in
                         (labels if labels is not None else [None] * len(ids))])
    if len(labels) != len(ids):
        raise ValueError(f"{len(labels)} labels for {len(ids)} embeddings")
    buffer = io.BytesIO()
    np.savez(buffer, embeddings=emb, ids=ids, labels=labels)
    path = pathlib.Path(path)
    with atomic_writer(path, "wb") as f:
        f.write(buffer.getvalue())
    return path
