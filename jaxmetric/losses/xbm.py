r"""Cross-batch memory (XBM): a fixed-size FIFO of past embeddings and labels.

Wang et al. observed that embeddings of a slowly changing network stay comparable
across steps ("slow drift"), so the pairs of a batch can be mined against the last
:math:`M \gg B` embeddings instead of the batch alone: many more (hard) negatives per
step at the cost of one ``(B, M)`` distance matrix, without the ``B³`` of a bigger
batch. The memory is a ring buffer:

.. math::  \text{slots } (p + k) \bmod M \leftarrow (x_k, y_k), \quad k < B,
           \qquad p \leftarrow (p + B) \bmod M

holding detached (``stop_gradient``) float32 embeddings, their labels and a ``valid``
flag per slot (False until the slot is first written). It is a pytree of fixed shapes,
so it lives in the train state, is updated inside the jitted step and is checkpointed
with everything else. A pair-based loss uses it as its reference set::

    loss_b, _ = losses.contrastive_loss(emb, labels)
    loss_m, _ = losses.contrastive_loss(emb, labels, ref_embeddings=memory.embeddings,
                                        ref_labels=memory.labels, ref_valid=memory.valid)
    memory = xbm.enqueue(memory, emb, labels)

The batch term is the ordinary loss; the memory term pairs each anchor with the
embeddings of *earlier* batches only (the memory is read before the batch is written),
so no anchor meets its own detached copy. (Wang et al.'s code writes first and reads
after, then relies on the loss to ignore the zero-distance self pair.) Under
``shard_map`` enqueue the all-gathered global batch: the memory then holds the same
rows on every device, as the reference set of :mod:`jaxmetric.losses.pair_batch` expects.

Reference:
  X. Wang, H. Zhang, W. Huang, M. R. Scott, "Cross-Batch Memory for Embedding
  Learning", CVPR 2020.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from jaxmetric.losses.pair_batch import check_embeddings

__all__ = ["Memory", "enqueue", "init_memory"]


@flax.struct.dataclass
class Memory:
    """The ring buffer: ``embeddings`` float32 (M, D), ``labels`` int32 (M,), ``valid``
    bool (M,) (written slots), ``next`` int32 () the slot the next row goes to."""

    embeddings: jax.Array
    labels: jax.Array
    valid: jax.Array
    next: jax.Array

    @property
    def size(self) -> int:
        return self.labels.shape[0]


def init_memory(size: int, dim: int) -> Memory:
    """An empty memory of ``size`` slots for ``dim``-dimensional embeddings."""
    for name, v in (("size", size), ("dim", dim)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"init_memory: {name} must be an int >= 1; got {v!r}")
    return Memory(embeddings=jnp.zeros((size, dim), jnp.float32),
                  labels=jnp.zeros((size,), jnp.int32),
                  valid=jnp.zeros((size,), bool),
                  next=jnp.zeros((), jnp.int32))


def enqueue(memory: Memory, embeddings, labels, valid=None) -> Memory:
    """Writes the valid rows of ``embeddings (B, D)`` / ``labels (B,)`` into the memory,
    oldest slots first, without gradient; pure.

    Padded rows (``valid`` False) are skipped, not written. With more rows than slots
    only the last ``M`` are kept, as if written one by one.
    """
    embeddings, labels, valid = check_embeddings(embeddings, labels, valid)
    if embeddings.shape[1] != memory.embeddings.shape[1]:
        raise ValueError(f"enqueue: embeddings have dimension {embeddings.shape[1]}, the "
                         f"memory {memory.embeddings.shape[1]}")
    size = memory.size
    embeddings = jax.lax.stop_gradient(embeddings)
    # Rank of each valid row among the valid rows: its offset from `next`.
    rank = jnp.cumsum(valid.astype(jnp.int32)) - 1
    num = jnp.sum(valid, dtype=jnp.int32)
    # Rows older than the last `size` valid ones would be overwritten in the same call.
    keep = valid & (rank >= num - size)
    slot = jnp.where(keep, (memory.next + rank) % size, size)  # `size`: dropped
    return Memory(
        embeddings=memory.embeddings.at[slot].set(embeddings, mode="drop"),
        labels=memory.labels.at[slot].set(labels.astype(jnp.int32), mode="drop"),
        valid=memory.valid.at[slot].set(True, mode="drop"),
        next=(memory.next + num) % size,
    )
