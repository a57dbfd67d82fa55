"""Eval-mode embeddings of a trained state across all devices: :func:`make_embed_fn`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmetric import distributed
from jaxmetric.train.augment import normalize
from jaxmetric.train.mesh import AXIS, make_mesh
from jaxmetric.train.state import InputSpec, TrainState
from jaxmetric.train.step import eval_view

__all__ = ["make_embed_fn"]


@functools.lru_cache(maxsize=8)
def _sharded_embed(apply_fn, mesh: Mesh, inputs: InputSpec):
    def embed(variables, images):
        x = normalize(eval_view(images, inputs), inputs.mean, inputs.std)
        return apply_fn(variables, x, train=False).astype(jnp.float32)

    # Replicated output: every process gets the whole batch of embeddings (an all-gather
    # over the mesh, across processes when it spans several).
    return jax.jit(jax.shard_map(embed, mesh=mesh, in_specs=(P(), P(AXIS)),
                                 out_specs=P(AXIS)),
                   out_shardings=NamedSharding(mesh, P()))


def _mesh_of(tree) -> Mesh | None:
    leaf = jax.tree.leaves(tree)[0]
    sharding = getattr(leaf, "sharding", None)
    return sharding.mesh if isinstance(sharding, NamedSharding) else None


def make_embed_fn(state: TrainState, *, mesh: Mesh | None = None) -> Callable[[Any], np.ndarray]:
    """``embed_fn(images uint8 (B, H, W, C)) -> float32 numpy (B, D)``, eval mode.

    Images are cut (:func:`~jaxmetric.train.step.eval_view`: the centre crop for the
    ``"resized"`` inputs) and normalised as in training (``state.inputs``). Runs on every device of
    ``mesh`` (default: the mesh ``state`` lives on, else :func:`make_mesh`); a batch is
    padded to a multiple of the device count by repeating its last image, and the
    padding is dropped. The compiled function is cached per model and mesh, so calling
    this every epoch does not recompile. Use it as
    ``evaluate.embed(make_embed_fn(state), images, batch_size=...)``.

    **Several processes** (a mesh over ``jax.devices()`` of a ``jax.distributed`` job):
    every process must call ``embed_fn`` with the same images at the same time (it is a
    collective); each one puts only its devices' slice of the batch on them, and every
    process gets the full ``(B, D)`` embeddings back, so metrics can be computed on
    process 0 alone.
    """
    if state.inputs is None:
        raise ValueError("state.inputs is not set: build the state with create_train_state "
                         "or initial_state, which take the data's InputSpec")
    mesh = mesh or _mesh_of(state.params) or make_mesh()
    fn = _sharded_embed(state.apply_fn, mesh, state.inputs)
    replicated = NamedSharding(mesh, P())
    variables = distributed.put({"params": state.params, "batch_stats": state.batch_stats},
                                replicated)
    sharded = NamedSharding(mesh, P(AXIS))

    def embed_fn(images) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.dtype != np.uint8 or len(images) == 0:
            raise ValueError(f"embed_fn expects uint8 images (B, H, W, C) with B >= 1; got "
                             f"{images.dtype} {images.shape}")
        n, pad = len(images), -len(images) % mesh.size
        if pad:
            images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
        out = fn(variables, distributed.put(images, sharded))
        return np.asarray(out.addressable_data(0) if not out.is_fully_addressable
                          else out)[:n]

    return embed_fn
