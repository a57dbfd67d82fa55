"""The train step: a pure :func:`train_step` and its data-parallel, jitted wrapper.

**Gradient summation.** The losses all-gather the embeddings and ``psum`` their partial
sums, so on each device the gradient with respect to the replicated params is only
that device's *contribution* to the single-device gradient. Under ``shard_map`` with
``check_vma=True`` (the default, used here) the params are typed device-invariant and
JAX itself inserts the ``psum`` over the axis when transposing their implicit
broadcast: the gradient that comes out is already the full sum, and an explicit
``psum`` would multiply it by the device count. (Measured with JAX 0.10: an extra psum
gives 8x the gradient on 8 devices; ``check_vma=False`` gives per-device values for which
neither psum nor nothing is right; ``pmap`` needs the explicit psum.) :func:`train_step`
therefore sums only gradient leaves whose type still varies over the axis (params that
were passed in per-device), and refuses to run under a mapping without that typing.
``tests/test_train.py`` checks that 8 devices give the 1-device step.

**Augmentation** keys are per example: ``fold_in(rng, position in the global batch)``,
so each image gets its own crop/flip whatever the number of devices, and an N-device
step equals the 1-device step on the concatenated batch, augmentation included. Images
are normalised with the statistics the state carries (``state.inputs``).

**shard_map, not pmap.** Since JAX 0.8 ``pmap`` is implemented on top of
``jax.shard_map``, which the JAX team recommends for new code: it works on a ``Mesh``
with explicit shardings, so the device-resident data set, the sharded indices and the
replicated state are ordinary ``jax.Array`` objects.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxmetric import losses
from jaxmetric.augment import augment as augment_images
from jaxmetric.augment import normalize
from jaxmetric.config import TrainConfig
from jaxmetric.parallel import varying_axes
from jaxmetric.train.mesh import AXIS
from jaxmetric.train.state import TrainState

__all__ = ["METRICS", "make_loss_fn", "make_train_step", "train_step"]

METRICS = ("loss", "active_fraction", "mean_pos_distance", "mean_neg_distance", "grad_norm",
           "param_norm", "lr")
"""The float32 scalars every step returns (means over the global batch)."""


def make_loss_fn(config: TrainConfig) -> Callable:
    """``loss_fn(embeddings, labels, *, axis_name) -> (loss, info)`` for ``config``."""
    if config.loss == "contrastive":
        return functools.partial(losses.contrastive_loss, margin=config.loss_margin,
                                 pos_margin=config.pos_margin, power=config.loss_power,
                                 reduction=config.reduction)
    return functools.partial(losses.triplet_loss, margin=config.loss_margin,
                             mining=config.mining or "all", squared=config.squared,
                             reduction=config.reduction)


def _augment_per_example(rng, images, offset, mean, std, dtype):
    """Crop + flip with a key per example, ``fold_in(rng, offset + i)``."""
    positions = offset + jnp.arange(images.shape[0], dtype=jnp.int32)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, positions)
    return jax.vmap(lambda k, im: augment_images(k, im[None], mean=mean, std=std,
                                                 dtype=dtype)[0])(keys, images)


def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array, *,
               loss_fn: Callable, axis_name: str | None = None, augment: bool = True,
               dtype=jnp.float32, freeze_bn: bool = False,
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step; pure.

    Args:
      state: the model's BatchNorm must be synchronised over ``axis_name``
        (``create_model(..., bn_axis_name=axis_name)``); ``state.inputs`` gives the
        normalisation.
      batch: ``{"images": uint8 (B, H, W, C), "labels": int (B,)}``, the local shard.
      rng: PRNG key of this step (same on every device).
      loss_fn: ``(embeddings, labels, *, axis_name) -> (loss, info)``, see
        :func:`make_loss_fn`.
      axis_name: the mesh axis when run inside ``jax.shard_map(..., check_vma=True)``
        (see the module docstring for why that typing is required); None on one device.
      augment: random crop + flip; False = normalise only.
      dtype: dtype of the model input.
      freeze_bn: BatchNorm in eval mode: it normalises with ``state.batch_stats``,
        which stay as they are (the usual way to fine-tune a pretrained trunk on small
        batches).

    Returns:
      ``(new_state, metrics)``, metrics float32 scalars :data:`METRICS`, equal on
      every device.
    """
    images, labels = batch["images"], batch["labels"]
    if images.ndim != 4 or images.dtype != jnp.uint8:
        raise ValueError(f"batch['images'] must be uint8 (B, H, W, C); got "
                         f"{images.dtype} {images.shape}")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"batch['labels'] must have shape {images.shape[:1]}; got {labels.shape}")
    if state.inputs is None:
        raise ValueError("state.inputs is not set: build the state with create_train_state "
                         "or initial_state, which take the data's InputSpec")
    offset = 0
    if axis_name is not None:
        if axis_name not in varying_axes(images):
            raise ValueError(
                f"train_step(axis_name={axis_name!r}) must run inside jax.shard_map with "
                "check_vma=True and the batch sharded over that axis: without the varying/"
                "invariant typing the gradient cannot be summed over devices correctly")
        offset = jax.lax.axis_index(axis_name) * images.shape[0]
    mean, std = state.inputs.mean, state.inputs.std
    if augment:
        x = _augment_per_example(rng, images, offset, mean, std, dtype)
    else:
        x = normalize(images, mean, std, dtype=dtype)

    def loss_and_aux(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        if freeze_bn:
            emb, batch_stats = state.apply_fn(variables, x, train=False), state.batch_stats
        else:
            emb, updates = state.apply_fn(variables, x, train=True, mutable=["batch_stats"])
            batch_stats = updates["batch_stats"]
        loss, info = loss_fn(emb, labels, axis_name=axis_name)
        return loss, (info, batch_stats)

    (loss, (info, batch_stats)), grads = jax.value_and_grad(loss_and_aux, has_aux=True)(
        state.params)
    if axis_name is not None:
        # Invariant leaves were already summed by JAX; per-device params still vary.
        grads = jax.tree.map(
            lambda g: jax.lax.psum(g, axis_name) if axis_name in varying_axes(g) else g, grads)
        if any(axis_name in varying_axes(s) for s in jax.tree.leaves(batch_stats)):
            raise ValueError(
                f"BatchNorm statistics differ between devices: build the model with "
                f"bn_axis_name={axis_name!r} so they are synchronised over the batch")
    metrics = {
        "loss": loss,
        "active_fraction": info["active_fraction"],
        "mean_pos_distance": info["mean_pos_distance"],
        "mean_neg_distance": info["mean_neg_distance"],
        "grad_norm": optax.tree.norm(grads),
        "lr": jnp.asarray(state.schedule(state.step) if state.schedule else jnp.nan),
    }
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    metrics["param_norm"] = optax.tree.norm(state.params)
    metrics = {k: v.astype(jnp.float32) for k, v in metrics.items()}
    return state, metrics


def make_train_step(loss_fn: Callable, mesh: Mesh, *, augment: bool = True, dtype=jnp.float32,
                    freeze_bn: bool = False):
    """Jitted, data-parallel ``step(state, images, labels, indices, key)``.

    ``images`` (N, H, W, C) uint8 and ``labels`` (N,) are the whole training set,
    replicated on the mesh; ``indices`` int32 (B,) is sharded over ``"batch"``; ``key``
    is the run's training key, folded with ``state.step`` for this step. ``state`` is
    donated. Returns ``(state, metrics)``, both replicated. The training set is put on
    every device once; per step the host only sends the int32 indices of the batch, and
    each device gathers its shard of images and labels itself. ``freeze_bn``: see
    :func:`train_step`.
    """

    def step(state, images, labels, indices, key):
        batch = {"images": images[indices], "labels": labels[indices]}
        rng = jax.random.fold_in(key, state.step)
        return train_step(state, batch, rng, loss_fn=loss_fn, axis_name=AXIS,
                          augment=augment, dtype=dtype, freeze_bn=freeze_bn)

    sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P(), P(AXIS), P()),
                            out_specs=(P(), P()), check_vma=True)
    return jax.jit(sharded, donate_argnums=0)
