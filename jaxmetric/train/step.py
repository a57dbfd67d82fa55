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
step equals the 1-device step on the concatenated batch, augmentation included. The
crop (pad-4, or random-resized for images stored larger than the input) and the
normalisation follow what the state carries (``state.inputs``).

**Loss keys.** A loss that draws at random (the margin loss's distance-weighted
sampling) gets ``fold_in(rng, LOSS_KEY_TAG)`` (:data:`LOSS_KEY_TAG`, and the tag minus
one for the memory's term): fresh every step, the same on every device, deterministic
from the run's seed, and apart from the augmentation keys, which fold in positions
below the global batch size. The loss folds in each anchor's global position itself,
so its draws too do not depend on the number of devices.

**shard_map, not pmap.** Since JAX 0.8 ``pmap`` is implemented on top of
``jax.shard_map``, which the JAX team recommends for new code: it works on a ``Mesh``
with explicit shardings, so the device-resident data set, the sharded indices and the
replicated state are ordinary ``jax.Array`` objects.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxmetric.losses import xbm
from jaxmetric.parallel import varying_axes
from jaxmetric.train.augment import augment as augment_images
from jaxmetric.train.augment import augment_resized, center_crop, normalize
from jaxmetric.train.mesh import AXIS
from jaxmetric.train.state import TrainState

__all__ = ["LOSS_KEY_TAG", "METRICS", "eval_view", "make_train_step", "train_step"]

LOSS_KEY_TAG = 2 ** 31 - 1
"""Folded into the step's key for the loss's own key (module docstring)."""

METRICS = ("loss", "active_fraction", "mean_pos_distance", "mean_neg_distance", "grad_norm",
           "param_norm", "lr")
"""The float32 scalars every step returns (means over the global batch)."""


def _augment_per_example(rng, images, offset, inputs, dtype, flip=True):
    """Crop + flip with a key per example, ``fold_in(rng, offset + i)``: the pad-4 crop,
    or the random-resized crop to ``inputs.shape`` (``inputs.crop == "resized"``); no
    flip with ``flip=False`` (the same crops)."""
    positions = offset + jnp.arange(images.shape[0], dtype=jnp.int32)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, positions)
    mean, std = inputs.mean, inputs.std
    if inputs.crop == "resized":
        one = lambda k, im: augment_resized(k, im[None], size=inputs.shape[0],  # noqa: E731
                                            mean=mean, std=std, dtype=dtype, flip=flip)[0]
    else:
        one = lambda k, im: augment_images(k, im[None], mean=mean, std=std,  # noqa: E731
                                           dtype=dtype, flip=flip)[0]
    return jax.vmap(one)(keys, images)


def eval_view(images: jax.Array, inputs) -> jax.Array:
    """The uint8 model inputs of stored images at evaluation (and in training without
    augmentation): the images as they are, or their centre crop for ``"resized"``
    (:class:`~jaxmetric.train.state.InputSpec`)."""
    if inputs.crop == "resized":
        return center_crop(images, inputs.shape[0])
    return images


def _gather_invariant(x, axis_name):
    """All devices' ``x`` concatenated, typed device-invariant (a ``psum`` of each shard
    placed at its offset: ``all_gather``'s result stays typed as varying)."""
    n = jax.lax.psum(1, axis_name)
    local = x.shape[0]
    placed = jax.lax.dynamic_update_slice_in_dim(
        jnp.zeros((n * local, *x.shape[1:]), x.dtype), x,
        jax.lax.axis_index(axis_name) * local, axis=0)
    return jax.lax.psum(placed, axis_name)


def _learned(loss_params):
    return {} if loss_params is None else {"params": loss_params}


def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array, *,
               loss_fn: Callable, axis_name: str | None = None, augment: bool = True,
               flip: bool = True, dtype=jnp.float32, xbm_weight: float = 1.0,
               freeze_bn: bool = False,
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step; pure.

    Args:
      state: the model's BatchNorm must be synchronised over ``axis_name``
        (``create_model(..., bn_axis_name=axis_name)``); ``state.inputs`` gives the
        normalisation.
      batch: ``{"images": uint8 (B, H, W, C), "labels": int (B,)}``, the local shard.
      rng: PRNG key of this step (same on every device).
      loss_fn: ``(embeddings, labels, *, axis_name, key, [params], [ref_embeddings,
        ref_labels, ref_valid]) -> (loss, info)``, see
        :func:`jaxmetric.train.objective.make_loss_fn`; ``params`` is passed when the
        state holds ``loss_params``, the reference set when it holds a memory.
      axis_name: the mesh axis when run inside ``jax.shard_map(..., check_vma=True)``
        (see the module docstring for why that typing is required); None on one device.
      augment: random crop + flip; False = normalise only.
      flip: with ``augment``, mirror a random half of the images; False keeps the crop
        and drops the flip (digits, characters, text: mirroring changes their class).
      dtype: dtype of the model input.
      xbm_weight: weight of the cross-batch memory's loss term (when the state has a
        memory, :mod:`jaxmetric.losses.xbm`): ``loss = loss(batch) + xbm_weight *
        loss(batch vs memory)``, the memory read before this batch is written into it.
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
    if augment:
        x = _augment_per_example(rng, images, offset, state.inputs, dtype, flip)
    else:
        x = normalize(eval_view(images, state.inputs), state.inputs.mean, state.inputs.std,
                      dtype=dtype)

    use_memory = None
    if state.memory is not None:
        # The memory's term counts from step xbm_start on (its rows are still written
        # before that, so it starts full).
        use_memory = state.step >= state.xbm_start

    def loss_and_aux(params, loss_params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        if freeze_bn:
            emb, batch_stats = state.apply_fn(variables, x, train=False), state.batch_stats
        else:
            emb, updates = state.apply_fn(variables, x, train=True, mutable=["batch_stats"])
            batch_stats = updates["batch_stats"]
        loss, info = loss_fn(emb, labels, axis_name=axis_name, **_learned(loss_params),
                             key=jax.random.fold_in(rng, LOSS_KEY_TAG))
        if use_memory is not None:
            mem = state.memory
            mem_loss, _ = loss_fn(emb, labels, axis_name=axis_name, **_learned(loss_params),
                                  key=jax.random.fold_in(rng, LOSS_KEY_TAG - 1),
                                  ref_embeddings=mem.embeddings, ref_labels=mem.labels,
                                  ref_valid=mem.valid & use_memory)
            loss = loss + xbm_weight * mem_loss
        return loss, (info, batch_stats, emb)

    (loss, (info, batch_stats, emb)), (grads, loss_grads) = jax.value_and_grad(
        loss_and_aux, argnums=(0, 1), has_aux=True)(state.params, state.loss_params)
    if axis_name is not None:
        # Invariant leaves were already summed by JAX; per-device params still vary.
        psum_varying = lambda g: (jax.lax.psum(g, axis_name)  # noqa: E731
                                  if axis_name in varying_axes(g) else g)
        grads, loss_grads = jax.tree.map(psum_varying, (grads, loss_grads))
        if any(axis_name in varying_axes(s) for s in jax.tree.leaves(batch_stats)):
            raise ValueError(
                f"BatchNorm statistics differ between devices: build the model with "
                f"bn_axis_name={axis_name!r} so they are synchronised over the batch")
    nan = jnp.float32(jnp.nan)
    metrics = {
        "loss": loss,
        "active_fraction": info.get("active_fraction", nan),
        "mean_pos_distance": info.get("mean_pos_distance", nan),
        "mean_neg_distance": info.get("mean_neg_distance", nan),
        "grad_norm": optax.tree.norm((grads, loss_grads)),
        "lr": jnp.asarray(state.schedule(state.step) if state.schedule else jnp.nan),
    }
    memory = state.memory
    if memory is not None:
        new_rows, new_labels = jax.lax.stop_gradient(emb), labels
        if axis_name is not None:  # the global batch, the same rows on every device
            new_rows, new_labels = (_gather_invariant(a, axis_name)
                                    for a in (new_rows, new_labels))
        memory = xbm.enqueue(memory, new_rows, new_labels)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats, memory=memory,
                                  loss_grads=None if state.loss_params is None else loss_grads)
    metrics["param_norm"] = optax.tree.norm((state.params, state.loss_params))
    metrics = {k: v.astype(jnp.float32) for k, v in metrics.items()}
    return state, metrics


def make_train_step(loss_fn: Callable, mesh: Mesh, *, augment: bool = True, dtype=jnp.float32,
                    xbm_weight: float = 1.0, freeze_bn: bool = False, flip: bool = True):
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
                          augment=augment, dtype=dtype, xbm_weight=xbm_weight,
                          freeze_bn=freeze_bn, flip=flip)

    sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P(), P(AXIS), P()),
                            out_specs=(P(), P()), check_vma=True)
    return jax.jit(sharded, donate_argnums=0)
