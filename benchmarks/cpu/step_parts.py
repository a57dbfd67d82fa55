"""Where a CPU training step's time goes: jaxmetric (XLA:CPU) next to PyTorch + PML.

    python -m benchmarks.cpu.step_parts --model homebrew --batch-size 256 \\
        --json benchmarks/results/step-parts-cpu.json
    python -m benchmarks.cpu.step_parts --model resnet18 --batch-size 128       # slower
    python -m benchmarks.cpu.step_parts --steps 3 --reps 3 --loop-images 1024 \\
        --images 2048 --repeat 1                                           # smoke test

Times the parts of one training step, and the whole step and loop, in jaxmetric and in
a plain PyTorch + pytorch-metric-learning equivalent (the reference pieces of
:mod:`benchmarks.peer_training`, kept in :mod:`benchmarks.common`: its homebrew network,
``TorchAugment``, PML losses and the same SGD setup), so that one sees which parts cost
what and which of them set the floor. Needs the ``peer`` extra. Inputs are random uint8
CIFAR-shaped images (``--images`` of them resident in memory, 10 classes), float32
throughout; every part is timed as the median of ``--reps`` repetitions after warm-up
(and compilation):

* ``forward``: the model in train mode (BatchNorm on batch statistics, running
  statistics updated), jitted; PyTorch eager under ``torch.no_grad()``.
* ``forward_backward``: gradient of a fixed linear function of the embeddings with
  respect to the parameters (no loss), jitted; PyTorch autograd.
* ``augment``: gather the batch from the resident images, then pad-4 random crop,
  random flip and normalisation per example. jaxmetric: the same computation as inside
  ``jaxmetric.train.train_step`` (``jaxmetric.train.augment.augment`` vmapped over examples
  with a key per example, ``fold_in(rng, i)``), jitted on its own; PyTorch:
  ``TorchAugment`` on ``images[idx]``.
* ``loss_triplet`` / ``loss_contrastive``: loss and gradient with respect to
  ``(batch, 128)`` unit embeddings. jaxmetric: :func:`jaxmetric.train.make_loss_fn` of
  the default config (triplet: all triplets, margin 0.2, squared L2; contrastive:
  margin 1.0, squared hinges; reduction "mean"), ``jax.value_and_grad``, jitted.
  PyTorch: PML's ``TripletMarginLoss(margin=0.2, LpDistance(power=2))`` /
  ``ContrastiveLoss()`` with ``MeanReducer`` and ``backward()``.
* ``optimizer``: the optax chain of :func:`jaxmetric.train.make_optimizer` (decay on
  kernels, SGD Nesterov 0.9) applied to the parameter and gradient pytrees, jitted with
  parameters and optimizer state donated; PyTorch ``optimizer.step()``.
* ``step``: the whole train step -- jaxmetric's :func:`jaxmetric.train.make_train_step`
  on a one-device mesh with the data set resident and the batch indices on the device,
  ``--steps`` calls back to back and one sync at the end (repeated three times);
  PyTorch: augment, forward, PML loss, ``zero_grad``, backward, ``step``.
  ``sum_of_parts`` is augment + forward_backward + the ``--loss`` loss + optimizer.
* ``loop``: the whole training loop per step -- :func:`jaxmetric.train.fit` (through
  :func:`benchmarks.common.whole_loop`) for 2 epochs on ``--loop-images`` images,
  the second epoch's images/s from its ``metrics.jsonl``; PyTorch: the loop of
  :mod:`benchmarks.peer_training` (shuffle, steps, ``loss.item()`` per step, the
  learning rate set every step), its second epoch. ``outside_step = 1 - step / loop``
  is the share of the loop spent outside the train step. In both loops the checkpoint
  is written after the epoch's clock stops (orbax writes asynchronously, so part of
  jaxmetric's first save may overlap the second epoch).
* ``checkpoint``: one checkpoint of the train state -- the orbax save
  :func:`jaxmetric.train.fit` does (its ``checkpoint_manager`` and ``save_checkpoint``:
  train state, training key and metadata) until ``wait_until_finished``; PyTorch:
  ``torch.save`` of the model and optimizer ``state_dict`` to a temporary file and
  ``os.replace``.

Each side runs in its own subprocess (``--side``), so JAX and PyTorch never share a
process or its thread pools; the driver alternates them ``--repeat`` times so that slow
phases of the machine hit both. Each run reports, per part, the median of its
repetitions; the table gives, per side and part, the lowest of these medians over the
alternations (the run least disturbed by other work; ``summary``), and the JSON also the
median of all repetitions pooled (``summary_pooled``); ``ratio`` = jaxmetric / PyTorch,
above 1 where jaxmetric is slower. Other work on the machine slows PyTorch far more
than XLA: its OpenMP threads wait for each other at every operator, so while more
threads are runnable than there are cores, even tiny operators take whole scheduler
time slices (times that are multiples of a few milliseconds are the sign). PyTorch
runs eagerly with ``torch.set_num_threads(os.cpu_count())``. The JSON holds every
run's raw times, the environment (versions, CPU, date), the git commit and whether the
working tree had local changes, the command, and each run's load average before and
after it (a load above the core count means other work shared the CPUs). Timings are
only as quiet as the machine: run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import statistics
import sys
import tempfile
import time

from benchmarks.common import (  # stdlib-only at import time: safe for both sides
    CLASSES,
    EMBED_DIM,
    LOSSES,
    MODELS,
    TorchAugment,
    batch_indices,
    environment,
    git_state,
    run_child,
    synthetic_arrays,
    synthetic_dataset,
    torch_checkpoint,
    torch_loss,
    torch_model,
    torch_optimizer,
    unit_embeddings,
    warmup_cosine_lr,
    whole_loop,
    write_json,
)

SIDES = ("jaxmetric", "torch")
LOOP_EPOCHS = 2
STEP_BLOCKS = 3  # the whole step is timed as this many blocks of --steps calls

# (key, label) in table order; times in milliseconds per batch.
PARTS = (
    ("forward", "model forward (train mode)"),
    ("forward_backward", "model forward + backward"),
    ("augment", "gather + crop/flip/normalise"),
    ("loss_triplet", "triplet loss + grad (all, m 0.2, squared L2)"),
    ("loss_contrastive", "contrastive loss + grad (m 1.0)"),
    ("optimizer", "optimizer update (SGD Nesterov + decay)"),
    ("step", "whole train step"),
    ("loop", "whole loop, per step (fit, 2nd epoch)"),
    ("checkpoint", "checkpoint write (model + optimizer)"),
)


# ----------------------------------------------------------------------------- timing


def timed(fn, reps: int, warmup: int = 2) -> list[float]:
    """``fn()`` (which must return only once its work is done) ``warmup`` times, then
    ``reps`` timed calls; milliseconds."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(1e3 * (time.perf_counter() - t0))
    return out


def dir_bytes(path: pathlib.Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ------------------------------------------------------------------------ jaxmetric side


def run_jaxmetric(args) -> dict:
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxmetric import models, train
    from jaxmetric.train.augment import augment, normalize
    from jaxmetric.train.checkpoints import checkpoint_manager, save_checkpoint
    from jaxmetric.train.config import TrainConfig

    if args.jax_cpu_devices:
        train.use_cpu_devices(args.jax_cpu_devices)
    b, reps = args.batch_size, args.reps
    times: dict[str, list[float]] = {}
    config = TrainConfig(model=args.model, dtype="float32", loss=args.loss, batch_size=b,
                         epochs=LOOP_EPOCHS, warmup_epochs=1, out="unused",
                         conv_chunk_elements=args.conv_chunk_elements)
    mesh = train.make_mesh(jax.devices()[:1])
    dataset = synthetic_dataset(args.images)
    steps_per_epoch = args.images // b
    state, train_key = train.initial_state(config, steps_per_epoch, mesh, dataset)
    mean, std = state.inputs.mean, state.inputs.std  # the data's, as train_step uses them
    block = jax.block_until_ready

    # 1. the model alone (the same network without the mesh axis: one device either way)
    model = models.create_model(config.model, embed_dim=config.embed_dim, stem=config.stem,
                                weight_init=config.weight_init,
                                conv_chunk_elements=config.conv_chunk_elements)
    x = normalize(jnp.asarray(dataset.train.images[:b]), mean, std)
    w = jnp.asarray(unit_embeddings(b, seed=3))

    @jax.jit
    def forward(params, batch_stats, x):
        return model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                           mutable=["batch_stats"])

    def scalar(params, batch_stats, x):
        emb, updates = forward(params, batch_stats, x)
        return jnp.vdot(emb, w), updates["batch_stats"]

    forward_backward = jax.jit(jax.grad(scalar, has_aux=True))
    times["forward"] = timed(lambda: block(forward(state.params, state.batch_stats, x)), reps)
    times["forward_backward"] = timed(
        lambda: block(forward_backward(state.params, state.batch_stats, x)), reps)
    grads, _ = forward_backward(state.params, state.batch_stats, x)

    # 2. augmentation as train_step does it (per-example keys), gather included
    replicated = NamedSharding(mesh, P())
    images = jax.device_put(dataset.train.images, replicated)
    labels = jax.device_put(dataset.train.labels, replicated)
    host_idx = batch_indices(args.images, b, max(reps + 2, args.steps + 1))
    idx = [jax.device_put(i, NamedSharding(mesh, P(train.AXIS))) for i in host_idx]

    @jax.jit
    def gather_augment(images, indices, rng):
        batch = images[indices]
        keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, jnp.arange(b, dtype=jnp.int32))
        return jax.vmap(lambda k, im: augment(k, im[None], mean=mean, std=std)[0])(keys, batch)

    rng = jax.random.key(0)
    counter = iter(range(10**9))
    times["augment"] = timed(
        lambda: block(gather_augment(images, idx[next(counter) % len(idx)], rng)), reps)

    # 3. the losses, gradient w.r.t. the embeddings
    emb = jnp.asarray(unit_embeddings(b))
    y = labels[idx[0]]
    for loss in LOSSES:
        loss_fn = train.make_loss_fn(TrainConfig(loss=loss))
        value_and_grad = jax.jit(jax.value_and_grad(
            lambda e, y, loss_fn=loss_fn: loss_fn(e, y, axis_name=None)[0]))
        times[f"loss_{loss}"] = timed(lambda f=value_and_grad: block(f(emb, y)), reps)

    # 4. the optimizer update alone (parameters and optimizer state donated, as in the step)
    tx = train.make_optimizer(config, train.make_schedule(config, steps_per_epoch))

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def update(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt = [jax.tree.map(jnp.copy, state.params), tx.init(state.params)]

    def one_update():
        opt[0], opt[1] = block(update(opt[0], opt[1], grads))

    times["optimizer"] = timed(one_update, reps)

    # 5. the whole jitted train step, back to back, one sync per block; with
    # --jax-cpu-devices on a mesh of every CPU device (the parts above stay on one).
    if args.jax_cpu_devices:
        mesh = train.make_mesh()
        state, train_key = train.initial_state(config, steps_per_epoch, mesh, dataset)
        replicated = NamedSharding(mesh, P())
        images = jax.device_put(dataset.train.images, replicated)
        labels = jax.device_put(dataset.train.labels, replicated)
        idx = [jax.device_put(i, NamedSharding(mesh, P(train.AXIS))) for i in host_idx]
    step_fn = train.make_train_step(train.make_loss_fn(config), mesh, augment=config.augment,
                                    dtype=jnp.dtype(config.dtype))
    key = jax.random.wrap_key_data(train_key)
    state, metrics = step_fn(state, images, labels, idx[0], key)  # compile
    block(metrics)
    times["step"] = []
    for _ in range(STEP_BLOCKS):
        t0 = time.perf_counter()
        for i in range(args.steps):
            state, metrics = step_fn(state, images, labels, idx[1 + i], key)
        block((state, metrics))
        times["step"].append(1e3 * (time.perf_counter() - t0) / args.steps)
    if not np.isfinite(float(metrics["loss"])):
        raise FloatingPointError("the jaxmetric train step produced a non-finite loss")

    # 7. one checkpoint write, with fit's own checkpoint manager and save
    with tempfile.TemporaryDirectory(prefix="step-parts-jax-") as tmp:
        manager = checkpoint_manager(pathlib.Path(tmp) / "checkpoints",
                                     config.keep_checkpoints)
        saved = iter(range(1, 10**9))

        def save():
            save_checkpoint(manager, next(saved), state, train_key)
            manager.wait_until_finished()

        times["checkpoint"] = timed(save, reps, warmup=1)
        checkpoint_bytes = dir_bytes(pathlib.Path(tmp) / "checkpoints" / str(manager.latest_step()))
        manager.close()

    # 6. the whole loop: fit, second epoch
    loop_config = TrainConfig(model=args.model, dtype="float32", loss=args.loss,
                              batch_size=b, epochs=LOOP_EPOCHS, warmup_epochs=1, out="unused")
    loop_ips = whole_loop(loop_config, synthetic_dataset(args.loop_images), mesh)
    times["loop"] = [1e3 * b / loop_ips]

    return {"times_ms": times, "checkpoint_bytes": checkpoint_bytes,
            "param_count": models.count_params({"params": grads}),
            "devices": [str(d) for d in mesh.devices.flat]}


# ---------------------------------------------------------------------------- torch side


def torch_resnet18():
    """ResNet-18 with jaxmetric's CIFAR stem and embedding head, in PyTorch (NCHW)."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1)
            self.relu = nn.ReLU(inplace=True)
            self.proj = None
            if stride != 1 or cin != cout:
                self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1))

        def forward(self, x):
            y = self.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return self.relu(y + (x if self.proj is None else self.proj(x)))

    class ResNet18(nn.Module):
        def __init__(self):
            super().__init__()
            layers = [nn.Conv2d(3, 64, 3, 1, 1, bias=False),
                      nn.BatchNorm2d(64, eps=1e-5, momentum=0.1), nn.ReLU(inplace=True)]
            cin = 64
            for i, width in enumerate((64, 128, 256, 512)):
                for j in range(2):
                    layers.append(Block(cin, width, 2 if i > 0 and j == 0 else 1))
                    cin = width
            self.trunk = nn.Sequential(*layers)
            self.head = nn.Linear(cin, EMBED_DIM)

        def forward(self, x):
            x = self.head(self.trunk(x).mean(dim=(2, 3)))
            return x / x.norm(dim=1, keepdim=True).clamp_min(1e-6)

    return ResNet18()


def run_torch(args) -> dict:
    import torch

    from jaxmetric.data import CIFAR10_MEAN, CIFAR10_STD
    from jaxmetric.train.config import TrainConfig

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    b, reps = args.batch_size, args.reps
    config = TrainConfig(model=args.model, loss=args.loss, batch_size=b, out="unused")
    times: dict[str, list[float]] = {}
    host_images, host_labels = synthetic_arrays(args.images)
    images = torch.from_numpy(host_images)
    labels = torch.from_numpy(host_labels.astype("int64"))
    idx = [torch.from_numpy(i.astype("int64"))
           for i in batch_indices(args.images, b, max(reps + 2, args.steps + 1))]
    generator = torch.Generator().manual_seed(0)
    augment = TorchAugment(generator, CIFAR10_MEAN, CIFAR10_STD)

    def new_model():
        return torch_model("default") if args.model == "homebrew" else torch_resnet18()

    model = new_model().train()
    optimizer = torch_optimizer(model, config.peak_lr, config.decay)
    counter = iter(range(10**9))

    # 1. the model alone
    x = augment.normalize(images[:b])
    w = torch.from_numpy(unit_embeddings(b, seed=3))

    def forward():
        with torch.no_grad():
            model(x)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        (model(x) * w).sum().backward()

    times["forward"] = timed(forward, reps)
    times["forward_backward"] = timed(forward_backward, reps)

    # 2. augmentation, gather included
    times["augment"] = timed(lambda: augment(images[idx[next(counter) % len(idx)]]), reps)

    # 3. the PML losses with backward
    emb = torch.from_numpy(unit_embeddings(b))
    y = labels[idx[0]]
    for loss in LOSSES:
        loss_fn = torch_loss(loss, "mean")

        def loss_grad(loss_fn=loss_fn):
            e = emb.clone().requires_grad_(True)
            loss_fn(e, y).backward()
            return e.grad

        times[f"loss_{loss}"] = timed(loss_grad, reps)

    # 4. the optimizer step alone (on the gradients of forward_backward)
    times["optimizer"] = timed(optimizer.step, reps)

    # 5. the whole step
    loss_fn = torch_loss(args.loss, "mean")

    def step(indices):
        xb = augment(images[indices])
        for group in optimizer.param_groups:
            group["lr"] = config.peak_lr
        loss = loss_fn(model(xb), labels[indices])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    step(idx[0])  # warm-up
    times["step"] = []
    for _ in range(STEP_BLOCKS):
        t0 = time.perf_counter()
        for i in range(args.steps):
            loss = step(idx[1 + i])
        loss = loss.item()
        times["step"].append(1e3 * (time.perf_counter() - t0) / args.steps)

    # 7. one checkpoint write
    with tempfile.TemporaryDirectory(prefix="step-parts-torch-") as tmp:
        path = pathlib.Path(tmp) / "checkpoint.pt"

        def save():
            torch_checkpoint(path, model, optimizer, generator, 1, 1)

        times["checkpoint"] = timed(save, reps, warmup=1)
        checkpoint_bytes = dir_bytes(path)

    # 6. the whole loop (benchmarks.peer_training's, on --loop-images images), 2nd epoch
    loop_images = torch.from_numpy(host_images[:args.loop_images].copy())
    loop_labels = torch.arange(args.loop_images) % CLASSES
    n = len(loop_labels)
    steps = n // b
    model = new_model().train()
    optimizer = torch_optimizer(model, 0.0, config.decay)
    epoch_seconds, global_step = [], 0
    with tempfile.TemporaryDirectory(prefix="step-parts-torch-loop-") as tmp:
        ckpt = pathlib.Path(tmp) / "checkpoint.pt"
        for epoch in range(LOOP_EPOCHS):
            t0 = time.perf_counter()
            order = torch.randperm(n, generator=generator)[: steps * b]
            total = 0.0
            for indices in order.view(steps, b):
                xb = augment(loop_images[indices])
                for group in optimizer.param_groups:
                    group["lr"] = warmup_cosine_lr(global_step, steps_per_epoch=steps,
                                                   epochs=LOOP_EPOCHS, warmup_epochs=1,
                                                   peak=config.peak_lr)
                loss = loss_fn(model(xb), loop_labels[indices])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item()
                global_step += 1
            epoch_seconds.append(time.perf_counter() - t0)
            torch_checkpoint(ckpt, model, optimizer, generator, epoch + 1, global_step)
    times["loop"] = [1e3 * epoch_seconds[-1] / steps]

    return {"times_ms": times, "checkpoint_bytes": checkpoint_bytes,
            "param_count": sum(p.numel() for p in model.parameters()),
            "threads": torch.get_num_threads()}


def run_side(args) -> int:
    t0 = time.perf_counter()
    result = {"side": args.side, "load_average_before": os.getloadavg(),
              "xla_flags": os.environ.get("XLA_FLAGS")}
    result |= run_jaxmetric(args) if args.side == "jaxmetric" else run_torch(args)
    result["wall_seconds"] = time.perf_counter() - t0
    result["load_average_after"] = os.getloadavg()  # 1, 5, 15 min: other work running
    if args.json:
        write_json(args.json, result)
    else:
        print(json.dumps(result, indent=1))
    return 0


# -------------------------------------------------------------------------------- driver


def summarise(runs: list[dict], loss: str, batch: int, pooled: bool = False) -> dict:
    """Per side and part, the lowest over runs of each run's median (``pooled``: the
    median of every repetition of every run); then the derived rows and the ratios."""
    out = {}
    for side in SIDES:
        rs = [r for r in runs if r["side"] == side]
        if not rs:
            continue
        if pooled:
            med = {key: statistics.median([t for r in rs for t in r["times_ms"][key]])
                   for key, _ in PARTS}
        else:
            med = {key: min(statistics.median(r["times_ms"][key]) for r in rs)
                   for key, _ in PARTS}
        med["sum_of_parts"] = (med["augment"] + med["forward_backward"] + med[f"loss_{loss}"]
                               + med["optimizer"])
        med["sum_of_parts_over_step"] = med["sum_of_parts"] / med["step"]
        med["outside_step_fraction_raw"] = 1.0 - med["step"] / med["loop"]  # < 0: noise
        med["outside_step_fraction"] = max(0.0, med["outside_step_fraction_raw"])
        med["step_images_per_second"] = 1e3 * batch / med["step"]
        med["loop_images_per_second"] = 1e3 * batch / med["loop"]
        out[side] = med
    if len(out) == 2:
        out["ratio_jaxmetric_over_torch"] = {
            k: out["jaxmetric"][k] / out["torch"][k] for k in out["jaxmetric"]
            if out["torch"][k]}
    return out


def markdown(summary: dict, loss: str, header: str) -> str:
    j, t = summary.get("jaxmetric", {}), summary.get("torch", {})
    r = summary.get("ratio_jaxmetric_over_torch", {})

    def cell(d, k, fmt=".1f"):
        return format(d[k], fmt) if k in d else "–"

    rows = [(key, label) for key, label in PARTS if key not in ("loop", "checkpoint")]
    lines = [header, "", "| part | jaxmetric ms | torch ms | ratio |", "|---|---|---|---|"]
    for key, label in rows:
        lines.append(f"| {label} | {cell(j, key)} | {cell(t, key)} | {cell(r, key, '.2f')} |")
    lines.append(f"| sum of parts (augment + fwd/bwd + {loss} loss + optimizer) | "
                 f"{cell(j, 'sum_of_parts')} | {cell(t, 'sum_of_parts')} | "
                 f"{cell(r, 'sum_of_parts', '.2f')} |")
    lines.append(f"| sum of parts ÷ whole step | {cell(j, 'sum_of_parts_over_step', '.2f')} | "
                 f"{cell(t, 'sum_of_parts_over_step', '.2f')} | |")
    for key, label in PARTS:
        if key in ("loop", "checkpoint"):
            lines.append(f"| {label} | {cell(j, key)} | {cell(t, key)} | "
                         f"{cell(r, key, '.2f')} |")
    pct = lambda d: f"{100 * d['outside_step_fraction']:.0f} %" if d else "–"  # noqa: E731
    lines.append(f"| outside the step (1 − step/loop) | {pct(j)} | {pct(t)} | |")
    lines.append(f"| whole step, images/s | {cell(j, 'step_images_per_second', '.0f')} | "
                 f"{cell(t, 'step_images_per_second', '.0f')} | "
                 f"{cell(r, 'step_images_per_second', '.2f')} |")
    lines += ["", "Milliseconds per batch: each run's median over its repetitions, the lowest "
              "over the alternations; ratio = jaxmetric / PyTorch (above 1: jaxmetric "
              "slower; for images/s the reverse)."]
    return "\n".join(lines)


def drive(args, argv) -> int:
    command = "python -m benchmarks.cpu.step_parts " + shlex.join(argv)
    doc = {
        "benchmark": "step_parts",
        "command": command,
        "settings": {"model": args.model, "batch_size": args.batch_size, "loss": args.loss,
                     "dtype": "float32", "images": args.images,
                     "loop_images": args.loop_images, "loop_epochs": LOOP_EPOCHS,
                     "steps": args.steps, "step_blocks": STEP_BLOCKS, "reps": args.reps,
                     "repeat": args.repeat, "embed_dim": EMBED_DIM,
                     "torch_loss_reducer": "MeanReducer",
                     "jax_cpu_devices": args.jax_cpu_devices,
                     "conv_chunk_elements": args.conv_chunk_elements},
        "parts": dict(PARTS),
        "git": git_state(),
        "environment": environment(),
        "runs": [],
    }
    out_path = pathlib.Path(args.json) if args.json else None
    failed = []
    with tempfile.TemporaryDirectory(prefix="step-parts-") as tmp:
        for rep in range(args.repeat):
            for side in SIDES:
                run_json = pathlib.Path(tmp) / f"{side}-{rep}.json"
                cmd = [sys.executable, "-m", "benchmarks.cpu.step_parts", "--side", side,
                       "--model", args.model, "--batch-size", str(args.batch_size),
                       "--loss", args.loss, "--images", str(args.images),
                       "--loop-images", str(args.loop_images), "--steps", str(args.steps),
                       "--reps", str(args.reps), "--json", str(run_json)]
                if side == "jaxmetric" and args.jax_cpu_devices:
                    cmd += ["--jax-cpu-devices", str(args.jax_cpu_devices)]
                if side == "jaxmetric" and args.conv_chunk_elements is not None:
                    cmd += ["--conv-chunk-elements", str(args.conv_chunk_elements)]
                print(f"[{rep + 1}/{args.repeat}] {side}", flush=True)
                t0 = time.perf_counter()
                run, error = run_child(cmd, run_json)
                if run is None:
                    failed.append(f"{side} (repeat {rep + 1}): {error}")
                    continue
                run |= {"repeat": rep + 1}
                doc["runs"].append(run)
                print(f"  {side}: step {statistics.median(run['times_ms']['step']):.1f} ms, "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)
    doc["summary"] = summarise(doc["runs"], args.loss, args.batch_size)
    doc["summary_pooled"] = summarise(doc["runs"], args.loss, args.batch_size, pooled=True)
    doc["git_after"] = git_state()
    if out_path is not None and doc["runs"]:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(out_path, doc)
    env = doc["environment"]
    git = doc["git"]
    header = (f"{args.model}, batch {args.batch_size}, float32, {args.loss} loss in the step, "
              f"{env['cpu_count']} CPU cores ({env['cpu']}); jax {env['versions']['jax']}, "
              f"torch {env['versions']['torch']}, PML "
              f"{env['versions']['pytorch-metric-learning']}; commit {git['commit']}"
              + (" (with local changes)" if git["dirty"] else ""))
    loads = [r[k][0] for r in doc["runs"] for k in ("load_average_before", "load_average_after")]
    if loads:
        header += f"; 1-minute load average {min(loads):.1f}–{max(loads):.1f}"
    print()
    print(markdown(doc["summary"], args.loss, header))
    print(f"\ncommand: {command}")
    if out_path is not None and doc["runs"]:
        print(f"wrote {out_path}")
    for f in failed:
        print(f"FAILED: {f}", file=sys.stderr)
    return 1 if failed else 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu.step_parts",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="homebrew")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--loss", choices=LOSSES, default="triplet",
                   help="the loss of the whole step and the loop (both losses are timed "
                   "as parts)")
    p.add_argument("--images", type=int, default=50_000,
                   help="resident training images for the augment part and the step")
    p.add_argument("--loop-images", type=int, default=10_240,
                   help="training images of each of the loop's two epochs")
    p.add_argument("--steps", type=int, default=10,
                   help="train steps per timed block of the whole step")
    p.add_argument("--reps", type=int, default=15, help="timed repetitions of each part")
    p.add_argument("--repeat", type=int, default=2,
                   help="alternations of the two sides (each side a fresh subprocess)")
    p.add_argument("--jax-cpu-devices", type=int, metavar="N",
                   help="jaxmetric's whole step and loop on N CPU devices "
                        "(jaxmetric.train.use_cpu_devices); the parts stay on one")
    p.add_argument("--conv-chunk-elements", type=int, metavar="N",
                   help="jaxmetric's convolutions on batch chunks of at most N values "
                        "(jaxmetric.models.conv; 0: off; default: TrainConfig's, chunked on CPU)")
    p.add_argument("--json", help="write the results here (with --side: that run's)")
    p.add_argument("--side", choices=SIDES, help="(internal) run one side in this process")
    args = p.parse_args(argv)
    if min(args.steps, args.reps, args.repeat) < 1:
        p.error("--steps, --reps and --repeat must be >= 1")
    if args.images < args.batch_size or args.loop_images < args.batch_size:
        p.error("--images and --loop-images must hold at least one batch")
    if args.side:
        return run_side(args)
    return drive(args, argv)


if __name__ == "__main__":
    sys.exit(main())
