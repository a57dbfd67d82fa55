"""What a run trains: :class:`TrainState`, its optimizer and learning-rate schedule.

* :class:`InputSpec` -- what the model needs to know about its input images: their
  shape (for initialisation) and the per-channel statistics that normalise them. It is
  read off the data set (:meth:`InputSpec.of`), travels with the state (so the step and
  the embedding function normalise alike) and is recorded in every checkpoint;
* :func:`make_optimizer` -- SGD-Nesterov with coupled L2 decay, or AdamW with decoupled
  decay; neither decays BatchNorm parameters or biases (:func:`decay_mask`); the trunk
  may learn more slowly than the head (``trunk_lr_multiplier``, :func:`trunk_mask`);
* :func:`make_schedule` -- linear warm-up, then cosine decay to 0;
* :func:`create_train_state` / :func:`initial_state` -- a fresh state (the latter
  deterministic in the seed, identical on every process and replicated over a mesh).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmetric import distributed
from jaxmetric.losses import xbm
from jaxmetric.models import create_model
from jaxmetric.models.pretrained import load_torchvision_resnet
from jaxmetric.train.config import TrainConfig
from jaxmetric.train.mesh import AXIS
from jaxmetric.train.objective import init_loss_params, make_loss_optimizer, xbm_start_step
from jaxmetric.utils import check_choice

CROPS = ("pad", "resized")
"""The ways :class:`InputSpec` cuts model inputs from stored images."""

__all__ = [
    "CROPS",
    "InputSpec",
    "TrainState",
    "create_train_state",
    "decay_mask",
    "initial_state",
    "make_optimizer",
    "make_schedule",
    "trunk_mask",
]


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """Shape and normalisation of a model's input images.

    Attributes:
      shape: ``(H, W, C)`` of one image as the model sees it.
      mean, std: per-channel statistics in [0, 1] units for
        :func:`jaxmetric.train.augment.normalize`.
      crop: how an input is cut from a stored image (:data:`CROPS`): ``"pad"`` -- the
        image is stored at ``shape``; training takes the pad-4 random crop + flip, the
        evaluation the image as is (the CIFAR recipe). ``"resized"`` -- the image is
        stored larger; training takes a random-resized crop of ``shape`` + flip, the
        evaluation the centre crop (the ImageNet recipe, see
        :func:`jaxmetric.train.augment.augment_resized`).
    """

    shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop: str = "pad"

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"InputSpec.shape must be (H, W, C); got {self.shape}")
        channels = self.shape[-1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"InputSpec needs one mean and one std per channel ({channels}); "
                             f"got {self.mean} and {self.std}")
        if min(self.std) <= 0:
            raise ValueError(f"InputSpec.std must be > 0; got {self.std}")
        check_choice("InputSpec.crop", self.crop, CROPS)

    @classmethod
    def of(cls, source) -> InputSpec:
        """The spec of a :class:`jaxmetric.data.Dataset` (its ``image_shape`` and
        ``normalization``; with an ``input_size``, squares of that side cut by the
        ``"resized"`` crops); an :class:`InputSpec` is returned as is."""
        if isinstance(source, InputSpec):
            return source
        mean, std = source.normalization
        size = getattr(source, "input_size", None)
        if size is None:
            return cls(source.image_shape, mean, std)
        return cls((size, size, source.image_shape[-1]), mean, std, crop="resized")

    def to_dict(self) -> dict[str, Any]:
        """The spec as a JSON-ready dict (``shape``, ``mean``, ``std``, ``crop``)."""
        return {"shape": list(self.shape), "mean": list(self.mean), "std": list(self.std),
                "crop": self.crop}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InputSpec:
        """Inverse of :meth:`to_dict`; a record without ``crop`` (an earlier version's)
        is ``"pad"``."""
        return cls(d["shape"], d["mean"], d["std"], d.get("crop", "pad"))


class TrainState(train_state.TrainState):
    """flax ``TrainState`` plus BatchNorm running statistics, the lr schedule, the
    :class:`InputSpec` (static: not saved as arrays, recorded in the checkpoint meta),
    and what the loss keeps: its learned parameters (proxies, class weights, margins;
    :mod:`jaxmetric.train.objective`) with their own optimizer, and the cross-batch
    memory (:mod:`jaxmetric.losses.xbm`) from step ``xbm_start`` on. All are checkpointed."""

    batch_stats: Any = None
    schedule: Callable = flax.struct.field(pytree_node=False, default=None)
    inputs: InputSpec = flax.struct.field(pytree_node=False, default=None)
    loss_params: Any = None
    loss_opt_state: Any = None
    loss_tx: optax.GradientTransformation = flax.struct.field(pytree_node=False, default=None)
    memory: Any = None
    xbm_start: int = flax.struct.field(pytree_node=False, default=0)

    def apply_gradients(self, *, grads, loss_grads=None, **kwargs):
        """One update of the network's params and, given ``loss_grads``, of the loss's."""
        new = super().apply_gradients(grads=grads, **kwargs)
        if loss_grads is None:
            return new
        updates, opt_state = self.loss_tx.update(loss_grads, self.loss_opt_state,
                                                 self.loss_params)
        return new.replace(loss_params=optax.apply_updates(self.loss_params, updates),
                           loss_opt_state=opt_state)


def make_schedule(config: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """Linear warm-up from 0 to ``config.peak_lr``, then cosine decay to 0."""
    total = config.epochs * steps_per_epoch
    warmup = int(round(config.warmup * steps_per_epoch))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.peak_lr, warmup_steps=warmup,
        decay_steps=max(total, warmup + 1), end_value=0.0)


def decay_mask(params):
    """True for kernels (ndim > 1); BatchNorm scales/biases and biases get no decay."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def trunk_mask(params):
    """True for every parameter but the embedding head's (the top-level ``"head"``)."""
    return traverse_util.path_aware_map(lambda path, _: path[0] != "head", params)


def make_optimizer(config: TrainConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """SGD-Nesterov with coupled (L2) decay, or AdamW with decoupled decay.

    With ``config.trunk_lr_multiplier = m != 1`` the trunk's updates are scaled by ``m``
    (:func:`trunk_mask`): the trunk learns at ``m * lr``, the head at ``lr``, and the
    weight decay step of each follows its learning rate, exactly as PyTorch parameter
    groups with ``lr = m * lr`` would (SGD: ``m * lr * (g + wd * p)`` through the momentum
    buffer; AdamW: ``m * lr * (adam + wd * p)``).
    """
    if config.run_optimizer == "sgd":
        tx = optax.chain(
            optax.add_decayed_weights(config.decay, mask=decay_mask),
            optax.sgd(schedule, momentum=config.momentum, nesterov=True))
    else:
        tx = optax.adamw(schedule, b1=config.momentum, weight_decay=config.decay,
                         mask=decay_mask)
    if config.trunk_lr_multiplier != 1.0:
        tx = optax.chain(tx, optax.masked(optax.scale(config.trunk_lr_multiplier), trunk_mask))
    return tx


def create_train_state(rng: jax.Array, model, config: TrainConfig, steps_per_epoch: int,
                       inputs, num_classes: int | None = None) -> TrainState:
    """Initialise ``model`` on one image of ``inputs`` (an :class:`InputSpec` or a data
    set, see :meth:`InputSpec.of`) and attach the optimizer; the loss's parameters (for
    ``num_classes`` classes, where the loss learns some) and the cross-batch memory
    when ``config`` asks for them. With ``config.pretrained`` the trunk then takes the
    torchvision weights of that file (:func:`jaxmetric.models.pretrained.load_torchvision_resnet`);
    the head stays as initialised."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    inputs = InputSpec.of(inputs)
    # Jitted: un-jitted, flax runs every initialiser op by op (seconds for a ResNet).
    init = jax.jit(functools.partial(model.init, train=False))
    variables = init(rng, jnp.zeros((1, *inputs.shape), jnp.float32))
    if config.pretrained is not None:
        variables, _ = load_torchvision_resnet(config.pretrained, model, variables)
    schedule = make_schedule(config, steps_per_epoch)
    loss_params = init_loss_params(config, jax.random.fold_in(rng, 1), num_classes,
                                   config.embed_dim)
    loss_tx = loss_opt_state = memory = None
    if loss_params is not None:
        loss_tx = make_loss_optimizer(config, schedule)
        loss_opt_state = loss_tx.init(loss_params)
    if config.xbm_size is not None:
        memory = xbm.init_memory(config.xbm_size, config.embed_dim)
    return TrainState.create(apply_fn=model.apply, params=variables["params"],
                             batch_stats=variables["batch_stats"],
                             tx=make_optimizer(config, schedule), schedule=schedule,
                             inputs=inputs, loss_params=loss_params,
                             loss_opt_state=loss_opt_state, loss_tx=loss_tx, memory=memory,
                             xbm_start=xbm_start_step(config, steps_per_epoch))


def initial_state(config: TrainConfig, steps_per_epoch: int, mesh: Mesh, inputs,
                  num_classes: int | None = None):
    """Fresh replicated state and training key for ``config`` (deterministic in seed).

    ``inputs``: an :class:`InputSpec` or the data set (:meth:`InputSpec.of`);
    ``num_classes``: for losses that learn per-class parameters. Returns
    ``(state, train_key_data)``, both replicated over ``mesh``.
    """
    model = create_model(config.model, embed_dim=config.embed_dim, dtype=jnp.dtype(config.dtype),
                         stem=config.stem, bn_axis_name=AXIS,
                         weight_init=config.weight_init,
                         conv_chunk_elements=config.conv_chunk_elements)
    root = jax.random.key(config.seed)
    state = create_train_state(jax.random.fold_in(root, 0), model, config, steps_per_epoch,
                               inputs, num_classes)
    train_key = jax.random.key_data(jax.random.fold_in(root, 1))
    if mesh.is_multi_process:
        # Every process initialised from the same seed; process 0's values win.
        state, train_key = distributed.broadcast_from_primary((state, train_key))
    return distributed.put((state, train_key), NamedSharding(mesh, P()))
