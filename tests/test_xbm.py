"""The cross-batch memory: a FIFO checked against a plain Python deque, and its loss term."""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmetric import losses
from jaxmetric.losses import xbm


def _deque_oracle(size, batches):
    """The memory's rows as a plain FIFO of the valid rows, oldest first."""
    fifo = collections.deque(maxlen=size)
    for emb, labels, valid in batches:
        for e, y, v in zip(emb, labels, valid, strict=True):
            if v:
                fifo.append((tuple(e), int(y)))
    return fifo


def _rows(memory):
    """The memory's valid rows, oldest first (the ring read from `next`)."""
    m = jax.device_get(memory)
    order = [(int(m.next) + k) % len(m.labels) for k in range(len(m.labels))]
    return [(tuple(m.embeddings[k]), int(m.labels[k])) for k in order if m.valid[k]]


@pytest.mark.parametrize("size,batch", [(8, 3), (6, 6), (4, 7)])
def test_enqueue_is_a_fifo(size, batch):
    rng = np.random.default_rng(size * batch)
    memory = xbm.init_memory(size, 2)
    enqueue = jax.jit(xbm.enqueue)
    batches = []
    for step in range(5):
        emb = rng.normal(size=(batch, 2)).astype(np.float32)
        labels = rng.integers(0, 4, batch)
        valid = rng.random(batch) < (1.0 if step % 2 else 0.7)  # some padded rows
        batches.append((emb, labels, valid))
        memory = enqueue(memory, emb, labels, valid)
        assert _rows(memory) == list(_deque_oracle(size, batches))
    assert memory.embeddings.dtype == jnp.float32 and memory.labels.dtype == jnp.int32


def test_enqueue_stops_the_gradient_and_checks_input():
    memory = xbm.init_memory(4, 3)
    emb = jnp.ones((2, 3))

    def f(e):
        m = xbm.enqueue(memory, e, jnp.array([0, 1]))
        return jnp.sum(m.embeddings)

    assert np.all(jax.grad(f)(emb) == 0)
    with pytest.raises(ValueError, match="dimension 2, the memory 3"):
        xbm.enqueue(memory, jnp.ones((2, 2)), jnp.array([0, 1]))
    with pytest.raises(ValueError, match="size must be an int >= 1"):
        xbm.init_memory(0, 3)


def test_memory_term_pairs_each_anchor_with_earlier_rows_only():
    """The loss against the memory equals the loss on [batch; past rows] restricted to
    anchor-past pairs: here checked through the sum reduction and the pair counts."""
    rng = np.random.default_rng(0)
    past = rng.normal(size=(5, 4)).astype(np.float32)
    past_labels = rng.integers(0, 3, 5)
    memory = xbm.enqueue(xbm.init_memory(8, 4), past, past_labels)
    x = rng.normal(size=(6, 4)).astype(np.float32)
    y = rng.integers(0, 3, 6)
    loss_fn = functools.partial(losses.contrastive_loss, reduction="sum")
    loss, info = loss_fn(x, y, ref_embeddings=memory.embeddings, ref_labels=memory.labels,
                         ref_valid=memory.valid)
    expected, _ = loss_fn(x, y, ref_embeddings=past, ref_labels=past_labels)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert info["num_pos_pairs"] + info["num_neg_pairs"] == 6 * 5  # 3 empty slots unused
