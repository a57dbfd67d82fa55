"""Orbax checkpoints of a run: save, restore, list, and :func:`restore_state`.

A run's checkpoints live in ``<run>/checkpoints/<epoch>`` (an orbax
``CheckpointManager``). Each holds the train state, the training PRNG key and a small
JSON ``meta``: the epoch, the step and the :class:`~jaxmetric.train.state.InputSpec`
(image shape and normalisation), so a saved model can be rebuilt and used without its
data set. A resumed run restarts at the start of the next epoch (epoch sampling is a
function of ``(seed, epoch)``, step keys of the step number), so it ends with the same
params as an uninterrupted run.

Orbax writes each checkpoint into ``<epoch>.orbax-checkpoint-tmp*`` and renames it to
``<epoch>`` only when complete (``AtomicRenameTemporaryPath``, the default on local file
systems); epochs are listed from finalised directories only (:func:`finalized_epochs`),
so a crash mid-write never replaces the last good checkpoint, and leftover temporary
directories are deleted when the manager opens. With several processes all of them
save and restore together (orbax writes each process's shards and lets process 0 write
the metadata and finalise the directory): the folder must be on a shared file system.

**Guarantees.** Resume after a kill at any moment is equivalent to the uninterrupted run
(it restarts from the newest complete and intact checkpoint, at the start of the next
epoch), and a damaged checkpoint is detected and skipped:

* *checksums*: :func:`save_checkpoint` records in ``meta`` the sha256 of every saved
  array (its dtype, shape and bytes, :func:`array_checksums`), computed on the host
  copy of the state at save time (so the asynchronous write cannot change what is
  summed); ``meta`` is part of the checkpoint, so it is written and finalised with it.
  :func:`restore_checkpoint` recomputes the sums on the restored arrays: a mismatch
  (flipped bits that still decode) is a damaged checkpoint. A checkpoint written before
  checksums were recorded restores unverified (an INFO line says so);
* *damage* (:class:`DamagedCheckpointError`): a checkpoint whose files cannot be read
  back (truncated array file, emptied metadata: orbax and TensorStore raise many kinds
  of errors, all mapped to this one) or whose checksums differ.
  :func:`restore_latest` and :func:`restore_state` take the newest intact checkpoint,
  with a WARNING naming each one skipped and why; when none is intact they raise
  :class:`DamagedCheckpointError` listing them;
* *durable saves*: ``save_checkpoint(..., wait=True)`` returns once the checkpoint is
  final (renamed to ``<epoch>``). A failed write removes its temporary directory; a full
  disk raises :class:`DiskFullError` naming the epoch and the last complete checkpoint,
  which stays intact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import pathlib
import shutil
import threading

import jax
import numpy as np
from jax.sharding import Mesh

from jaxmetric import distributed
from jaxmetric.data.config import DataConfig
from jaxmetric.train.config import TrainConfig
from jaxmetric.train.mesh import make_mesh
from jaxmetric.train.state import InputSpec, TrainState, initial_state

__all__ = [
    "DamagedCheckpointError",
    "DiskFullError",
    "array_checksums",
    "checkpoint_manager",
    "finalized_epochs",
    "load_config",
    "load_data_config",
    "restore_checkpoint",
    "restore_latest",
    "restore_state",
    "save_checkpoint",
]

log = logging.getLogger("jaxmetric.train")


class DamagedCheckpointError(ValueError):
    """A checkpoint that cannot be read back whole or whose arrays differ from the
    checksums recorded at save time; also raised when no checkpoint of a run is intact."""


class DiskFullError(OSError):
    """The disk filled up while a checkpoint was written (``errno.ENOSPC``); the message
    names the epoch and the last complete checkpoint."""


def array_checksums(tree) -> dict[str, str]:
    """``{key path: sha256}`` of every array leaf of ``tree`` (its dtype name, shape and
    C-order bytes, read on the host)."""
    host = distributed.to_host(tree)
    sums = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(host)[0]:
        a = np.ascontiguousarray(np.asarray(leaf))
        h = hashlib.sha256(f"{a.dtype.name}{a.shape}".encode())
        h.update(a.tobytes())
        sums[jax.tree_util.keystr(path)] = h.hexdigest()
    return sums


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else ""
    line = line if len(line) <= 160 else line[:157] + "..."
    return f"{type(e).__name__}: {line}".rstrip(": ")


def _all_agree(ok: bool) -> bool:
    """Whether ``ok`` holds on every process (a collective with several)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(ok))).all())


def checkpoint_manager(directory: pathlib.Path, keep: int):
    """An orbax ``CheckpointManager`` over ``directory`` keeping the last ``keep``."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options)


def finalized_epochs(directory) -> list[int]:
    """Epochs with a complete checkpoint (orbax's temporary directories excluded)."""
    from orbax.checkpoint import utils as ocp_utils

    directory = pathlib.Path(directory)
    return sorted(ocp_utils.checkpoint_steps(directory)) if directory.is_dir() else []


def save_checkpoint(manager, epoch: int, state: TrainState, train_key, *,
                    wait: bool = False) -> None:
    """Save ``state`` and the training key as checkpoint ``epoch`` (every process calls
    this), with the sha256 of every array in its ``meta`` (:func:`array_checksums`).

    The write finishes in the background (``manager.wait_until_finished``); with
    ``wait=True`` this returns only once the checkpoint is final. A failed write leaves
    no temporary directory behind; a full disk raises :class:`DiskFullError`.
    """
    import orbax.checkpoint as ocp

    tree = {"state": state, "train_key": train_key}
    meta = {"epoch": epoch, "step": int(state.step), "checksums": array_checksums(tree)}
    if state.inputs is not None:
        meta["inputs"] = state.inputs.to_dict()
    if state.loss_params is not None:  # per-class proxies / weights / margins
        meta["num_classes"] = int(jax.tree.leaves(state.loss_params)[0].shape[0])
    with _orbax_errors_held() as held:
        try:
            manager.save(epoch, args=ocp.args.Composite(
                state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)))
            if wait:
                manager.wait_until_finished()
        except Exception as e:
            _drain_orbax_threads()
            for record in held:  # orbax's own report of the failure, tracebacks and all
                log.debug("orbax: %s", record.getMessage(), exc_info=record.exc_info)
            _failed_save(manager.directory, epoch, e)
            raise
        for record in held:  # the save went through after all: show what orbax said
            logging.getLogger(record.name).handle(record)


@contextlib.contextmanager
def _orbax_errors_held():
    """Hold back orbax's ERROR records (absl logger) while a save runs: a failed write
    is reported once, by :func:`save_checkpoint`'s exception, not by pages of tracebacks
    from orbax's threads (they go to DEBUG)."""
    absl_logger = logging.getLogger("absl")
    held = []

    def hold(record):
        if record.levelno >= logging.ERROR and "orbax" in record.pathname:
            held.append(record)
            return False
        return True

    absl_logger.addFilter(hold)
    try:
        yield held
    finally:
        absl_logger.removeFilter(hold)


def _drain_orbax_threads(timeout: float = 60.0) -> None:
    """Wait for orbax's writer threads still running after a failed save (the first
    failure ends the save; the other writes of the checkpoint go on for a while), so
    that its temporary directory is removed after the last of them."""
    from orbax.checkpoint._src.futures import future

    kinds = tuple(t for t in (getattr(future, "_SignalingThread", None),) if t)
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and (
                isinstance(thread, kinds) or thread.name in ("async_save", "save_finalize")):
            thread.join(timeout)


def _disk_full(e: BaseException) -> bool:
    """An ENOSPC anywhere in the exception's chain (TensorStore reports it in words)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or \
                "no space left on device" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    return False


def _failed_save(directory, epoch: int, error: Exception) -> None:
    """Remove what a failed write of ``epoch`` left; raise :class:`DiskFullError` if the
    disk is full (the caller re-raises anything else)."""
    directory = pathlib.Path(directory)
    if jax.process_index() == 0:
        for tmp in directory.glob(f"{epoch}.orbax-checkpoint-tmp*"):
            shutil.rmtree(tmp, ignore_errors=True)
    if _disk_full(error):
        done = [e for e in finalized_epochs(directory) if e != epoch]
        last = (f"the last complete checkpoint is epoch {done[-1]}" if done
                else "no checkpoint is complete yet")
        raise DiskFullError(errno.ENOSPC, f"disk full while saving epoch {epoch}; {last} "
                            f"(in {directory}); free space and run with --resume") from error


def _read_meta(manager, epoch: int) -> dict:
    """The checkpoint's ``meta``; :class:`DamagedCheckpointError` when it cannot be read."""
    import orbax.checkpoint as ocp

    try:
        meta = manager.restore(epoch, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # orbax's errors for a damaged file vary: one kind here
        raise DamagedCheckpointError(
            f"checkpoint {epoch} in {manager.directory}: its metadata cannot be read "
            f"({_first_line(e)})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("epoch"), int):
        raise DamagedCheckpointError(f"checkpoint {epoch} in {manager.directory}: its "
                                     f"metadata holds no epoch ({str(meta)[:80]})")
    return meta


def restore_checkpoint(manager, epoch: int, state: TrainState, train_key):
    """Checkpoint ``epoch`` onto the shapes, dtypes and shardings of the arguments.

    Returns ``(state, train_key)``. The state keeps the :class:`InputSpec` recorded in
    the checkpoint (the normalisation the model was trained with) where there is one.
    Raises :class:`DamagedCheckpointError` when the checkpoint cannot be read or its
    arrays differ from the checksums recorded at save time (on every process when one
    of them finds damage); a checkpoint without checksums restores unverified.
    """
    error = restored = None
    try:
        restored = _restore_verified(manager, epoch, state, train_key)
    except DamagedCheckpointError as e:
        error = e
    if not _all_agree(error is None):
        raise error or DamagedCheckpointError(
            f"checkpoint {epoch} in {manager.directory} is damaged as another process "
            "reads it")
    return restored


def _restore_verified(manager, epoch: int, state: TrainState, train_key):
    import orbax.checkpoint as ocp

    meta = _read_meta(manager, epoch)
    if meta["epoch"] != epoch:
        raise DamagedCheckpointError(f"checkpoint {epoch} in {manager.directory} records "
                                     f"epoch {meta['epoch']}")
    if "inputs" in meta:
        recorded = InputSpec.from_dict(meta["inputs"])
        if state.inputs is not None and recorded.shape != state.inputs.shape:
            raise ValueError(f"checkpoint {epoch} was trained on {recorded.shape} images, "
                             f"not {state.inputs.shape}")
        state = state.replace(inputs=recorded)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                            {"state": state, "train_key": train_key})
    try:
        restored = manager.restore(epoch, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract))).state
    except Exception as e:  # truncated or garbled files: TensorStore's errors vary
        raise DamagedCheckpointError(f"checkpoint {epoch} in {manager.directory}: its "
                                     f"arrays cannot be read ({_first_line(e)})") from e
    if "checksums" not in meta:
        log.info("checkpoint %d in %s records no checksums (written by an earlier "
                 "version): restored without verification", epoch, manager.directory)
    else:
        now, recorded = array_checksums(restored), meta["checksums"]
        bad = sorted(k for k in set(now) | set(recorded) if now.get(k) != recorded.get(k))
        if bad:
            raise DamagedCheckpointError(
                f"checkpoint {epoch} in {manager.directory}: {len(bad)} of {len(recorded)} "
                f"arrays differ from the sha256 recorded when it was saved "
                f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")
    return restored["state"], restored["train_key"]


def restore_latest(manager, state: TrainState, train_key, epochs: list[int]):
    """The newest intact checkpoint among ``epochs``: ``(epoch, state, train_key,
    damaged)``, ``damaged`` the newer epochs skipped (each with a WARNING saying why).

    Raises :class:`DamagedCheckpointError` naming every checkpoint when none is intact.
    """
    damaged, reasons = [], []
    for epoch in sorted(epochs, reverse=True):
        try:
            restored, key = restore_checkpoint(manager, epoch, state, train_key)
        except DamagedCheckpointError as e:
            damaged.append(epoch)
            reasons.append(str(e))
            older = [x for x in epochs if x < epoch]
            log.warning("skipped damaged checkpoint %d: %s; %s", epoch, e,
                        f"trying epoch {max(older)}" if older else "no older checkpoint")
            continue
        return epoch, restored, key, damaged
    raise DamagedCheckpointError(
        f"no intact checkpoint in {manager.directory}: " + "; ".join(reasons)
        + ". Start a fresh run in another folder (or delete this one)")


def load_config(run_dir) -> TrainConfig:
    """The :class:`TrainConfig` of a run folder written by :func:`~jaxmetric.train.fit`."""
    config_file = pathlib.Path(run_dir) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{run_dir} is not a jaxmetric run folder: no config.json")
    return TrainConfig.from_dict(json.loads(config_file.read_text()))


def load_data_config(run_dir) -> DataConfig:
    """The :class:`~jaxmetric.data.DataConfig` of a run folder: what it was trained and
    evaluated on (:meth:`DataConfig.of_run`)."""
    config_file = pathlib.Path(run_dir) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{run_dir} is not a jaxmetric run folder: no config.json")
    return DataConfig.of_run(json.loads(config_file.read_text()))


def restore_state(run_dir, *, epoch: int | None = None, mesh: Mesh | None = None,
                  inputs=None):
    """Loads a saved run: ``(config, state, epoch)`` from ``run_dir`` (latest epoch).

    ``run_dir`` is a folder written by :func:`~jaxmetric.train.fit` (``config.json`` and
    ``checkpoints/``). The image shape and normalisation come from the checkpoint;
    ``inputs`` (an :class:`InputSpec` or the data set) is only needed for checkpoints
    that do not record them (written by an earlier version). Raises
    ``FileNotFoundError`` naming what is missing. Without ``epoch`` the newest intact
    checkpoint is taken, each damaged newer one skipped with a WARNING; a damaged
    ``epoch`` asked for, or no intact checkpoint, raises :class:`DamagedCheckpointError`.
    With a mesh over several processes
    (the default in a ``jax.distributed`` job) every process must call this; the state
    comes back replicated over the mesh.
    """
    run_dir = pathlib.Path(run_dir)
    config = load_config(run_dir)
    epochs = finalized_epochs(run_dir / "checkpoints")
    if not epochs:
        raise FileNotFoundError(f"{run_dir / 'checkpoints'} holds no complete checkpoint")
    if epoch is not None and epoch not in epochs:
        raise FileNotFoundError(f"no checkpoint for epoch {epoch} in {run_dir}; have {epochs}")
    mesh = make_mesh() if mesh is None else mesh
    manager = checkpoint_manager(run_dir / "checkpoints", config.keep_checkpoints)
    given = inputs
    reasons = []
    try:
        for candidate in [epoch] if epoch is not None else sorted(epochs, reverse=True):
            try:
                meta, error = None, None
                try:
                    meta = _read_meta(manager, candidate)
                except DamagedCheckpointError as e:
                    error = e
                if not _all_agree(error is None):  # every process skips it, or none
                    raise error or DamagedCheckpointError(
                        f"checkpoint {candidate} in {run_dir / 'checkpoints'} is damaged as "
                        "another process reads it")
                if "inputs" in meta:
                    inputs = InputSpec.from_dict(meta["inputs"])
                elif given is None:
                    raise ValueError(
                        f"checkpoint {candidate} of {run_dir} does not record its input "
                        "images' shape and normalisation (an earlier version wrote it): "
                        "pass inputs= (the data set it was trained on, or an InputSpec)")
                else:
                    inputs = given
                # The schedule only needs a step count; the restored optimizer state has
                # the rest (and the trained weights: the pretrained file is not read again).
                template = dataclasses.replace(config, pretrained=None)
                state, train_key = initial_state(template, 1, mesh, inputs,
                                                 num_classes=meta.get("num_classes"))
                state, _ = restore_checkpoint(manager, candidate, state, train_key)
            except DamagedCheckpointError as e:
                if epoch is not None:
                    raise
                reasons.append(str(e))
                older = [x for x in epochs if x < candidate]
                log.warning("skipped damaged checkpoint %d: %s; %s", candidate, e,
                            f"trying epoch {max(older)}" if older else "no older checkpoint")
                continue
            return config, state, candidate
    finally:
        manager.close()
    raise DamagedCheckpointError(f"no intact checkpoint in {run_dir / 'checkpoints'}: "
                                 + "; ".join(reasons))
