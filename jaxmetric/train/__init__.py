"""Data-parallel metric-learning training: state, step, embedding, checkpoints, ``fit``.

The package, in the order a run uses it (in the spirit of flax's
``examples/imagenet/train.py``):

* :mod:`~jaxmetric.train.mesh` -- :data:`AXIS` and :func:`make_mesh`, the 1-D
  ``"batch"`` mesh over the devices;
* :mod:`~jaxmetric.train.state` -- :class:`TrainState` (params, BatchNorm statistics,
  optax state, the :class:`InputSpec` of the images), :func:`create_train_state`,
  :func:`initial_state`, :func:`make_optimizer` (SGD-Nesterov or AdamW, no decay on
  BatchNorm parameters and biases), :func:`make_schedule` (warm-up + cosine);
* :mod:`~jaxmetric.train.step` -- :func:`train_step`, a pure ``(state, batch, rng) ->
  (state, metrics)``; :func:`make_train_step` wraps it in ``jax.shard_map`` over the
  mesh and ``jax.jit`` (state donated);
* :mod:`~jaxmetric.train.objective` -- :func:`make_loss_fn` (the configured loss),
  :func:`init_loss_params` (its proxies / class weights / margins), their optimizer,
  and when the cross-batch memory's term starts;
* :mod:`~jaxmetric.train.embed` -- :func:`make_embed_fn`, eval-mode embeddings across
  all devices, for :func:`jaxmetric.evaluate.embed`;
* :mod:`~jaxmetric.train.checkpoints` -- orbax checkpoints and :func:`restore_state`;
* :mod:`~jaxmetric.train.rundir` -- the run folder's rules (never overwrite a run,
  resume only the same config);
* :mod:`~jaxmetric.train.loop` -- :func:`fit`: epochs, tqdm, ``metrics.jsonl``,
  checkpoints, resume.

Nothing here assumes a data set: the image shape and normalisation come from the
:class:`~jaxmetric.data.Dataset` (:meth:`InputSpec.of`) and travel with the state.

**Several processes** (multi-host). After :func:`jaxmetric.distributed.initialize` the
default mesh spans ``jax.devices()``, every device of every process, and the same code
runs in every process. Every cross-process call goes through :mod:`jaxmetric.distributed`
(host values become global arrays through :func:`jaxmetric.distributed.put`: each
process puts only its own devices' part). Each process holds the whole training set and
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

from jaxmetric.train.checkpoints import (
    finalized_epochs,
    load_config,
    load_data_config,
    restore_state,
)
from jaxmetric.train.embed import make_embed_fn
from jaxmetric.train.loop import epoch_line, fit
from jaxmetric.train.mesh import AXIS, make_mesh, use_cpu_devices
from jaxmetric.train.objective import check_loss_values, init_loss_params, make_loss_fn
from jaxmetric.train.state import (
    InputSpec,
    TrainState,
    create_train_state,
    initial_state,
    make_optimizer,
    make_schedule,
)
from jaxmetric.train.step import METRICS, make_train_step, train_step

__all__ = [
    "AXIS",
    "METRICS",
    "InputSpec",
    "TrainState",
    "check_loss_values",
    "create_train_state",
    "epoch_line",
    "finalized_epochs",
    "fit",
    "init_loss_params",
    "initial_state",
    "load_config",
    "load_data_config",
    "make_embed_fn",
    "make_loss_fn",
    "make_mesh",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "restore_state",
    "train_step",
    "use_cpu_devices",
]
