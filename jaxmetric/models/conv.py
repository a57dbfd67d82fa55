"""Convolution split along the batch: the same result, faster gradients on CPUs.

A convolution treats the examples of a batch independently, so for a batch cut into
chunks ``x = [x_1; ...; x_K]`` (along the batch axis) and one kernel ``w``

    conv(x, w)       = [conv(x_1, w); ...; conv(x_K, w)]
    d conv / d x     : the chunks' input gradients, side by side
    d conv / d w     = sum_k  d conv(x_k, w) / d w        (the kernel is shared)

:func:`batch_chunked_conv` computes the convolution chunk by chunk and lets autodiff
derive the two gradients above; every value is the unchunked one up to the order of
the float sums over the batch in the kernel gradient.

**Why.** On XLA:CPU (jaxlib 0.10 runs most convolutions in YNNPACK, the input gradients
of strided ones in Eigen) a convolution's time grows faster than its batch once its
operands leave the caches, and the kernel gradient -- a contraction over
``batch x height x width`` -- suffers most. XLA computes it as a convolution that wants
the activations with the batch innermost, so it first copies them into that layout,
often recomputing the BatchNorm and ReLU that made them on the way; over a whole batch
these transposing copies miss the caches. For the 16x16, 32 -> 64 channel 3x3 conv of
the ``homebrew`` network at batch 256, the kernel gradient took 90 ms in one piece and
29 ms as 16 chunks of 16 examples on a 2-core x86 CPU (``benchmarks/cpu/conv_chunks.py``);
in ResNet-18's forward + backward pass at batch 64 the layout copies took 21 % of the
traced time in one piece and 9 % on chunks (``benchmarks/cpu/op_profile.py``).
Chunks of about ``max_chunk_elements`` activation values (2**18, i.e. 1 MiB in float32,
by default) keep the operands cache-sized; smaller layers are left whole. The gain was
measured on CPUs only; GPU and TPU convolution libraries choose their own tiling, so
:func:`default_chunk_elements` turns chunking on for the CPU backend only.

Use it as flax's ``nn.Conv(..., conv_general_dilated=conv_fn(2**18))``; the models take
it through ``conv_chunk_elements`` (:mod:`jaxmetric.models`).
"""

from __future__ import annotations

from functools import partial

import jax
import numpy as np
from jax import lax

DEFAULT_CHUNK_ELEMENTS = 2**18
# At most this many chunks per convolution: each chunk is one more convolution (and two
# more in the gradient) in the compiled program, so a large batch would otherwise make
# programs that take long to compile.
MAX_CHUNKS = 32


def default_chunk_elements(backend: str | None = None) -> int:
    """The chunk size to use on ``backend`` (default: JAX's default backend):
    :data:`DEFAULT_CHUNK_ELEMENTS` on ``"cpu"``, 0 (no chunking) elsewhere."""
    backend = jax.default_backend() if backend is None else backend
    return DEFAULT_CHUNK_ELEMENTS if backend == "cpu" else 0


def check_chunk_elements(value) -> int:
    """``value`` as a chunk size: an integer >= 0 (0: never chunk)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"conv chunk size must be an integer >= 0 (0: off), got {value!r}")
    return int(value)


def chunk_rows(per_example: int, batch: int, max_chunk_elements: int,
               max_chunks: int = MAX_CHUNKS) -> int:
    """Examples per chunk so that a chunk holds at most ``max_chunk_elements`` values of
    its largest operand (``per_example`` values per example), but no more than
    ``max_chunks`` chunks; at least 1, at most ``batch``; ``batch`` when
    ``max_chunk_elements`` is 0."""
    if max_chunk_elements <= 0:
        return batch
    rows = max(1, max_chunk_elements // max(per_example, 1), -(-batch // max_chunks))
    return int(min(batch, rows))


def batch_chunked_conv(lhs, rhs, window_strides, padding, lhs_dilation=None,
                       rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                       batch_group_count=1, precision=None, preferred_element_type=None, *,
                       max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
    """``lax.conv_general_dilated`` (same arguments, same result) computed on chunks of the
    batch of at most ``max_chunk_elements`` values of the input or the output each.

    With ``batch_group_count > 1`` (which mixes the batch into the feature groups), a
    batch that fits one chunk, or ``max_chunk_elements=0`` it is one plain call.
    """
    conv = partial(lax.conv_general_dilated, rhs=rhs, window_strides=window_strides,
                   padding=padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                   dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
                   batch_group_count=batch_group_count, precision=precision,
                   preferred_element_type=preferred_element_type)
    if batch_group_count != 1 or max_chunk_elements <= 0:
        return conv(lhs)
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    lhs_batch, out_batch = dn.lhs_spec[0], dn.out_spec[0]
    batch = lhs.shape[lhs_batch]
    one = jax.eval_shape(lambda x: conv(x), jax.ShapeDtypeStruct(
        tuple(1 if i == lhs_batch else n for i, n in enumerate(lhs.shape)), lhs.dtype))
    per_example = max(int(np.prod(lhs.shape)) // max(batch, 1), int(np.prod(one.shape)))
    rows = chunk_rows(per_example, batch, max_chunk_elements)
    if rows >= batch:
        return conv(lhs)
    outs = [conv(lax.slice_in_dim(lhs, start, min(start + rows, batch), axis=lhs_batch))
            for start in range(0, batch, rows)]
    return lax.concatenate(outs, out_batch)


def conv_fn(max_chunk_elements: int):
    """A ``conv_general_dilated`` for flax's ``nn.Conv``: :func:`batch_chunked_conv` with
    that chunk size, or ``None`` (flax's default, ``lax.conv_general_dilated``) for 0."""
    max_chunk_elements = check_chunk_elements(max_chunk_elements)
    if max_chunk_elements == 0:
        return None
    return partial(batch_chunked_conv, max_chunk_elements=max_chunk_elements)
