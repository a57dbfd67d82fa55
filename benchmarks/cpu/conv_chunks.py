"""One convolution's forward pass, input gradient and kernel gradient, in one piece and
on batch chunks (:func:`jaxmetric.models.conv.batch_chunked_conv`), layer by layer.

    python -m benchmarks.cpu.conv_chunks --model homebrew --batch-size 256 \\
        --json benchmarks/results/conv-chunks-cpu.json

The layers are the 3x3 stride-1 convolutions of the network at the resolution they see
on 32x32 input (``homebrew``: 32-64-128-128 channels at 32, 16, 8, 4 pixels; ``resnet18``:
64-128-256-512 at 32, 16, 8, 4). Each part is jitted on its own; the median of
``--reps`` calls after one warm-up call, in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

LAYERS = {
    "homebrew": [(32, 32, 3, 32), (16, 16, 32, 64), (8, 8, 64, 128), (4, 4, 128, 128)],
    "resnet18": [(32, 32, 64, 64), (16, 16, 128, 128), (8, 8, 256, 256), (4, 4, 512, 512)],
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu.conv_chunks",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(LAYERS), default="homebrew")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4, 8, 16],
                   help="numbers of equal chunks to cut the batch into (1: one piece)")
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if any(c < 1 or args.batch_size % c for c in args.chunks):
        p.error("every --chunks value must be >= 1 and divide --batch-size")

    import jax
    import jax.numpy as jnp
    from jax import lax

    from jaxmetric.models.conv import batch_chunked_conv

    def timed(f, *a):
        jax.block_until_ready(f(*a))
        ts = []
        for _ in range(args.reps):
            t = time.perf_counter()
            jax.block_until_ready(f(*a))
            ts.append(time.perf_counter() - t)
        return 1000 * statistics.median(ts)

    kw = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    rows = []
    for h, w, cin, cout in LAYERS[args.model]:
        n = args.batch_size
        kx, kk, kg = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(kx, (n, h, w, cin), jnp.float32)
        k = jax.random.normal(kk, (3, 3, cin, cout), jnp.float32)
        g = jax.random.normal(kg, (n, h, w, cout), jnp.float32)
        for c in args.chunks:
            per_chunk = (n // c) * h * w * max(cin, cout)
            conv = (lambda x, k: lax.conv_general_dilated(x, k, **kw)) if c == 1 else (
                lambda x, k, m=per_chunk: batch_chunked_conv(x, k, **kw, max_chunk_elements=m))
            fwd = jax.jit(conv)
            dx = jax.jit(lambda x, k, g, f=conv: jax.vjp(lambda x_: f(x_, k), x)[1](g)[0])
            dw = jax.jit(lambda x, k, g, f=conv: jax.vjp(lambda k_: f(x, k_), k)[1](g)[0])
            row = {"layer": [h, w, cin, cout], "batch": n, "chunks": c,
                   "forward_ms": timed(fwd, x, k), "input_grad_ms": timed(dx, x, k, g),
                   "kernel_grad_ms": timed(dw, x, k, g)}
            rows.append(row)
            print(f"{h}x{w} {cin}->{cout}, {c:2d} chunk(s): forward {row['forward_ms']:6.1f}  "
                  f"input grad {row['input_grad_ms']:6.1f}  kernel grad "
                  f"{row['kernel_grad_ms']:6.1f} ms", flush=True)
    if args.json:
        doc = {"benchmark": "conv_chunks",
               "command": "python -m benchmarks.cpu.conv_chunks "
               + " ".join(argv if argv is not None else sys.argv[1:]),
               "jax": jax.__version__, "devices": [str(d) for d in jax.devices()], "rows": rows}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
