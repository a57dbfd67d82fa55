"""jaxmetric's training step under other XLA:CPU settings and JAX versions, side by side.

    python -m benchmarks.cpu.xla_cpu_settings --model homebrew --batch-size 256 \\
        --json benchmarks/results/xla-cpu-settings-homebrew.json
    python -m benchmarks.cpu.xla_cpu_settings --settings default eigen-convolutions \\
        --interpreter jax-0.12=/path/to/py312-venv/bin/python     # another JAX install

Does anything within JAX's reach make the network step faster on a CPU? This runs the
jaxmetric side of :mod:`benchmarks.cpu.step_parts` once per *setting* per alternation,
each in a fresh process, and compares each setting with ``default`` (no extra flags, this
interpreter) from the same run. A setting is

* a set of XLA flags put in ``XLA_FLAGS`` before JAX starts (``--flags NAME=FLAGS`` adds
  one; the built-in ones are in :data:`SETTINGS`, e.g. ``eigen-convolutions`` hands the
  convolutions that jaxlib 0.10 runs in YNNPACK to Eigen instead),
* jaxmetric's own one-piece convolutions (``one-piece-convolutions``: no batch chunks,
  :mod:`jaxmetric.models.conv`), or
* another Python interpreter with another JAX install (``--interpreter NAME=PATH``; it
  imports this working tree's jaxmetric through ``PYTHONPATH`` and needs jax, flax,
  optax, orbax-checkpoint and tqdm).

Reported per setting, from :mod:`benchmarks.cpu.step_parts`' parts:
``forward_backward`` (the network's forward + backward pass on one device), ``step``
(the whole train step on ``--jax-cpu-devices`` devices) and ``loop`` (``fit``'s second
epoch, per step), each the median over repetitions; ``best_ms`` is the lowest over the
alternations, and ``vs_default`` is the setting's time over ``default``'s (below 1:
faster). The settings run in turn inside each alternation, so slow drifts of the machine
hit them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.common import (
    LOSSES,
    MODELS,
    REPO,
    environment,
    finish_driver,
    git_state,
    run_child,
)

# name -> (XLA flags, extra arguments of the step_parts run)
SETTINGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "default": ("", ()),
    "eigen-convolutions": ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
                           ()),
    "eigen-single-thread": ("--xla_cpu_multi_thread_eigen=false", ()),
    "concurrency-scheduler": ("--xla_cpu_enable_concurrency_optimized_scheduler=true", ()),
    "no-fusion-emitters": ("--xla_cpu_use_fusion_emitters=false", ()),
    "one-piece-convolutions": ("", ("--conv-chunk-elements", "0")),
}
PARTS = ("forward_backward", "step", "loop")
VERSION_PROBE = ("import importlib.metadata as m, json, platform; "
                 "print(json.dumps({'python': platform.python_version(), "
                 "**{d: m.version(d) for d in ('jax', 'jaxlib', 'flax')}}))")


def parse_pairs(items: list[str] | None, what: str) -> dict[str, str]:
    """``["NAME=VALUE", ...]`` -> ``{NAME: VALUE}``; a clear error for a bad item."""
    out = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"{what} takes NAME=VALUE; got {item!r}")
        if name in SETTINGS or name in out:
            raise ValueError(f"{what}: the setting name {name!r} is already taken")
        out[name] = value
    return out


def interpreter_versions(python: str) -> dict:
    """The Python and JAX versions of interpreter ``python`` (a clear error if it has none)."""
    try:
        proc = subprocess.run([python, "-c", VERSION_PROBE], capture_output=True, text=True)
    except OSError as e:
        raise ValueError(f"interpreter {python!r} cannot run the benchmark: {e}") from e
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ValueError(f"interpreter {python!r} cannot run the benchmark: {tail}")
    return json.loads(proc.stdout)


def summarise(runs: list[dict]) -> dict:
    """Per setting: the best median per part over the alternations, and the ratio to
    ``default``'s best (``None`` where either is missing)."""
    best: dict[str, dict[str, float]] = {}
    for run in runs:
        row = best.setdefault(run["setting"], {})
        for part in PARTS:
            times = run["times_ms"].get(part)
            if times:
                value = statistics.median(times)
                row[part] = min(value, row.get(part, value))
    base = best.get("default", {})
    return {name: {"best_ms": row,
                   "vs_default": {p: (row[p] / base[p] if p in row and p in base else None)
                                  for p in PARTS}}
            for name, row in best.items()}


def markdown(summary: dict, header: str) -> str:
    lines = [header, "", "| setting | " + " | ".join(f"{p} ms" for p in PARTS)
             + " | " + " | ".join(f"{p} ÷ default" for p in PARTS) + " |",
             "|---" * (1 + 2 * len(PARTS)) + "|"]
    for name, row in summary.items():
        ms = [f"{row['best_ms'][p]:.1f}" if p in row["best_ms"] else "–" for p in PARTS]
        ratio = [f"{row['vs_default'][p]:.2f}" if row["vs_default"][p] else "–"
                 for p in PARTS]
        lines.append(f"| {name} | " + " | ".join(ms + ratio) + " |")
    return "\n".join(lines)


def step_parts_command(python: str, args, extra: tuple[str, ...], out: pathlib.Path):
    cmd = [python, "-m", "benchmarks.cpu.step_parts", "--side", "jaxmetric",
           "--model", args.model, "--batch-size", str(args.batch_size), "--loss", args.loss,
           "--images", str(args.images), "--loop-images", str(args.loop_images),
           "--steps", str(args.steps), "--reps", str(args.reps), "--json", str(out)]
    if args.jax_cpu_devices:
        cmd += ["--jax-cpu-devices", str(args.jax_cpu_devices)]
    return cmd + list(extra)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu.xla_cpu_settings",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), metavar="NAME",
                   help=f"built-in settings to run (default: all: {', '.join(SETTINGS)}); "
                        "'default' always runs")
    p.add_argument("--flags", action="append", metavar="NAME=FLAGS",
                   help="another setting: these XLA flags (repeatable)")
    p.add_argument("--interpreter", action="append", metavar="NAME=PYTHON",
                   help="another setting: this Python interpreter, default flags (repeatable)")
    p.add_argument("--model", choices=MODELS, default="homebrew")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--loss", choices=LOSSES, default="triplet")
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--loop-images", type=int, default=2560)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--repeat", type=int, default=2, help="alternations of the settings")
    p.add_argument("--jax-cpu-devices", type=int, default=2, metavar="N",
                   help="devices of the whole step and loop (0: JAX's default)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    unknown = sorted(set(args.settings) - set(SETTINGS))
    if unknown:
        p.error(f"unknown settings {unknown}; built-in: {', '.join(SETTINGS)}")
    if min(args.steps, args.reps, args.repeat) < 1:
        p.error("--steps, --reps and --repeat must be >= 1")
    if args.images < args.batch_size or args.loop_images < args.batch_size:
        p.error("--images and --loop-images must hold at least one batch")
    try:
        flags = parse_pairs(args.flags, "--flags")
        interpreters = parse_pairs(args.interpreter, "--interpreter")
        if set(flags) & set(interpreters):
            raise ValueError("--flags and --interpreter name the same setting: "
                             f"{sorted(set(flags) & set(interpreters))}")
        versions = {name: interpreter_versions(py) for name, py in interpreters.items()}
    except ValueError as e:
        p.error(str(e))

    # name -> (python, XLA flags, extra step_parts arguments)
    plan = {"default": (sys.executable, "", ())}
    plan |= {n: (sys.executable, *SETTINGS[n]) for n in args.settings if n != "default"}
    plan |= {n: (sys.executable, f, ()) for n, f in flags.items()}
    plan |= {n: (py, "", ()) for n, py in interpreters.items()}
    base_flags = os.environ.get("XLA_FLAGS", "")

    doc = {"benchmark": "xla_cpu_settings",
           "command": "python -m benchmarks.cpu.xla_cpu_settings " + shlex.join(argv),
           "settings": {n: {"python": py, "xla_flags": f, "step_parts_args": list(extra),
                            **({"versions": versions[n]} if n in versions else {})}
                        for n, (py, f, extra) in plan.items()},
           "options": {k: v for k, v in vars(args).items()
                       if k not in ("settings", "flags", "interpreter", "json")},
           "inherited_xla_flags": base_flags or None,
           "git": git_state(), "environment": environment(), "runs": []}
    failed = []
    env_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="xla-cpu-settings-") as tmp:
        for rep in range(args.repeat):
            for name, (python, setting_flags, extra) in plan.items():
                out = pathlib.Path(tmp) / f"{name}-{rep}.json"
                env = dict(os.environ, PYTHONPATH=env_path,
                           XLA_FLAGS=" ".join(filter(None, [base_flags, setting_flags])))
                print(f"[{rep + 1}/{args.repeat}] {name}", flush=True)
                t0 = time.perf_counter()
                run, error = run_child(step_parts_command(python, args, extra, out), out, env)
                if run is None:
                    failed.append(f"{name} (alternation {rep + 1}): {error}")
                    continue
                run |= {"setting": name, "repeat": rep + 1}
                doc["runs"].append(run)
                print(f"  step {statistics.median(run['times_ms']['step']):.1f} ms, "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)
    doc["summary"] = summarise(doc["runs"])
    env = doc["environment"]
    header = (f"{args.model}, batch {args.batch_size}, {args.loss} loss, step and loop on "
              f"{args.jax_cpu_devices or 'the default'} CPU devices, {env['cpu_count']} "
              f"cores ({env['cpu']}); default: jax {env['versions']['jax']}, Python "
              f"{env['python']}; commit {doc['git']['commit']}"
              + (" (with local changes)" if doc["git"]["dirty"] else ""))
    return finish_driver(doc, args.json, markdown(doc["summary"], header), failed)


if __name__ == "__main__":
    sys.exit(main())
