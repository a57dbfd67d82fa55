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
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
from jax.sharding import Mesh

from jaxmetric.data.config import DataConfig
from jaxmetric.train.config import TrainConfig
from jaxmetric.train.mesh import make_mesh
from jaxmetric.train.state import InputSpec, TrainState, initial_state

__all__ = [
    "checkpoint_manager",
    "finalized_epochs",
    "load_config",
    "load_data_config",
    "restore_checkpoint",
    "restore_state",
    "save_checkpoint",
]


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


def save_checkpoint(manager, epoch: int, state: TrainState, train_key) -> None:
    """Save ``state`` and the training key as checkpoint ``epoch`` (every process calls
    this; the write finishes in the background, see ``manager.wait_until_finished``)."""
    import orbax.checkpoint as ocp

    meta = {"epoch": epoch, "step": int(state.step)}
    if state.inputs is not None:
        meta["inputs"] = state.inputs.to_dict()
    if state.loss_params is not None:  # per-class proxies / weights / margins
        meta["num_classes"] = int(jax.tree.leaves(state.loss_params)[0].shape[0])
    manager.save(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"state": state, "train_key": train_key}),
        meta=ocp.args.JsonSave(meta)))


def _read_meta(manager, epoch: int) -> dict:
    import orbax.checkpoint as ocp

    return manager.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def restore_checkpoint(manager, epoch: int, state: TrainState, train_key):
    """Checkpoint ``epoch`` onto the shapes, dtypes and shardings of the arguments.

    Returns ``(state, train_key)``. The state keeps the :class:`InputSpec` recorded in
    the checkpoint (the normalisation the model was trained with) where there is one.
    """
    import orbax.checkpoint as ocp

    meta = _read_meta(manager, epoch)
    if meta["epoch"] != epoch:
        raise ValueError(f"checkpoint {epoch} records epoch {meta['epoch']}")
    if "inputs" in meta:
        recorded = InputSpec.from_dict(meta["inputs"])
        if state.inputs is not None and recorded.shape != state.inputs.shape:
            raise ValueError(f"checkpoint {epoch} was trained on {recorded.shape} images, "
                             f"not {state.inputs.shape}")
        state = state.replace(inputs=recorded)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                            {"state": state, "train_key": train_key})
    restored = manager.restore(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))
    return restored.state["state"], restored.state["train_key"]


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
    ``FileNotFoundError`` naming what is missing. With a mesh over several processes
    (the default in a ``jax.distributed`` job) every process must call this; the state
    comes back replicated over the mesh.
    """
    run_dir = pathlib.Path(run_dir)
    config = load_config(run_dir)
    epochs = finalized_epochs(run_dir / "checkpoints")
    if not epochs:
        raise FileNotFoundError(f"{run_dir / 'checkpoints'} holds no complete checkpoint")
    epoch = epochs[-1] if epoch is None else epoch
    if epoch not in epochs:
        raise FileNotFoundError(f"no checkpoint for epoch {epoch} in {run_dir}; have {epochs}")
    mesh = make_mesh() if mesh is None else mesh
    manager = checkpoint_manager(run_dir / "checkpoints", config.keep_checkpoints)
    try:
        meta = _read_meta(manager, epoch)
        if "inputs" in meta:
            inputs = InputSpec.from_dict(meta["inputs"])
        elif inputs is None:
            raise ValueError(
                f"checkpoint {epoch} of {run_dir} does not record its input images' shape "
                "and normalisation (an earlier version wrote it): pass inputs= (the data "
                "set it was trained on, or an InputSpec)")
        # The schedule only needs a step count; the restored optimizer state has the rest
        # (and the trained weights: the pretrained file is not read again).
        template = dataclasses.replace(config, pretrained=None)
        state, train_key = initial_state(template, 1, mesh, inputs,
                                         num_classes=meta.get("num_classes"))
        state, _ = restore_checkpoint(manager, epoch, state, train_key)
    finally:
        manager.close()
    return config, state, epoch
