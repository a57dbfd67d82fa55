"""Training throughput: the bare train step vs the whole training loop.

    python -m benchmarks.throughput --preset h200     # the GPU recipe (the default)
    python -m benchmarks.throughput --model homebrew --dtype float32 --batch-size 256 \
        --steps 20                                     # CPU

The network, dtype, batch and loss come from a preset of ``experiments/presets.py``
(``--preset``, default ``h200``); ``--model``, ``--dtype``, ``--loss`` and
``--batch-size`` override it. The run length is fixed here (2 short epochs).

Two numbers, on random uint8 images resident on the devices (CIFAR-10 shaped,
``--images`` of them) and every local device:

* ``step_images_per_second``: back-to-back calls of the jitted data-parallel train step
  (augmentation, forward, mining + loss, backward, optimizer update) with the batch
  indices already on the device, one host sync at the end;
* ``loop_images_per_second``: :func:`jaxmetric.train.fit` itself (the second epoch, so
  compilation is excluded): host-side sampling, index transfer, metric fetches every
  ``log_every`` steps, checkpointing.

``outside_step_fraction = 1 - loop / step`` is the share of time the real loop spends
outside the train step (data, metrics, host syncs, checkpoints).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks.common import synthetic_dataset, whole_loop
from experiments.presets import PRESETS
from jaxmetric import train
from jaxmetric.train.config import TrainConfig

RUN_LENGTH_FIELDS = ("epochs", "warmup_epochs", "max_train", "max_test", "eval_every",
                     "checkpoint_every", "data_dir", "out")
"""Preset fields that do not apply to this short measurement on synthetic data."""


def bare_step(config: TrainConfig, dataset, steps: int, mesh) -> float:
    steps_per_epoch = len(dataset.train) // config.batch_size
    state, key = train.initial_state(config, steps_per_epoch, mesh, dataset)
    step_fn = train.make_train_step(train.make_loss_fn(config), mesh, augment=config.augment,
                                    dtype=jnp.dtype(config.dtype))
    replicated = NamedSharding(mesh, P())
    images = jax.device_put(dataset.train.images, replicated)
    labels = jax.device_put(dataset.train.labels, replicated)
    rng = np.random.default_rng(0)
    indices = [jax.device_put(rng.permutation(len(labels))[: config.batch_size].astype(np.int32),
                              NamedSharding(mesh, P(train.AXIS))) for _ in range(steps)]
    key = jax.random.wrap_key_data(key)
    state, metrics = step_fn(state, images, labels, indices[0], key)  # compile
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for i in range(steps):
        state, metrics = step_fn(state, images, labels, indices[i], key)
    jax.block_until_ready((state, metrics))
    return steps * config.batch_size / (time.perf_counter() - start)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="h200",
                   help="the training recipe to measure (experiments/presets.py)")
    p.add_argument("--model", help="override the preset's network")
    p.add_argument("--dtype", help="override the preset's compute dtype")
    p.add_argument("--loss", help="override the preset's loss (drops its mining)")
    p.add_argument("--batch-size", type=int, help="override the preset's batch")
    p.add_argument("--images", type=int, default=50_000)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cpu-devices", type=int, metavar="N",
                   help="split the CPU into N XLA devices (jaxmetric.train.use_cpu_devices)")
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    if args.cpu_devices is not None:
        train.use_cpu_devices(args.cpu_devices)

    dataset = synthetic_dataset(args.images)
    values = {k: v for k, v in PRESETS[args.preset].items() if k not in RUN_LENGTH_FIELDS}
    if args.loss is not None and args.loss != values.get("loss"):
        values |= {"loss": args.loss, "mining": None}
    values |= {k: v for k, v in (("model", args.model), ("dtype", args.dtype),
                                 ("batch_size", args.batch_size)) if v is not None}
    config = TrainConfig(**values, epochs=2, warmup_epochs=1, out="unused")
    args.model, args.dtype, args.loss, args.batch_size = (config.model, config.dtype,
                                                          config.loss, config.batch_size)
    mesh = train.make_mesh()
    step_ips = bare_step(config, dataset, args.steps, mesh)
    loop_ips = whole_loop(config, dataset, mesh)
    result = {
        "model": args.model, "dtype": args.dtype, "loss": args.loss, "mining": config.mining,
        "batch_size": args.batch_size, "devices": [str(d) for d in mesh.devices.flat],
        "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__,
        "step_images_per_second": step_ips, "loop_images_per_second": loop_ips,
        "outside_step_fraction": max(0.0, 1.0 - loop_ips / step_ips),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
