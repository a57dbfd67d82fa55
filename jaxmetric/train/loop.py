"""The training loop: :func:`fit` runs epochs of the train step and keeps the records.

Per epoch: the batches of indices (:func:`epoch_indices`, a function of ``(seed,
epoch)``), the jitted step (:mod:`jaxmetric.train.step`), step metrics fetched every
``log_every`` steps and checked for NaN/inf, the evaluation hook, a checkpoint
(:mod:`jaxmetric.train.checkpoints`) and one record in ``metrics.jsonl`` (the folder's
rules: :mod:`jaxmetric.train.rundir`). Cross-process agreement goes through
:mod:`jaxmetric.distributed`.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmetric import distributed
from jaxmetric.losses import registry
from jaxmetric.models import count_params
from jaxmetric.train import monitor, sampling
from jaxmetric.train.checkpoints import (
    checkpoint_manager,
    finalized_epochs,
    restore_latest,
    save_checkpoint,
)
from jaxmetric.train.config import TrainConfig
from jaxmetric.train.mesh import AXIS, available_cores, make_mesh
from jaxmetric.train.objective import check_loss_values, make_loss_fn
from jaxmetric.train.rundir import append_record, prepare_run_dir, truncate_metrics
from jaxmetric.train.state import InputSpec, TrainState, initial_state
from jaxmetric.train.step import METRICS, make_train_step

__all__ = ["FINITE_METRICS", "epoch_indices", "epoch_line", "fit"]

log = logging.getLogger("jaxmetric.train")

FINITE_METRICS = {"loss": "the training loss", "grad_norm": "the gradient norm",
                  "param_norm": "the parameter norm"}
"""A run stops when one of these turns NaN/inf (a NaN hidden by the loss's masking would
still show in the gradient, and an overflow in the update in the parameters)."""


def batch_choice(config: TrainConfig, labels: np.ndarray) -> sampling.BatchChoice:
    """Random or class-balanced batches for this run (``config.classes_per_batch``,
    ``"auto"`` resolved by :func:`jaxmetric.train.sampling.choose_classes_per_batch`)."""
    needs_positives = registry.get(config.loss).pairs
    return sampling.choose_classes_per_batch(labels, config.batch_size,
                                             config.classes_per_batch,
                                             needs_positives=needs_positives)


def epoch_indices(config: TrainConfig, labels: np.ndarray, epoch: int,
                  classes_per_batch: int | None | str = "config") -> np.ndarray:
    """The epoch's batches of indices ``(steps, batch_size)``, from ``(seed, epoch)``
    (``classes_per_batch``: the resolved :func:`batch_choice`, computed when not given)."""
    if classes_per_batch == "config":
        classes_per_batch = batch_choice(config, labels).classes_per_batch
    rng = np.random.default_rng([config.seed, epoch])
    if classes_per_batch is None:
        return sampling.shuffled_batches(rng, len(labels), config.batch_size)
    return sampling.class_balanced_batches(rng, labels, config.batch_size, classes_per_batch)


def epoch_line(record: Mapping[str, Any], epochs: int) -> str:
    """The one line :func:`fit` logs per epoch, from its ``metrics.jsonl`` record."""
    line = (f"epoch {record['epoch']}/{epochs}: loss {record['loss']:.4f}, active "
            f"{record['active_fraction']:.3f}, {record['images_per_second']:,.0f} img/s, "
            f"{record['epoch_seconds']:.1f} s")
    if "precision_at_1" in record:
        line += (f" | precision@1 {record['precision_at_1']:.4f} "
                 f"({record.get('precision_at_1_of', 'test vs train')})")
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


def _log_setup(config, dataset, state, mesh, steps) -> None:
    kinds = sorted({d.platform for d in mesh.devices.flat})
    train, test = dataset.train, getattr(dataset, "test", None)
    cores = ""
    if kinds == ["cpu"]:
        cores = (f" ({available_cores()} cores; the command line's default: one CPU device "
                 "per core, or the largest divisor of the batch below that; --cpu-devices N "
                 "to change)")
    log.info("training %s (%s parameters, %s) on %d %s device%s%s: %s training%s images, "
             "batch %d, %d steps/epoch x %d epochs", config.model,
             f"{count_params(state.params):,}", config.dtype, mesh.size, "/".join(kinds),
             "s" if mesh.size > 1 else "", cores, f"{len(train):,}",
             f" / {len(test):,} test" if test is not None and len(test) else "",
             config.batch_size,
             steps, config.epochs)
    spec = registry.get(config.loss)
    settings = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in config.loss_kwargs.items())
    learned = (f", its {spec.learned} at {config.loss_lr_scale:.4g}x that"
               if spec.learned is not None else "")
    log.info("loss %s(%s%s); %s at peak lr %.4g, weight decay %g%s (what no flag sets: "
             "the loss's training defaults, jaxmetric.losses.registry)", spec.fn.__name__,
             settings, ", the rest its defaults" if settings else "its defaults",
             config.run_optimizer, config.peak_lr, config.decay, learned)


FEW_POSITIVES_WARNING = 0.25
"""Warn when random batches leave more than this fraction of anchors without a positive."""


def _log_batches(choice: sampling.BatchChoice, pairs: bool) -> None:
    log.info("batches: %s", choice.reason)
    without = choice.without_positive
    if choice.classes_per_batch is None and pairs and without > FEW_POSITIVES_WARNING:
        log.warning("%.0f%% of the anchors of a random batch have no positive: the loss "
                    "learns little from them; use class-balanced batches "
                    "(--classes-per-batch auto or P)", 100 * without)


def fit(config: TrainConfig, dataset, out_dir=None, *, resume: bool = False,
        eval_hook: Callable[[TrainState, int], Mapping[str, Any]] | None = None,
        mesh: Mesh | None = None, progress: bool = True,
        slow_cpu_hint: str | None = None, data=None) -> TrainState:
    """Train ``config.model`` on ``dataset.train``; return the final state.

    Args:
      config: the run's hyper-parameters.
      dataset: a :class:`jaxmetric.data.Dataset` (``train`` is trained on; its
        ``image_shape`` and ``normalization`` make the state's
        :class:`~jaxmetric.train.state.InputSpec`).
      out_dir: run folder (default ``config.out``; one of them is needed):
        ``config.json``, ``metrics.jsonl`` (one JSON record per epoch: epoch, step, the
        :data:`~jaxmetric.train.step.METRICS` means, lr, images_per_second,
        epoch_seconds, cpu_seconds -- the process's CPU time in the epoch, all threads:
        on a shared machine images/s depends on the neighbours, CPU seconds per epoch
        do not --, plus the hook's keys) and ``checkpoints/``.
      resume: continue from the newest intact checkpoint in ``out_dir`` (at the start
        of the following epoch; see **Resume** below). A folder with ``config.json`` but
        no checkpoint yet (a run stopped in its first epoch) starts from the beginning,
        saying so; a folder without either raises ``FileNotFoundError``: a resume that
        silently started over could hide a wrong path. Without ``resume``, a folder that
        already holds a run raises ``FileExistsError`` (:mod:`jaxmetric.train.rundir`).
      eval_hook: ``hook(state, epoch) -> dict`` called after epochs that are multiples
        of ``config.eval_every`` and after the last one; its dict is merged into the
        epoch's record (e.g. precision@1 from :func:`make_embed_fn`).
      mesh: 1-D ``("batch",)`` mesh to train on (default :func:`make_mesh`: every
        device of every process).
      progress: show a tqdm bar per epoch (on process 0).
      slow_cpu_hint: a shorter command to suggest when the run has no accelerator and
        its estimated training time is long (see :mod:`jaxmetric.train.monitor`).
      data: the :class:`~jaxmetric.data.DataConfig` that ``dataset`` was loaded from:
        saved in ``config.json`` (so the run can be re-evaluated from its folder) and,
        on resume, checked against the saved one (a different split is refused).

    **What it says** (logger ``jaxmetric.train``, on process 0): one setup line at INFO
    (devices, data sizes, parameter count, steps), the estimated training time after
    the first timed steps (a WARNING with ``slow_cpu_hint`` when no accelerator is
    present and the run is long), one line per epoch (loss, active fraction, images/s,
    and precision@1 when the hook measured it), and a WARNING if the embeddings look
    collapsed (:class:`jaxmetric.train.monitor.CollapseDetector`).

    **Resume.** A resume after a kill at any moment is equivalent to the uninterrupted
    run: the same params, optimizer state and ``metrics.jsonl`` records (timings aside).
    An epoch's record is appended before its checkpoint is written, and resume drops the
    records after the checkpoint it restores (and a torn last line), so the records
    never claim more than what resume restores. The epoch line is logged only once the
    checkpoint of that epoch is final (the write is waited for: it no longer overlaps
    the next epoch) and then ends with ``| checkpoint saved``; a line without it (with
    ``checkpoint_every > 1``) announces an epoch a kill would train again. A damaged
    checkpoint (unreadable, or arrays differing from their recorded sha256; see
    :mod:`jaxmetric.train.checkpoints`) is detected and skipped: the run resumes from
    the newest intact one with a WARNING naming what it skipped and why, and deletes the
    damaged newer ones (their epochs are trained again); with none intact it raises
    :class:`~jaxmetric.train.checkpoints.DamagedCheckpointError`. A full disk while
    saving raises :class:`~jaxmetric.train.checkpoints.DiskFullError` (the epoch and
    the last complete checkpoint named, the partial write removed).

    **Settings the loss refuses** (``loss_options`` values) raise ``ValueError`` before
    anything is written (:func:`~jaxmetric.train.objective.check_loss_values`).

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

    if out_dir is None and config.out is None:
        raise ValueError("fit needs a run folder: pass out_dir or set config.out")
    out_dir = pathlib.Path(config.out if out_dir is None else out_dir)
    mesh = make_mesh() if mesh is None else mesh
    if mesh.axis_names != (AXIS,):
        raise ValueError(f"mesh must be 1-D with axis {AXIS!r}; got axes {mesh.axis_names}")
    distributed.check_mesh_spans_processes(mesh)
    config.check_devices(mesh.size)
    primary = jax.process_index() == 0
    progress = progress and primary
    train = dataset.train
    steps = sampling.steps_per_epoch(len(train), config.batch_size)
    choice = batch_choice(config, train.labels)
    distributed.check_same_data(train.images, train.labels)
    check_loss_values(config)
    ckpt_dir = out_dir / "checkpoints"
    reused = not resume and (out_dir / "config.json").exists()
    prepare_run_dir(out_dir, config, resume, data)
    saved = finalized_epochs(ckpt_dir) if resume else []
    distributed.check_same_value(saved[-1] if saved else 0, f"latest checkpoints in "
                                 f"{ckpt_dir} (it must be on a file system shared by "
                                 "every process)")

    dtype = jnp.dtype(config.dtype)
    # A resumed run takes its weights from the checkpoint, not the pretrained file.
    fresh = dataclasses.replace(config, pretrained=None) if saved else config
    state, train_key = initial_state(fresh, steps, mesh, InputSpec.of(dataset),
                                     num_classes=len(dataset.class_names))
    replicated = NamedSharding(mesh, P())
    if primary:
        _log_setup(config, dataset, state, mesh, steps)
        _log_batches(choice, registry.get(config.loss).pairs)
    accelerator = any(d.platform != "cpu" for d in mesh.devices.flat)
    collapse = monitor.CollapseDetector(patience=max(steps, 20))
    timed = min(steps - 1, 10)  # steps timed after the compiling first one

    manager = checkpoint_manager(ckpt_dir, config.keep_checkpoints)
    start_epoch = 0
    finished = False
    try:
        if saved:
            start_epoch, state, train_key, damaged = restore_latest(manager, state,
                                                                    train_key, saved)
            for epoch in damaged:  # trained again: their steps must be free to save
                manager.delete(epoch)
            if damaged and primary:
                log.warning("deleted the damaged checkpoint%s %s of %s: epochs %d-%d are "
                            "trained again", "s" if len(damaged) > 1 else "",
                            ", ".join(map(str, sorted(damaged))), ckpt_dir,
                            start_epoch + 1, max(damaged))
            if primary:
                truncate_metrics(out_dir / "metrics.jsonl", start_epoch)
            log.info("resumed %s at epoch %d (step %d)", out_dir, start_epoch, int(state.step))
        else:
            if primary:  # a start stopped before its first checkpoint: begin again
                truncate_metrics(out_dir / "metrics.jsonl", 0)
            if resume or reused:
                log.info("%s holds no complete checkpoint yet (the run stopped before its "
                         "first one): starting it from the beginning", out_dir)

        step_fn = make_train_step(make_loss_fn(config), mesh, augment=config.augment,
                                  dtype=dtype, xbm_weight=config.xbm_weight,
                                  freeze_bn=config.freeze_bn, flip=config.flip)
        # Every process holds the whole training set and puts it on its own devices.
        images = distributed.put(train.images, replicated)
        labels = distributed.put(train.labels, replicated)
        sharded = NamedSharding(mesh, P(AXIS))
        key = jax.random.wrap_key_data(train_key)

        for epoch in range(start_epoch, config.epochs):
            # The same global batches on every process; each feeds its devices' slice.
            indices = epoch_indices(config, train.labels, epoch, choice.classes_per_batch)
            bar = tqdm(total=steps * config.batch_size, desc=f"epoch {epoch + 1}/{config.epochs}",
                       unit="img", unit_scale=True, disable=not progress, leave=False)
            start, cpu_start = time.perf_counter(), time.process_time()
            pending, done = [], []
            first = epoch == start_epoch
            for i in range(steps):
                state, metrics = step_fn(state, images, labels,
                                         distributed.put(indices[i], sharded), key)
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
                    _check_finite(done[-1], epoch, int(state.step), ckpt_dir,
                                  manager.latest_step())
                    warning = collapse.update(done[-1], done[-1]["n"])
                    if warning and primary:
                        log.warning("epoch %d: %s", epoch + 1, warning)
                    bar.set_postfix(loss=f"{done[-1]['loss']:.4f}",
                                    active=f"{done[-1]['active_fraction']:.3f}")
            seconds = time.perf_counter() - start
            cpu_seconds = time.process_time() - cpu_start
            bar.close()

            record = {"epoch": epoch + 1, "step": int(state.step)}
            for k in METRICS:
                if k != "lr":
                    record[k] = sum(d[k] * d["n"] for d in done) / steps
            record |= {"lr": done[-1]["lr"],
                       "images_per_second": steps * config.batch_size / seconds,
                       "epoch_seconds": seconds, "cpu_seconds": cpu_seconds}
            if eval_hook is not None and ((epoch + 1) % config.eval_every == 0
                                          or epoch + 1 == config.epochs):
                extra = eval_hook(state, epoch + 1)
                if not isinstance(extra, Mapping):
                    raise TypeError(f"eval_hook must return a dict; got {type(extra).__name__}")
                record |= dict(extra)

            # The record first (resume drops it unless the checkpoint is final), then the
            # checkpoint, waited for, then the line: it announces only what is durable.
            if primary:
                append_record(out_dir / "metrics.jsonl", record)
            checkpointed = ((epoch + 1) % config.checkpoint_every == 0
                            or epoch + 1 == config.epochs)
            if checkpointed:
                save_checkpoint(manager, epoch + 1, state, jax.random.key_data(key),
                                wait=True)
            if primary:
                log.info(epoch_line(record, config.epochs)
                         + (" | checkpoint saved" if checkpointed else ""))
        finished = True
    finally:
        try:
            manager.wait_until_finished()
            manager.close()
        except Exception:
            if finished:  # otherwise the error that stopped the run is the one to see
                raise
    return state
