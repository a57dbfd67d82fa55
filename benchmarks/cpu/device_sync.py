"""What the cross-device synchronisation of the data-parallel step costs on a CPU.

    python -m benchmarks.cpu.device_sync --model homebrew --batch-size 256 \\
        --json benchmarks/results/device-sync-cpu-homebrew.json

``jaxmetric.train.use_cpu_devices(N)`` splits the CPU into N XLA devices, and the train
step runs one slice of the batch on each. It is one training: BatchNorm's statistics and
the loss see the whole batch, so the devices meet at every BatchNorm layer (forward and
backward), at the loss's all-gather and at the gradient sum, and whichever is ahead waits
for the other there. This benchmark measures how much that waiting costs by running, in
one process with N CPU devices, in turn (``--repeat`` times, each a fresh process):

* ``synchronised``: the train step on the mesh of the N devices, global batch B;
* ``independent``: N separate one-device train steps of B/N examples each, one per device,
  dispatched one after the other every step: N separate trainings doing the same
  arithmetic as the synchronised step. Each compiles to the same program on a mesh of
  one device, collectives included, but those span one device, so nothing waits there.

Reported: milliseconds per B images (steps back to back, one sync at the end), images/s,
and ``cores_busy`` = the process's CPU seconds / wall seconds over the timed steps.
``synchronised / independent`` is the cost of the synchronisation; each run also counts
the collectives in its compiled step (``collectives_per_step``). Random uint8
CIFAR-shaped images resident on the devices; float32; the ``TrainConfig`` defaults
otherwise.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import pathlib
import re
import shlex
import statistics
import sys
import tempfile
import time

from benchmarks.common import (
    LOSSES,
    MODELS,
    batch_indices,
    environment,
    finish_driver,
    git_state,
    run_child,
    synthetic_dataset,
    write_json,
)

MODES = ("synchronised", "independent")
# an HLO instruction line's opcode: ``%name = shape all-reduce(`` (also ``-start`` forms)
COLLECTIVE = re.compile(r" (all-reduce|all-gather|reduce-scatter|all-to-all|"
                        r"collective-permute)(?:-start)?\(")
WARMUP = 3


def run_mode(args) -> dict:
    """Time one mode in this process (JAX not yet started)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxmetric import train
    from jaxmetric.train.config import TrainConfig

    train.use_cpu_devices(args.devices)
    devices = jax.devices()
    meshes = ([train.make_mesh(devices)] if args.mode == "synchronised"
              else [train.make_mesh([d]) for d in devices])
    batch = args.batch_size // len(meshes)
    dataset = synthetic_dataset(args.images)
    config = TrainConfig(model=args.model, dtype="float32", loss=args.loss, batch_size=batch,
                         epochs=2, warmup_epochs=1, out="unused")
    host_idx = batch_indices(args.images, batch, WARMUP + args.steps, seed=2)
    runs = []
    for mesh in meshes:
        state, train_key = train.initial_state(config, args.images // batch, mesh, dataset)
        replicated = NamedSharding(mesh, P())
        runs.append({
            "state": state, "key": jax.random.wrap_key_data(train_key),
            "images": jax.device_put(dataset.train.images, replicated),
            "labels": jax.device_put(dataset.train.labels, replicated),
            "idx": [jax.device_put(i, NamedSharding(mesh, P(train.AXIS))) for i in host_idx],
            "step": train.make_train_step(train.make_loss_fn(config), mesh,
                                          augment=config.augment, dtype=jnp.float32)})

    def steps(first: int, count: int):
        metrics = []
        for i in range(first, first + count):
            metrics = []
            for r in runs:  # dispatched asynchronously: the devices run side by side
                r["state"], m = r["step"](r["state"], r["images"], r["labels"], r["idx"][i],
                                          r["key"])
                metrics.append(m)
        return jax.block_until_ready((metrics, [r["state"] for r in runs]))

    r = runs[0]
    program = r["step"].lower(r["state"], r["images"], r["labels"], r["idx"][0],
                              r["key"]).compile().as_text()
    steps(0, WARMUP)  # compilation and warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    metrics, _ = steps(WARMUP, args.steps)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    losses = [float(m["loss"]) for m in metrics]
    if not all(map(math.isfinite, losses)):
        raise FloatingPointError(f"non-finite loss in the {args.mode} steps: {losses}")
    return {"mode": args.mode, "devices": [str(d) for d in devices], "trainings": len(runs),
            "batch_per_training": batch, "ms_per_batch": 1e3 * wall / args.steps,
            "images_per_second": args.batch_size * args.steps / wall,
            "cores_busy": cpu / wall, "losses": losses,
            "collectives_per_step": collectives(program)}


def collectives(hlo_text: str) -> dict[str, int]:
    """How many cross-device collectives of each kind a compiled HLO program holds."""
    counts = collections.Counter(COLLECTIVE.findall(hlo_text))
    return {kind: counts[kind] for kind in sorted(counts)}


def summarise(runs: list[dict]) -> dict:
    """Per mode the best (lowest) ms per batch over the alternations, its images/s and
    cores busy; ``synchronised_over_independent`` their ratio."""
    out = {}
    for mode in MODES:
        rs = [r for r in runs if r["mode"] == mode]
        if rs:
            best = min(rs, key=lambda r: r["ms_per_batch"])
            out[mode] = {"ms_per_batch": best["ms_per_batch"],
                         "images_per_second": best["images_per_second"],
                         "cores_busy": best["cores_busy"],
                         "ms_per_batch_median": statistics.median(r["ms_per_batch"] for r in rs),
                         "n": len(rs)}
    if len(out) == len(MODES):
        out["synchronised_over_independent"] = (out["synchronised"]["ms_per_batch"]
                                                / out["independent"]["ms_per_batch"])
    return out


def markdown(summary: dict, header: str) -> str:
    lines = [header, "", "| mode | ms per batch (best) | median | images/s | cores busy |",
             "|---|---|---|---|---|"]
    for mode in MODES:
        if mode in summary:
            s = summary[mode]
            lines.append(f"| {mode} | {s['ms_per_batch']:.1f} | {s['ms_per_batch_median']:.1f} "
                         f"| {s['images_per_second']:.0f} | {s['cores_busy']:.2f} |")
    if "synchronised_over_independent" in summary:
        lines.append(f"\nsynchronised ÷ independent: "
                     f"{summary['synchronised_over_independent']:.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu.device_sync",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="homebrew")
    p.add_argument("--batch-size", type=int, default=256, help="the global batch B")
    p.add_argument("--loss", choices=LOSSES, default="contrastive")
    p.add_argument("--devices", type=int, default=os.cpu_count() or 1,
                   help="CPU devices N (default: one per core)")
    p.add_argument("--images", type=int, default=2560, help="resident random images")
    p.add_argument("--steps", type=int, default=40, help="timed steps per run")
    p.add_argument("--repeat", type=int, default=3, help="alternations of the two modes")
    p.add_argument("--json", help="write the results here (with --mode: that run's)")
    p.add_argument("--mode", choices=MODES, help="(internal) run one mode in this process")
    args = p.parse_args(argv)
    if min(args.steps, args.repeat) < 1:
        p.error("--steps and --repeat must be >= 1")
    if args.devices < 2:
        p.error(f"--devices must be >= 2 to have anything to synchronise; got {args.devices}")
    if args.batch_size % args.devices:
        p.error(f"--batch-size {args.batch_size} must divide over --devices {args.devices}")
    if args.images < args.batch_size:
        p.error("--images must hold at least one batch")
    if args.mode:
        result = run_mode(args)
        if args.json:
            write_json(pathlib.Path(args.json), result)
        else:
            print(json.dumps(result, indent=1))
        return 0

    doc = {"benchmark": "device_sync",
           "command": "python -m benchmarks.cpu.device_sync " + shlex.join(argv),
           "options": {k: v for k, v in vars(args).items() if k not in ("json", "mode")},
           "git": git_state(), "environment": environment(), "runs": []}
    failed = []
    with tempfile.TemporaryDirectory(prefix="device-sync-") as tmp:
        for rep in range(args.repeat):
            for mode in MODES:
                out = pathlib.Path(tmp) / f"{mode}-{rep}.json"
                cmd = [sys.executable, "-m", "benchmarks.cpu.device_sync", "--mode", mode,
                       "--json", str(out), "--model", args.model,
                       "--batch-size", str(args.batch_size), "--loss", args.loss,
                       "--devices", str(args.devices), "--images", str(args.images),
                       "--steps", str(args.steps)]
                run, error = run_child(cmd, out)
                if run is None:
                    failed.append(f"{mode} (alternation {rep + 1}): {error}")
                    continue
                run |= {"repeat": rep + 1}
                doc["runs"].append(run)
                print(f"[{rep + 1}/{args.repeat}] {mode}: {run['ms_per_batch']:.1f} ms per "
                      f"batch, {run['cores_busy']:.2f} cores busy", flush=True)
    doc["summary"] = summarise(doc["runs"])
    env = doc["environment"]
    header = (f"{args.model}, batch {args.batch_size}, {args.loss} loss, {args.devices} CPU "
              f"devices on {env['cpu_count']} cores ({env['cpu']}), jax "
              f"{env['versions']['jax']}; commit {doc['git']['commit']}"
              + (" (with local changes)" if doc["git"]["dirty"] else ""))
    return finish_driver(doc, args.json, markdown(doc["summary"], header), failed)


if __name__ == "__main__":
    sys.exit(main())
