"""Where the network's forward + backward pass spends its time under XLA:CPU, op by op.

    python -m benchmarks.cpu.op_profile --model resnet18 --batch-size 64 \\
        --json benchmarks/results/op-profile-cpu-resnet18.json

Jits the gradient of a fixed linear function of the embeddings with respect to the
parameters (the model in train mode, as ``forward_backward`` in
:mod:`benchmarks.cpu.step_parts`), traces ``--reps`` calls with :mod:`jax.profiler` and
sums the trace events of the compiled program's instructions by kind: the HLO instruction
name without its number (``ynn_fusion.47`` -> ``ynn_fusion``). XLA:CPU writes one event
per instruction it runs once ``--xla_cpu_enable_xprof_traceme=true`` is in ``XLA_FLAGS``;
this script adds that flag before JAX starts (other flags there are kept, so the same
command compares XLA settings).

Reading the kinds: ``ynn_fusion`` is a convolution or matrix product run by YNNPACK;
``convolution``/``conv_general_dilated...`` one run by Eigen; ``transpose_copy_fusion``
copies a tensor into another layout (often fused with the element-wise work that makes
it); ``concatenate``/``..._slice_fusion`` come from batch-chunked convolutions
(:mod:`jaxmetric.models.conv`). Times are milliseconds per call summed over XLA's threads, so
two threads busy at once count twice: the shares compare kinds of work, the wall time
per call is reported beside them. Work a library hands to its own thread pool may not be
inside an instruction's event; ``traced_over_wall`` shows how much the events cover.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import statistics
import sys
import tempfile
import time

TRACE_FLAG = "--xla_cpu_enable_xprof_traceme=true"
# ``name = shape opcode(`` at the start of an HLO instruction line
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\(")


def kind(name: str) -> str:
    """An HLO instruction's kind: its name without the ``.N`` number XLA appends."""
    return re.sub(r"(\.\d+)+$", "", name)


def instructions(hlo_text: str) -> dict[str, str]:
    """``{instruction name: its line}`` of every instruction in an HLO module's text."""
    out = {}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if m:
            out[m.group(1)] = line.strip()
    return out


def summarise_events(events, program: dict[str, str], calls: int, wall_ms: float,
                     top: int = 10) -> dict:
    """Sum ``(name, duration_ns)`` trace events of ``calls`` traced calls by kind.

    Only events named after an instruction of ``program`` (see :func:`instructions`)
    count. Returns ms per call by kind (largest first) with each kind's share of the
    traced total, the ``top`` most expensive instructions with their HLO lines, the
    traced total and ``traced_over_wall`` (traced ms per call / ``wall_ms``).
    """
    if calls < 1:
        raise ValueError(f"calls must be >= 1, got {calls}")
    per_name: collections.Counter = collections.Counter()
    for name, duration_ns in events:
        if name in program:
            per_name[name] += duration_ns / 1e6 / calls
    by_kind: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for name, ms in per_name.items():
        by_kind[kind(name)] += ms
        count[kind(name)] += 1
    total = sum(by_kind.values())
    return {
        "wall_ms": wall_ms,
        "traced_ms": total,
        "traced_over_wall": total / wall_ms if wall_ms > 0 else None,
        "kinds": [{"kind": k, "ms": ms, "share": ms / total if total else 0.0,
                   "instructions": count[k]} for k, ms in by_kind.most_common()],
        "top": [{"name": n, "ms": ms, "hlo": program[n][:400]}
                for n, ms in per_name.most_common(top)],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu.op_profile",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("homebrew", "resnet18", "resnet34", "resnet50"),
                   default="resnet18")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--conv-chunk-elements", type=int, metavar="N",
                   help="convolutions on batch chunks of at most N values (0: off; "
                        "default: the backend's, see jaxmetric.models.conv)")
    p.add_argument("--reps", type=int, default=3, help="traced calls (after 2 untraced)")
    p.add_argument("--top", type=int, default=10, help="most expensive instructions to list")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.reps < 1 or args.top < 0:
        p.error("--batch-size and --reps must be >= 1, --top >= 0")
    if "jax" in sys.modules:
        p.error("JAX is already imported: the trace flag must be set before it starts")
    flags = os.environ.get("XLA_FLAGS", "")
    if TRACE_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {TRACE_FLAG}".strip()

    import jax
    import jax.numpy as jnp

    from benchmarks.common import unit_embeddings
    from jaxmetric import models

    if jax.default_backend() != "cpu":
        p.error(f"this profile reads XLA:CPU's per-instruction events, but JAX runs on "
                f"{jax.default_backend()!r}: run it with JAX_PLATFORMS=cpu")
    model = models.create_model(args.model, conv_chunk_elements=args.conv_chunk_elements)
    x = jax.random.normal(jax.random.key(0), (args.batch_size, 32, 32, 3), jnp.float32)
    variables = jax.jit(lambda k, x: model.init(k, x, train=False))(jax.random.key(1), x)
    w = jnp.asarray(unit_embeddings(args.batch_size, seed=3))  # as step_parts' forward_backward

    def scalar(params, batch_stats, x):
        emb, _ = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                             mutable=["batch_stats"])
        return jnp.vdot(emb, w)

    grad = jax.jit(jax.grad(scalar))
    call_args = (variables["params"], variables["batch_stats"], x)
    program = instructions(grad.lower(*call_args).compile().as_text())
    for _ in range(2):
        jax.block_until_ready(grad(*call_args))
    walls = []
    with tempfile.TemporaryDirectory(prefix="op-profile-") as tmp:
        jax.profiler.start_trace(tmp)
        for _ in range(args.reps):
            t = time.perf_counter()
            jax.block_until_ready(grad(*call_args))
            walls.append(1e3 * (time.perf_counter() - t))
        jax.profiler.stop_trace()
        files = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
        if not files:
            raise RuntimeError(f"jax.profiler wrote no trace under {tmp}")
        data = jax.profiler.ProfileData.from_file(files[0])
        events = [(ev.name, ev.duration_ns) for plane in data.planes
                  for line in plane.lines for ev in line.events]
    out = summarise_events(events, program, args.reps, statistics.median(walls), args.top)
    if out["traced_ms"] == 0:
        raise RuntimeError("the trace has no event of the program's instructions: this "
                           "XLA version may not support " + TRACE_FLAG)

    print(f"{args.model}, batch {args.batch_size}, forward + backward: "
          f"{out['wall_ms']:.0f} ms per call (median of {args.reps}); traced "
          f"{out['traced_ms']:.0f} ms summed over threads")
    for row in out["kinds"][:15]:
        print(f"  {row['ms']:8.1f} ms  {100 * row['share']:5.1f} %  "
              f"{row['instructions']:4d} x {row['kind']}")
    for row in out["top"]:
        print(f"  {row['ms']:8.1f} ms  {row['hlo'][:160]}")
    if args.json:
        doc = {"benchmark": "op_profile",
               "command": "python -m benchmarks.cpu.op_profile "
               + " ".join(argv if argv is not None else sys.argv[1:]),
               "xla_flags": os.environ["XLA_FLAGS"], "jax": jax.__version__,
               "devices": [str(d) for d in jax.devices()],
               "settings": {"model": args.model, "batch_size": args.batch_size,
                            "conv_chunk_elements": model.conv_chunk_elements,
                            "reps": args.reps},
               "walls_ms": walls, **out}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
