"""Data-parallel metric-learning training loop: state, step, embedding, ``fit``.

Layout (in the spirit of flax's ``examples/imagenet/train.py``):

* :class:`TrainState` / :func:`create_train_state` -- params, BatchNorm statistics,
  optax state (SGD-Nesterov or AdamW, warm-up + cosine schedule, no weight decay on
  BatchNorm parameters and biases);
* :func:`train_step` -- a pure ``(state, batch, rng) -> (state, metrics)``;
* :func:`make_train_step` -- wraps it in ``jax.shard_map`` over a 1-D ``"batch"`` mesh
  and ``jax.jit`` (state donated). The training set is put on every device once; per
  step the host only sends the int32 indices of the batch, and each device gathers its
  shard of images and labels itself;
* :func:`make_embed_fn` -- eval-mode embeddings across all devices, for
  :func:`jaxmetric.evaluate.embed`;
* :func:`fit` -- epochs, tqdm, ``metrics.jsonl``, orbax checkpoints, resume.

**shard_map, not pmap.** The original design used ``jax.pmap``. Since JAX 0.8 ``pmap``
is implemented on top of ``jax.shard_map``, which the JAX team recommends for new code:
it works on a ``Mesh`` with explicit shardings, so the device-resident data set, the
sharded indices and the replicated state are ordinary ``jax.Array`` objects.

**Gradient summation.** The losses all-gather the embeddings and ``psum`` their partial
sums, so on each device the gradient with respect to the replicated params is only
that device's *contribution* to the single-device gradient. Under ``shard_map`` with
``check_vma=True`` (the default, used here) the params are typed device-invariant and
JAX itself inserts the ``psum`` over the axis when transposing their implicit
broadcast: the gradient that comes out is already the full sum, and an explicit
``psum`` would multiply it by the device count. (Measured with JAX 0.10: an extra psum
gives 8x the gradient on 8 devices; ``check_vma=False`` gives per-device values for which
neither psum nor nothing is right; ``pmap`` needs the explicit psum.) :func:`train_step`
therefore sums only gradient leaves whose type still varies over the axis (params that
were passed in per-device), and refuses to run under a mapping without that typing.
``tests/test_train.py`` checks that 8 devices give the 1-device step.

**Augmentation** keys are per example: ``fold_in(rng, position in the global batch)``,
so each image gets its own crop/flip whatever the number of devices, and an N-device
step equals the 1-device step on the concatenated batch, augmentation included.

**Checkpoints** (``out_dir/checkpoints/<epoch>``, orbax ``CheckpointManager``) hold the
train state, the training PRNG key and the epoch; a resumed run restarts at the start
of the next epoch (epoch sampling is a function of ``(seed, epoch)``, step keys of the
step number), so it ends with the same params as an uninterrupted run. Orbax writes each
checkpoint into ``<epoch>.orbax-checkpoint-tmp*`` and renames it to ``<epoch>`` only
when complete (``AtomicRenameTemporaryPath``, the default on local file systems); steps
are listed from finalised directories only, so a crash mid-write never replaces the last
good checkpoint, and leftover temporary directories are deleted when the manager opens.

**Several processes** (multi-host; :mod:`jaxmetric.distributed`). After
``distributed.initialize`` the default mesh (:func:`make_mesh`) spans ``jax.devices()``,
every device of every process, and the same code runs in every process. Host values
become global arrays through :func:`_put` (``jax.make_array_from_callback``): each
process puts only its own devices' part. Each process holds the whole training set and
puts a copy on each of its devices (fine for CIFAR-sized data; :func:`fit` checks that
all processes loaded the same data), builds every global batch of indices itself from
``(seed, epoch)`` and feeds only its slice; the losses' all-gather over ``"batch"`` then
spans processes (gloo on CPU, NCCL on GPU), so mining sees the global batch and the
result equals one process with as many devices (``tests/test_distributed.py``). The
initial state is broadcast from process 0. All processes save and restore the orbax
checkpoints together (the run folder must be on a shared file system); process 0 alone
writes ``config.json`` and ``metrics.jsonl``. :func:`make_embed_fn` returns the full
embeddings on every process.
"""

from __future__ import annotations

import functools
import json
import logging
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmetric import distributed, losses, monitor, sampling
from jaxmetric.augment import augment, normalize
from jaxmetric.config import TrainConfig
from jaxmetric.models import count_params, create_model
from jaxmetric.parallel import varying_axes
from jaxmetric.utils import write_atomic

__all__ = [
    "AXIS",
    "TrainState",
    "create_train_state",
    "epoch_line",
    "fit",
    "make_embed_fn",
    "initial_state",
    "make_loss_fn",
    "restore_state",
    "make_mesh",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "train_step",
]

log = logging.getLogger(__name__)

AXIS = "batch"
"""Name of the data-parallel mesh axis (and of the synchronised-BatchNorm axis)."""

METRICS = ("loss", "active_fraction", "mean_pos_distance", "mean_neg_distance", "grad_norm",
           "param_norm", "lr")
# A run stops when one of these turns NaN/inf (a NaN hidden by the loss's masking would
# still show in the gradient, and an overflow in the update in the parameters).
FINITE_METRICS = {"loss": "the training loss", "grad_norm": "the gradient norm",
                  "param_norm": "the parameter norm"}
# Config fields that may change between a run and its resumption.
RESUMABLE_CHANGES = frozenset({"out", "data_dir", "eval_every", "log_every", "keep_checkpoints",
                               "checkpoint_every"})


class TrainState(train_state.TrainState):
    """flax ``TrainState`` plus BatchNorm running statistics and the lr schedule."""

    batch_stats: Any = None
    schedule: Callable = flax.struct.field(pytree_node=False, default=None)


# ------------------------------------------------------------------------------ setup


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """1-D data-parallel mesh ``("batch",)`` over ``devices``.

    The default is ``jax.devices()``: every device of every process (the local devices
    in a single-process run), ordered by process, so that process ``p`` holds a
    contiguous slice of each global batch.
    """
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("make_mesh needs at least one device")
    return Mesh(np.array(devices), (AXIS,))


def _put(tree, sharding: NamedSharding):
    """``jax.device_put`` that also works when ``sharding`` spans several processes.

    Every process passes the same global host value; each one puts only the slices that
    belong to its own devices (``jax.make_array_from_callback``), so nothing crosses
    processes here and the result is a valid global ``jax.Array``. Arrays that already
    span processes are resharded by ``jax.device_put``. On a single-process mesh this is
    plain ``jax.device_put``.
    """
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)

    def put(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


_AGREED_ERRORS = (FileExistsError, FileNotFoundError, ValueError, RuntimeError)


def _agree(error: BaseException | None) -> None:
    """Raise ``error`` here and an error of the same type on every other process.

    Checks that may fail on one process only (a file system not shared by all of them)
    must fail everywhere, or the others would wait in the next collective until JAX's
    timeouts kill them. A collective itself: every process must call it.
    """
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        code = 0
        if error is not None:
            code = 1 + next((i for i, t in enumerate(_AGREED_ERRORS) if isinstance(error, t)),
                            len(_AGREED_ERRORS) - 1)
        codes = np.asarray(multihost_utils.process_allgather(np.int32(code)))
        if error is None and codes.any():
            first = int(np.flatnonzero(codes)[0])
            raise _AGREED_ERRORS[codes[first] - 1](
                f"process {first} failed a start-up check (see its error message); "
                f"failed processes: {np.flatnonzero(codes).tolist()}")
    if error is not None:
        raise error


def _check_same_data(images: np.ndarray, labels: np.ndarray) -> None:
    """Multi-process: every process must hold the same training set, in the same order."""
    if jax.process_count() == 1:
        return
    import zlib

    from jax.experimental import multihost_utils

    digest = np.array([len(labels) % 2**32, zlib.crc32(np.ascontiguousarray(labels)),
                       zlib.crc32(np.ascontiguousarray(images))], np.uint32)
    digests = np.asarray(multihost_utils.process_allgather(digest))
    if not (digests == digests[:1]).all():
        raise ValueError(
            "the training set differs between processes (size, crc32 of labels, crc32 of "
            f"images per process: {digests.tolist()}): every process must load the same "
            "data in the same order")


def make_loss_fn(config: TrainConfig) -> Callable:
    """``loss_fn(embeddings, labels, *, axis_name) -> (loss, info)`` for ``config``."""
    if config.loss == "contrastive":
        return functools.partial(losses.contrastive_loss, margin=config.loss_margin,
                                 pos_margin=config.pos_margin, power=config.power,
                                 reduction=config.reduction)
    return functools.partial(losses.triplet_loss, margin=config.loss_margin,
                             mining=config.mining or "all", squared=config.squared,
                             reduction=config.reduction)


def make_schedule(config: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """Linear warm-up from 0 to ``config.peak_lr``, then cosine decay to 0."""
    total = config.epochs * steps_per_epoch
    warmup = int(round(config.warmup * steps_per_epoch))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.peak_lr, warmup_steps=warmup,
        decay_steps=max(total, warmup + 1), end_value=0.0)


def decay_mask(params):
    """True for kernels (ndim > 1); BatchNorm scales/biases and biases get no decay."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(config: TrainConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """SGD-Nesterov with coupled (L2) decay, or AdamW with decoupled decay."""
    if config.optimizer == "sgd":
        return optax.chain(
            optax.add_decayed_weights(config.decay, mask=decay_mask),
            optax.sgd(schedule, momentum=config.momentum, nesterov=True))
    return optax.adamw(schedule, b1=config.momentum, weight_decay=config.decay, mask=decay_mask)


def create_train_state(rng: jax.Array, model, config: TrainConfig,
                       steps_per_epoch: int) -> TrainState:
    """Initialise ``model`` on a 32x32x3 input and attach the optimizer."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    # Jitted: un-jitted, flax runs every initialiser op by op (seconds for a ResNet).
    init = jax.jit(functools.partial(model.init, train=False))
    variables = init(rng, jnp.zeros((1, 32, 32, 3), jnp.float32))
    schedule = make_schedule(config, steps_per_epoch)
    return TrainState.create(apply_fn=model.apply, params=variables["params"],
                             batch_stats=variables["batch_stats"],
                             tx=make_optimizer(config, schedule), schedule=schedule)


# ------------------------------------------------------------------------------- step


def _augment_per_example(rng, images, offset, dtype):
    """Crop + flip with a key per example, ``fold_in(rng, offset + i)``."""
    positions = offset + jnp.arange(images.shape[0], dtype=jnp.int32)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, positions)
    return jax.vmap(lambda k, im: augment(k, im[None], dtype=dtype)[0])(keys, images)


def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array, *,
               loss_fn: Callable, axis_name: str | None = None, augment: bool = True,
               dtype=jnp.float32) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step; pure.

    Args:
      state: the model's BatchNorm must be synchronised over ``axis_name``
        (``create_model(..., bn_axis_name=axis_name)``).
      batch: ``{"images": uint8 (B, H, W, C), "labels": int (B,)}``, the local shard.
      rng: PRNG key of this step (same on every device).
      loss_fn: ``(embeddings, labels, *, axis_name) -> (loss, info)``, see
        :func:`make_loss_fn`.
      axis_name: the mesh axis when run inside ``jax.shard_map(..., check_vma=True)``
        (see the module docstring for why that typing is required); None on one device.
      augment: random crop + flip; False = normalise only.
      dtype: dtype of the model input.

    Returns:
      ``(new_state, metrics)``, metrics float32 scalars :data:`METRICS`, equal on
      every device.
    """
    images, labels = batch["images"], batch["labels"]
    if images.ndim != 4 or images.dtype != jnp.uint8:
        raise ValueError(f"batch['images'] must be uint8 (B, H, W, C); got "
                         f"{images.dtype} {images.shape}")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"batch['labels'] must have shape {images.shape[:1]}; got {labels.shape}")
    offset = 0
    if axis_name is not None:
        if axis_name not in varying_axes(images):
            raise ValueError(
                f"train_step(axis_name={axis_name!r}) must run inside jax.shard_map with "
                "check_vma=True and the batch sharded over that axis: without the varying/"
                "invariant typing the gradient cannot be summed over devices correctly")
        offset = jax.lax.axis_index(axis_name) * images.shape[0]
    if augment:
        x = _augment_per_example(rng, images, offset, dtype)
    else:
        x = normalize(images, dtype=dtype)

    def loss_and_aux(params):
        emb, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                      x, train=True, mutable=["batch_stats"])
        loss, info = loss_fn(emb, labels, axis_name=axis_name)
        return loss, (info, updates["batch_stats"])

    (loss, (info, batch_stats)), grads = jax.value_and_grad(loss_and_aux, has_aux=True)(
        state.params)
    if axis_name is not None:
        # Invariant leaves were already summed by JAX; per-device params still vary.
        grads = jax.tree.map(
            lambda g: jax.lax.psum(g, axis_name) if axis_name in varying_axes(g) else g, grads)
        if any(axis_name in varying_axes(s) for s in jax.tree.leaves(batch_stats)):
            raise ValueError(
                f"BatchNorm statistics differ between devices: build the model with "
                f"bn_axis_name={axis_name!r} so they are synchronised over the batch")
    metrics = {
        "loss": loss,
        "active_fraction": info["active_fraction"],
        "mean_pos_distance": info["mean_pos_distance"],
        "mean_neg_distance": info["mean_neg_distance"],
        "grad_norm": optax.tree.norm(grads),
        "lr": jnp.asarray(state.schedule(state.step) if state.schedule else jnp.nan),
    }
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    metrics["param_norm"] = optax.tree.norm(state.params)
    metrics = {k: v.astype(jnp.float32) for k, v in metrics.items()}
    return state, metrics


def make_train_step(loss_fn: Callable, mesh: Mesh, *, augment: bool = True, dtype=jnp.float32):
    """Jitted, data-parallel ``step(state, images, labels, indices, key)``.

    ``images`` (N, H, W, C) uint8 and ``labels`` (N,) are the whole training set,
    replicated on the mesh; ``indices`` int32 (B,) is sharded over ``"batch"``; ``key``
    is the run's training key, folded with ``state.step`` for this step. ``state`` is
    donated. Returns ``(state, metrics)``, both replicated.
    """

    def step(state, images, labels, indices, key):
        batch = {"images": images[indices], "labels": labels[indices]}
        rng = jax.random.fold_in(key, state.step)
        return train_step(state, batch, rng, loss_fn=loss_fn, axis_name=AXIS,
                          augment=augment, dtype=dtype)

    sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P(), P(AXIS), P()),
                            out_specs=(P(), P()), check_vma=True)
    return jax.jit(sharded, donate_argnums=0)


# -------------------------------------------------------------------------- embedding


@functools.lru_cache(maxsize=8)
def _sharded_embed(apply_fn, mesh: Mesh):
    def embed(variables, images):
        x = normalize(images)
        return apply_fn(variables, x, train=False).astype(jnp.float32)

    # Replicated output: every process gets the whole batch of embeddings (an all-gather
    # over the mesh, across processes when it spans several).
    return jax.jit(jax.shard_map(embed, mesh=mesh, in_specs=(P(), P(AXIS)),
                                 out_specs=P(AXIS)),
                   out_shardings=NamedSharding(mesh, P()))


def _mesh_of(tree) -> Mesh | None:
    leaf = jax.tree.leaves(tree)[0]
    sharding = getattr(leaf, "sharding", None)
    return sharding.mesh if isinstance(sharding, NamedSharding) else None


def make_embed_fn(state: TrainState, *, mesh: Mesh | None = None) -> Callable[[Any], np.ndarray]:
    """``embed_fn(images uint8 (B, H, W, C)) -> float32 numpy (B, D)``, eval mode.

    Runs on every device of ``mesh`` (default: the mesh ``state`` lives on, else
    :func:`make_mesh`); a batch is padded to a multiple of the device count by repeating
    its last image, and the padding is dropped. The compiled function is cached per
    model and mesh, so calling this every epoch does not recompile. Use it as
    ``evaluate.embed(make_embed_fn(state), images, batch_size=...)``.

    **Several processes** (a mesh over ``jax.devices()`` of a ``jax.distributed`` job):
    every process must call ``embed_fn`` with the same images at the same time (it is a
    collective); each one puts only its devices' slice of the batch on them, and every
    process gets the full ``(B, D)`` embeddings back, so metrics can be computed on
    process 0 alone.
    """
    mesh = mesh or _mesh_of(state.params) or make_mesh()
    fn = _sharded_embed(state.apply_fn, mesh)
    replicated = NamedSharding(mesh, P())
    variables = _put({"params": state.params, "batch_stats": state.batch_stats}, replicated)
    sharded = NamedSharding(mesh, P(AXIS))

    def embed_fn(images) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.dtype != np.uint8 or len(images) == 0:
            raise ValueError(f"embed_fn expects uint8 images (B, H, W, C) with B >= 1; got "
                             f"{images.dtype} {images.shape}")
        n, pad = len(images), -len(images) % mesh.size
        if pad:
            images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
        out = fn(variables, _put(images, sharded))
        return np.asarray(out.addressable_data(0) if not out.is_fully_addressable
                          else out)[:n]

    return embed_fn


# ------------------------------------------------------------------------------- fit


def _checkpoint_manager(directory: pathlib.Path, keep: int):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager(directory.absolute(), options=options)


def _finalized_epochs(directory: pathlib.Path) -> list[int]:
    """Epochs with a complete checkpoint (orbax's temporary directories excluded)."""
    from orbax.checkpoint import utils as ocp_utils

    return sorted(ocp_utils.checkpoint_steps(directory)) if directory.is_dir() else []


def _restore(manager, epoch: int, state: TrainState, train_key):
    """Restores checkpoint ``epoch`` onto the shapes, dtypes and shardings of the args."""
    import orbax.checkpoint as ocp

    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                            {"state": state, "train_key": train_key})
    restored = manager.restore(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    if restored.meta["epoch"] != epoch:
        raise ValueError(f"checkpoint {epoch} records epoch {restored.meta['epoch']}")
    return restored.state["state"], restored.state["train_key"]


def initial_state(config: TrainConfig, steps_per_epoch: int, mesh: Mesh):
    """Fresh replicated state and training key for ``config`` (deterministic in seed)."""
    model = create_model(config.model, embed_dim=config.embed_dim, dtype=jnp.dtype(config.dtype),
                         stem=config.stem, bn_axis_name=AXIS,
                         weight_init=config.weight_init)
    root = jax.random.key(config.seed)
    state = create_train_state(jax.random.fold_in(root, 0), model, config, steps_per_epoch)
    train_key = jax.random.key_data(jax.random.fold_in(root, 1))
    if mesh.is_multi_process:
        # Every process initialised from the same seed; process 0's values win, so the
        # replicas are bit-identical even if hosts' CPUs round differently.
        from jax.experimental import multihost_utils

        state, train_key = multihost_utils.broadcast_one_to_all((state, train_key))
    return _put((state, train_key), NamedSharding(mesh, P()))


def restore_state(run_dir, *, epoch: int | None = None, mesh: Mesh | None = None):
    """Loads a saved run: ``(config, state, epoch)`` from ``run_dir`` (latest epoch).

    ``run_dir`` is a folder written by :func:`fit` (``config.json`` and
    ``checkpoints/``). Raises ``FileNotFoundError`` naming what is missing. With a mesh
    over several processes (the default in a ``jax.distributed`` job) every process
    must call this; the state comes back replicated over the mesh.
    """
    run_dir = pathlib.Path(run_dir)
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{run_dir} is not a jaxmetric run folder: no config.json")
    config = TrainConfig.from_dict(json.loads(config_file.read_text()))
    epochs = _finalized_epochs(run_dir / "checkpoints")
    if not epochs:
        raise FileNotFoundError(f"{run_dir / 'checkpoints'} holds no complete checkpoint")
    epoch = epochs[-1] if epoch is None else epoch
    if epoch not in epochs:
        raise FileNotFoundError(f"no checkpoint for epoch {epoch} in {run_dir}; have {epochs}")
    mesh = make_mesh() if mesh is None else mesh
    # The schedule only needs a step count; the restored optimizer state carries the rest.
    state, train_key = initial_state(config, 1, mesh)
    manager = _checkpoint_manager(run_dir / "checkpoints", config.keep_checkpoints)
    try:
        state, _ = _restore(manager, epoch, state, train_key)
    finally:
        manager.close()
    return config, state, epoch


def _prepare_run_dir(out_dir: pathlib.Path, config: TrainConfig, resume: bool) -> None:
    """Refuse to overwrite a run; on resume, check the config matches the saved one.

    Every process checks (the same verdict everywhere, see :func:`_agree`); process 0
    alone writes ``config.json``, after all have checked, and the others then check
    that they see it: the run folder must be on a file system shared by all processes.
    """
    error = None
    try:
        _check_run_dir(out_dir, config, resume)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        error = e
    _agree(error)
    if resume:
        return
    config_file = out_dir / "config.json"
    if jax.process_index() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(config_file, json.dumps(config.to_dict(), indent=2) + "\n")
    if jax.process_count() > 1:
        _agree(None)  # barrier: config.json is written
        _agree(None if config_file.is_file() else FileNotFoundError(
            f"process {jax.process_index()} does not see {config_file} written by process "
            "0: the run folder must be on a file system shared by every process"))


def _check_run_dir(out_dir: pathlib.Path, config: TrainConfig, resume: bool) -> None:
    ckpt_dir = out_dir / "checkpoints"
    config_file = out_dir / "config.json"
    if not resume:
        existing = [p.name for p in (config_file, out_dir / "metrics.jsonl", ckpt_dir)
                    if p.exists()]
        if existing:
            raise FileExistsError(
                f"{out_dir} already holds a run ({', '.join(existing)}); pass resume=True "
                "(--resume) to continue it, or choose another output folder")
        return
    if not _finalized_epochs(ckpt_dir):
        raise FileNotFoundError(
            f"resume=True but {ckpt_dir} holds no complete checkpoint; start a fresh run "
            "without resume (into an empty folder)")
    if config_file.exists():
        saved = json.loads(config_file.read_text())
        now = config.to_dict()
        changed = sorted(k for k in set(saved) | set(now)
                         if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
        if changed:
            diffs = "; ".join(f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in changed)
            raise ValueError(f"cannot resume {out_dir} with a different config ({diffs})")


def _truncate_metrics(path: pathlib.Path, epoch: int) -> None:
    """Drop records of epochs after ``epoch`` (trained but never checkpointed)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("epoch", 0) <= epoch]
    if len(kept) != len(lines):
        write_atomic(path, "".join(line + "\n" for line in kept))


def _epoch_indices(config: TrainConfig, labels: np.ndarray, epoch: int) -> np.ndarray:
    rng = np.random.default_rng([config.seed, epoch])
    if config.classes_per_batch is None:
        return sampling.shuffled_batches(rng, len(labels), config.batch_size)
    return sampling.class_balanced_batches(rng, labels, config.batch_size,
                                           config.classes_per_batch)


def epoch_line(record: Mapping[str, Any], epochs: int) -> str:
    """The one line :func:`fit` logs per epoch, from its ``metrics.jsonl`` record."""
    line = (f"epoch {record['epoch']}/{epochs}: loss {record['loss']:.4f}, active "
            f"{record['active_fraction']:.3f}, {record['images_per_second']:,.0f} img/s, "
            f"{record['epoch_seconds']:.1f} s")
    if "precision_at_1" in record:
        line += f" | precision@1 {record['precision_at_1']:.4f} (test vs train)"
    return line


def _check_finite(chunk: Mapping[str, float], epoch: int, step: int,
                  ckpt_dir: pathlib.Path, last: int | None) -> None:
    """Raise ``FloatingPointError`` if a watched metric of a chunk of steps is NaN/inf."""
    bad = [f"{what} became {chunk[k]}" for k, what in FINITE_METRICS.items()
           if not np.isfinite(chunk[k])]
    if bad:
        raise FloatingPointError(
            f"{' and '.join(bad)} in epoch {epoch + 1} (by step {step}); nothing of this "
            "epoch was saved"
            + (f" — the last checkpoint is epoch {last} in {ckpt_dir}" if last else "")
            + ". Lower --lr or check the data.")


def _mean_metrics(chunks: list[dict[str, jax.Array]]) -> dict[str, float]:
    """Fetch stacked step metrics (one host sync) and average; lr is the last value."""
    host = distributed.to_host(chunks)
    out = {k: float(np.mean([m[k] for m in host])) for k in METRICS if k != "lr"}
    out["lr"] = float(host[-1]["lr"])
    return out


def fit(config: TrainConfig, dataset, out_dir=None, *, resume: bool = False,
        eval_hook: Callable[[TrainState, int], Mapping[str, Any]] | None = None,
        mesh: Mesh | None = None, progress: bool = True,
        slow_cpu_hint: str | None = None) -> TrainState:
    """Train ``config.model`` on ``dataset.train``; return the final state.

    Args:
      config: the run's hyper-parameters.
      dataset: a :class:`jaxmetric.data.Dataset` (only ``train`` is used here).
      out_dir: run folder (default ``config.out``): ``config.json``, ``metrics.jsonl``
        (one JSON record per epoch: epoch, step, the :data:`METRICS` means, lr,
        images_per_second, epoch_seconds, plus the hook's keys) and ``checkpoints/``.
      resume: continue from the latest complete checkpoint in ``out_dir`` (at the start
        of the following epoch). Without one this raises ``FileNotFoundError``: a
        resume that silently started over could hide a wrong path. Without ``resume``,
        a folder that already holds a run raises ``FileExistsError``.
      eval_hook: ``hook(state, epoch) -> dict`` called after epochs that are multiples
        of ``config.eval_every`` and after the last one; its dict is merged into the
        epoch's record (e.g. precision@1 from :func:`make_embed_fn`).
      mesh: 1-D ``("batch",)`` mesh to train on (default :func:`make_mesh`: every
        device of every process).
      progress: show a tqdm bar per epoch (on process 0).
      slow_cpu_hint: a shorter command to suggest when the run has no accelerator and
        its estimated training time is long (see :mod:`jaxmetric.monitor`).

    **What it says** (logger ``jaxmetric.train``, on process 0): one setup line at INFO
    (devices, data sizes, parameter count, steps), the estimated training time after
    the first timed steps (a WARNING with ``slow_cpu_hint`` when no accelerator is
    present and the run is long), one line per epoch (loss, active fraction, images/s,
    and precision@1 when the hook measured it), and a WARNING if the embeddings look
    collapsed (:class:`jaxmetric.monitor.CollapseDetector`).

    **Divergence.** When the loss, the gradient norm or the parameter norm of any step
    turns NaN/inf (checked every ``log_every`` steps), ``fit`` raises
    ``FloatingPointError`` naming the quantity and the last good checkpoint; nothing of
    that epoch is saved.

    **Several processes** (after :func:`jaxmetric.distributed.initialize`): every
    process calls ``fit`` with the same config and the same ``dataset`` and a mesh over
    all processes' devices (the default). Each process keeps the whole training set in
    host memory and puts it on its own devices (fine for CIFAR-sized data; checked to be
    identical on all processes), computes every global batch of indices from
    ``(seed, epoch)`` itself and feeds only its devices' slice of it; the losses gather
    the embeddings over the whole mesh, so mining sees the global batch. All processes
    take part in saving and restoring checkpoints (orbax coordinates them: the run
    folder must be on a file system they all share); process 0 alone writes
    ``config.json`` and ``metrics.jsonl`` and shows progress. ``eval_hook`` runs on
    every process (embedding is a collective); compute metrics on process 0 and
    broadcast them if every process needs the record. The returned state is replicated
    over the mesh (read it with :func:`jaxmetric.distributed.to_host`).
    """
    from tqdm.auto import tqdm

    out_dir = pathlib.Path(config.out if out_dir is None else out_dir)
    mesh = make_mesh() if mesh is None else mesh
    if mesh.axis_names != (AXIS,):
        raise ValueError(f"mesh must be 1-D with axis {AXIS!r}; got axes {mesh.axis_names}")
    if jax.process_count() > 1 and {d.process_index for d in mesh.devices.flat} != set(
            range(jax.process_count())):
        raise ValueError(f"in a {jax.process_count()}-process run the mesh must hold devices "
                         "of every process: use make_mesh(jax.devices())")
    config.check_devices(mesh.size)
    primary = jax.process_index() == 0
    progress = progress and primary
    train = dataset.train
    steps = sampling.steps_per_epoch(len(train), config.batch_size)
    _check_same_data(train.images, train.labels)
    _prepare_run_dir(out_dir, config, resume)

    dtype = jnp.dtype(config.dtype)
    state, train_key = initial_state(config, steps, mesh)
    replicated = NamedSharding(mesh, P())
    if primary:
        kinds = sorted({d.platform for d in mesh.devices.flat})
        test = getattr(dataset, "test", None)
        log.info("training %s (%s parameters, %s) on %d %s device%s: %s training%s images, "
                 "batch %d, %d steps/epoch x %d epochs", config.model,
                 f"{count_params(state.params):,}", config.dtype, mesh.size, "/".join(kinds),
                 "s" if mesh.size > 1 else "", f"{len(train):,}",
                 f" / {len(test):,} test" if test is not None else "", config.batch_size,
                 steps, config.epochs)
    accelerator = any(d.platform != "cpu" for d in mesh.devices.flat)
    collapse = monitor.CollapseDetector(patience=max(steps, 20))
    timed = min(steps - 1, 10)  # steps timed after the compiling first one

    manager = _checkpoint_manager(out_dir / "checkpoints", config.keep_checkpoints)
    start_epoch = 0
    try:
        import orbax.checkpoint as ocp

        if resume:
            start_epoch = manager.latest_step()
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                seen = np.asarray(multihost_utils.process_allgather(np.int32(start_epoch)))
                if (seen != seen[0]).any():
                    raise RuntimeError(
                        f"processes see different latest checkpoints {seen.tolist()} in "
                        f"{out_dir / 'checkpoints'}: it must be on a shared file system")
            state, train_key = _restore(manager, start_epoch, state, train_key)
            if primary:
                _truncate_metrics(out_dir / "metrics.jsonl", start_epoch)
            log.info("resumed %s at epoch %d (step %d)", out_dir, start_epoch, int(state.step))

        step_fn = make_train_step(make_loss_fn(config), mesh, augment=config.augment,
                                  dtype=dtype)
        # Every process holds the whole training set and puts it on its own devices.
        images = _put(train.images, replicated)
        labels = _put(train.labels, replicated)
        sharded = NamedSharding(mesh, P(AXIS))
        key = jax.random.wrap_key_data(train_key)

        for epoch in range(start_epoch, config.epochs):
            # The same global batches on every process; each feeds its devices' slice.
            indices = _epoch_indices(config, train.labels, epoch)
            bar = tqdm(total=steps * config.batch_size, desc=f"epoch {epoch + 1}/{config.epochs}",
                       unit="img", unit_scale=True, disable=not progress, leave=False)
            start = time.perf_counter()
            pending, done = [], []
            first = epoch == start_epoch
            for i in range(steps):
                state, metrics = step_fn(state, images, labels, _put(indices[i], sharded), key)
                pending.append(metrics)
                bar.update(config.batch_size)
                if first and timed > 0 and i in (0, timed):
                    jax.block_until_ready(metrics)  # once per run: time steps 2..timed+1
                    if i == 0:
                        t0 = time.perf_counter()
                    elif primary:
                        per_step = (time.perf_counter() - t0) / timed
                        left = (config.epochs - epoch) * steps - i - 1
                        log.info(monitor.estimate_line(per_step, left, config.batch_size))
                        warning = monitor.slow_cpu_warning(per_step * left,
                                                           accelerator=accelerator,
                                                           hint=slow_cpu_hint)
                        if warning:
                            log.warning(warning)
                if len(pending) == config.log_every or i == steps - 1:
                    done.append(_mean_metrics(pending) | {"n": len(pending)})
                    pending = []
                    _check_finite(done[-1], epoch, int(state.step), out_dir / "checkpoints",
                                  manager.latest_step())
                    warning = collapse.update(done[-1], done[-1]["n"])
                    if warning and primary:
                        log.warning("epoch %d: %s", epoch + 1, warning)
                    bar.set_postfix(loss=f"{done[-1]['loss']:.4f}",
                                    active=f"{done[-1]['active_fraction']:.3f}")
            seconds = time.perf_counter() - start
            bar.close()

            record = {"epoch": epoch + 1, "step": int(state.step)}
            for k in METRICS:
                if k != "lr":
                    record[k] = sum(d[k] * d["n"] for d in done) / steps
            record |= {"lr": done[-1]["lr"], "images_per_second": steps * config.batch_size / seconds,
                       "epoch_seconds": seconds}
            if eval_hook is not None and ((epoch + 1) % config.eval_every == 0
                                          or epoch + 1 == config.epochs):
                extra = eval_hook(state, epoch + 1)
                if not isinstance(extra, Mapping):
                    raise TypeError(f"eval_hook must return a dict; got {type(extra).__name__}")
                record |= dict(extra)

            meta = {"epoch": epoch + 1, "step": int(state.step)}
            # Every process saves (orbax writes each process's shards and lets process 0
            # write the metadata and finalise the directory).
            if (epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == config.epochs:
                manager.save(epoch + 1, args=ocp.args.Composite(
                    state=ocp.args.StandardSave({"state": state,
                                                 "train_key": jax.random.key_data(key)}),
                    meta=ocp.args.JsonSave(meta)))
            if primary:
                with open(out_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            if primary:
                log.info(epoch_line(record, config.epochs))
    finally:
        manager.wait_until_finished()
        manager.close()
    return state
