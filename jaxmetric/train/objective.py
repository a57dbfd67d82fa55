"""What a run minimises: the configured loss, the parameters it learns, its memory.

* :func:`make_loss_fn` -- ``loss_fn(embeddings, labels, *, axis_name=None, params=None,
  key=None, ref_embeddings=None, ref_labels=None, ref_valid=None) -> (loss, info)``: the
  function of ``config.loss`` (:data:`jaxmetric.losses.registry.LOSSES`) with the config's
  keyword arguments (:attr:`~jaxmetric.train.config.TrainConfig.loss_kwargs`); ``params``
  is the loss's own learned argument (:func:`init_loss_params`) for the losses that have
  one, ``key`` the step's PRNG key for the losses that draw at random (the margin loss's
  distance-weighted sampling; ignored by the others);
* :func:`init_loss_params` -- that argument at the start of a run: class proxies
  (Proxy-Anchor, Proxy-NCA), class weights (ArcFace, CosFace, Normalized Softmax;
  ``(C*K, D)`` for Sub-center ArcFace and SoftTriple's ``K`` vectors per class) or the
  per-class boundaries ``beta`` (margin loss); None for the other losses;
* :func:`make_loss_optimizer` -- the optimizer of those parameters: the run's
  optimizer at ``config.loss_lr_scale`` times its learning rate (the proxy papers train
  proxies ~100x faster than the network), without weight decay (proxies and class
  weights are compared by angle, their norm is not a capacity to restrain);
* the cross-batch memory (:mod:`jaxmetric.losses.xbm`) for pair-based losses:
  :func:`xbm_start_step` and the loss on the memory, added by the train step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from jaxmetric.losses import registry
from jaxmetric.losses.margin_softmax import init_weights
from jaxmetric.losses.proxy import init_proxies
from jaxmetric.train.config import TrainConfig

__all__ = ["MARGIN_LOSS_BETA", "check_loss_values", "init_loss_params", "make_loss_fn",
           "make_loss_optimizer", "xbm_start_step"]

MARGIN_LOSS_BETA = 1.2
"""Initial class boundary ``beta`` of the margin loss (Wu et al. 2017)."""


def make_loss_fn(config: TrainConfig) -> Callable:
    """``loss_fn(embeddings, labels, *, axis_name=None, params=None, key=None,
    **reference)``."""
    spec = registry.get(config.loss)
    fn = functools.partial(spec.fn, **config.loss_kwargs)

    def loss_fn(embeddings, labels, *, axis_name=None, params=None, key=None, **reference):
        if spec.key:
            reference = {"key": key, **reference}
        if spec.learned is None:
            if params is not None:
                raise ValueError(f"the {config.loss} loss learns no parameters; got params")
            return fn(embeddings, labels, axis_name=axis_name, **reference)
        if params is None:
            raise ValueError(f"the {config.loss} loss needs its learned {spec.learned} "
                             "(params=, see init_loss_params)")
        return fn(embeddings, labels, params, axis_name=axis_name, **reference)

    return loss_fn


def check_loss_values(config: TrainConfig) -> None:
    """Raise ``ValueError`` with the loss's own message if it refuses its settings.

    The config checks ``loss_options`` by key only (``alpha=-1``, ``gamma=0`` or
    ``distance=manhattan`` pass); the loss checks its values when it is traced. This
    traces it once (``jax.eval_shape``: no computation) on a batch of 4 embeddings of 2
    classes, with learned parameters for 2 classes where it has them.
    """
    loss_fn = make_loss_fn(config)
    emb = jax.ShapeDtypeStruct((4, config.embed_dim), jnp.float32)
    labels = jax.ShapeDtypeStruct((4,), jnp.int32)
    try:
        params = jax.eval_shape(lambda: init_loss_params(config, jax.random.key(0), 2,
                                                         config.embed_dim))
        jax.eval_shape(lambda e, y, p: loss_fn(e, y, params=p, key=jax.random.key(0)),
                       emb, labels, params)
    except (ValueError, TypeError) as e:
        given = f" (loss_options {config.loss_options!r})" if config.loss_options else ""
        raise ValueError(f"the {config.loss} loss refuses its settings{given}: {e}") from None


def init_loss_params(config: TrainConfig, rng: jax.Array, num_classes: int | None,
                     embed_dim: int) -> jax.Array | None:
    """The loss's learned argument at the start of a run, or None.

    * ``"proxies"`` (C, D): :func:`jaxmetric.losses.proxy.init_proxies`, He (fan-out)
      normal as in Kim et al.'s code, for Proxy-Anchor and Proxy-NCA;
    * ``"weights"`` (C, D): :func:`jaxmetric.losses.margin_softmax.init_weights`, N(0, 1)
      as in pytorch-metric-learning (the losses see directions only); ``(C*K, D)`` for
      the losses with ``K`` vectors per class
      (:attr:`~jaxmetric.losses.registry.LossEntry.centers_arg`);
    * ``"beta"`` (C,): :data:`MARGIN_LOSS_BETA` for every class.
    """
    spec = registry.get(config.loss)
    learned = spec.learned
    if learned is None:
        return None
    if num_classes is None or num_classes < 2:
        raise ValueError(f"the {config.loss} loss learns its {learned} per class: give the "
                         f"number of classes (>= 2); got {num_classes}")
    if learned == "beta":
        return jnp.full((num_classes,), MARGIN_LOSS_BETA, jnp.float32)
    if learned == "proxies":
        return init_proxies(rng, num_classes, embed_dim)
    return init_weights(rng, num_classes * spec.num_centers(config.loss_kwargs), embed_dim)


def make_loss_optimizer(config: TrainConfig,
                        schedule: optax.Schedule) -> optax.GradientTransformation:
    """The optimizer of the loss's own parameters (module docstring)."""
    scale = config.loss_lr_scale
    scaled = lambda step: schedule(step) * scale  # noqa: E731
    if config.run_optimizer == "sgd":
        return optax.sgd(scaled, momentum=config.momentum, nesterov=True)
    return optax.adam(scaled, b1=config.momentum)


def xbm_start_step(config: TrainConfig, steps_per_epoch: int) -> int:
    """The first step whose loss includes the cross-batch memory's term."""
    return int(round(config.xbm_start_epochs * steps_per_epoch))
