"""Numerics users trip on: bfloat16 compute, large scales, Adam on ArcFace.

* **Every registered loss trains finite in bfloat16 compute** with its training
  defaults: the real train step (:func:`jaxmetric.train.make_train_step`, with the
  ``dtype`` of ``--dtype bfloat16``) on a tiny network with the models' bfloat16
  BatchNorm and embedding head, and tiny noise images. The loss, the gradient norm and
  every parameter, statistic and optimizer state stay finite, and the loss on a fixed
  batch falls.
* **Large scales** (Circle γ = 256 and 300, Multi-Similarity α = 50 / β = 100,
  NT-Xent and SupCon at τ = 0.01, Proxy-Anchor α = 64, Proxy-NCA t = 32, ArcFace /
  CosFace s = 64), in float32 and from bfloat16 inputs, at the worst points (all rows
  identical, an anchor without positives, zero rows, rows on their own class vector or
  opposite it, where ArcFace's cos(θ + m) has θ + m > π and d arccos / d cos is
  infinite): finite loss and gradients, the value of the float64 loop oracles of
  ``tests/oracles*.py``, and on ordinary rows a directional derivative that matches the
  oracle's central difference.
* **Adam on ArcFace with s = 64** (where pytorch-metric-learning's ArcFace went NaN):
  a few hundred steps on the embeddings of a small linear map, float32 and bfloat16
  inputs, finite throughout while the rows reach their class vectors (cos θ → 1, the
  singular point).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmetric import losses, train
from jaxmetric.data import CIFAR10_MEAN, CIFAR10_STD
from jaxmetric.losses import registry
from jaxmetric.losses.margin_softmax import init_weights
from jaxmetric.models.networks import EmbeddingHead
from jaxmetric.train import AXIS
from jaxmetric.train.config import TrainConfig
from jaxmetric.train.objective import make_loss_optimizer

import oracles_pair_losses as pair_oracles
import oracles_proxy as class_oracles


def compile_cheaply(jitted, *args):
    """``jitted`` compiled for ``args`` without LLVM's optimisations: half the compile
    time of these small programs. The XLA program is the same; only the machine code's
    rounding differs (four bfloat16 train steps of triplet, ArcFace, Circle and
    Proxy-Anchor: the same losses to all printed digits, parameters within 4e-6)."""
    return jitted.lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})


# ------------------------------------------------------- every loss trains in bf16

NUM_CLASSES = 4
BATCH = 16
STEPS = 4
INPUTS = train.InputSpec((4, 4, 3), CIFAR10_MEAN, CIFAR10_STD)
KEY = jax.random.key(0)


class TinyNet(nn.Module):
    """The cheapest network with every dtype seam of the package's models: a BatchNorm
    synchronised over the batch axis and the models' :class:`EmbeddingHead` (pool,
    Dense, float32 L2 normalisation), computing in ``dtype`` with float32 parameters.
    (A convolutional trunk in bfloat16 is checked in ``tests/test_models.py``; here the
    cost is one compiled train step per loss.)"""

    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         dtype=self.dtype, param_dtype=jnp.float32, axis_name=AXIS)(x)
        return EmbeddingHead(8, dtype=self.dtype, name="head")(x)


def _float_leaves(tree):
    return [np.asarray(x, np.float32) for x in jax.tree.leaves(jax.device_get(tree))
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]


def _config(name):
    """``--dtype bfloat16 --loss NAME``: the loss's training defaults, the default
    optimizer and learning rate, no augmentation."""
    return TrainConfig(model="homebrew", embed_dim=8, loss=name, dtype="bfloat16",
                       batch_size=BATCH, epochs=1, warmup_epochs=0.0, augment=False)


@pytest.fixture(scope="module")
def network_state():
    """The network's part of a fresh train state (built once: its initialisation
    compiles for each new state)."""
    return train.create_train_state(KEY, TinyNet(dtype=jnp.bfloat16), _config("contrastive"),
                                    STEPS, INPUTS)


def _with_loss_state(state, config):
    """``state`` with the learning-rate schedule and optimizer of ``config`` (the loss's
    default ones: AdamW for the losses tuned with it), and the learned argument of
    ``config.loss`` with its optimizer, as :func:`jaxmetric.train.create_train_state`
    attaches them."""
    schedule = train.make_schedule(config, STEPS)
    tx = train.make_optimizer(config, schedule)
    state = state.replace(schedule=schedule, tx=tx, opt_state=tx.init(state.params))
    loss_params = train.init_loss_params(config, jax.random.fold_in(KEY, 1), NUM_CLASSES,
                                         config.embed_dim)
    if loss_params is None:
        return state
    loss_tx = make_loss_optimizer(config, state.schedule)
    return state.replace(loss_params=loss_params, loss_tx=loss_tx,
                         loss_opt_state=loss_tx.init(loss_params))


@pytest.mark.parametrize("name", registry.NAMES)
def test_every_loss_trains_finite_in_bfloat16(name, network_state):
    """The train step of ``--dtype bfloat16 --loss NAME`` (:func:`_config`): four steps
    on one fixed batch of noise images (no augmentation, so the loss changes by
    learning only).
    Loss, gradient norm, parameters, statistics and optimizer states stay finite, the
    parameters float32, and the loss falls."""
    config = _config(name)
    dtype = jnp.dtype(config.dtype)
    mesh = Mesh(np.array(jax.devices()[:1]), (AXIS,))
    state = _with_loss_state(network_state, config)
    step = train.make_train_step(train.make_loss_fn(config), mesh, augment=config.augment,
                                 dtype=dtype, xbm_weight=config.xbm_weight,
                                 freeze_bn=config.freeze_bn, flip=config.flip)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (BATCH, *INPUTS.shape), dtype=np.uint8)
    labels = np.arange(BATCH, dtype=np.int32) % NUM_CLASSES
    replicated = NamedSharding(mesh, P())
    # The step donates its state: each test steps a copy of the shared one.
    state = jax.tree.map(lambda x: jnp.array(x, copy=True), jax.device_put(state, replicated))
    data = jax.device_put((images, labels), replicated)
    indices = jax.device_put(np.arange(BATCH, dtype=np.int32), NamedSharding(mesh, P(AXIS)))
    step = compile_cheaply(step, state, *data, indices, KEY)
    history = []
    for _ in range(STEPS):
        state, metrics = step(state, *data, indices, KEY)
        history.append(metrics)
    history = jax.device_get(history)
    values = [float(m["loss"]) for m in history]
    assert all(math.isfinite(v) for v in values), (name, values)
    assert all(math.isfinite(float(m["grad_norm"])) for m in history), name
    assert float(history[0]["grad_norm"]) > 0, name
    for leaf in _float_leaves((state.params, state.batch_stats, state.opt_state,
                               state.loss_params, state.loss_opt_state)):
        assert np.isfinite(leaf).all(), name
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(state.params)), name
    assert values[-1] < values[0], (name, values)


# -------------------------------------------------------------------- large scales

B, D, C = 8, 4, 3
EPS32 = float(np.finfo(np.float32).eps)


def _unit(x):
    x = np.asarray(x, np.float64)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _pair_inputs(rng):
    """(name, x, labels) for the pair losses. The rows have non-negative entries, so
    every cosine lies in [0, 1]: the oracles' plain ``math.exp`` stays in float64's
    range at γ = 300 (a positive pair at cosine -1 would need e^1152)."""
    labels = np.arange(B) % C
    lonely = labels.copy()
    lonely[0] = C  # an anchor of a class of its own: no positive
    x = _unit(np.abs(rng.normal(size=(B, D))))
    same = np.tile(x[:1], (B, 1))
    zero = x.copy()
    zero[3] = 0.0
    return [("random", x, labels), ("identical", same, labels),
            ("no positive", x, lonely), ("identical, no positive", same, lonely),
            ("zero row", zero, labels)]


def _class_inputs(rng):
    """(name, x, labels, class vectors) for the proxy and margin-softmax losses: rows on
    their own class vector (cos = 1) or opposite it (cos = -1), 1e-3 rad from the
    opposite (θ + m > π for ArcFace's margin), all rows identical and on one class
    vector, a class without rows, a zero row."""
    labels = np.arange(B) % C
    w = _unit(rng.normal(size=(C, D)))
    sign = np.where(np.arange(B) % 2 == 0, 1.0, -1.0)[:, None]
    on_axis = (w[labels] * sign).astype(np.float32)
    # 1e-3 rad from -w_y, in the plane of w_y and a direction orthogonal to it.
    other = rng.normal(size=(B, D))
    other -= np.sum(other * w[labels], axis=1, keepdims=True) * w[labels]
    other = other / np.linalg.norm(other, axis=1, keepdims=True)
    near_pi = _unit(math.cos(math.pi - 1e-3) * w[labels] + math.sin(math.pi - 1e-3) * other)
    x = _unit(rng.normal(size=(B, D)))
    zero = x.copy()
    zero[3] = 0.0
    return [("random", x, labels, w), ("on / opposite own vector", on_axis, labels, w),
            ("near pi", near_pi, labels, w),
            ("identical", np.tile(w[:1], (B, 1)), np.zeros(B, int), w),
            ("class without rows", x, np.where(labels == 2, 0, labels), w),
            ("zero row", zero, labels, w)]


class Case(NamedTuple):
    name: str
    fn: object      # the loss
    oracle: object  # its float64 loop oracle (tests/oracles*.py)
    kw: dict
    k: float        # a bound on |d logit / d cosine|: the logits' sensitivity


PAIR_CASES = [
    Case("circle g256 m0.25 (PML)", losses.circle_loss, pair_oracles.circle,
         dict(gamma=256.0, m=0.25), 256.0 * 2 * 2.25),
    Case("circle g300", losses.circle_loss, pair_oracles.circle, dict(gamma=300.0),
         300.0 * 2 * 2.4),
    Case("multi_similarity a50 b100", losses.multi_similarity_loss,
         pair_oracles.multi_similarity, dict(alpha=50.0, beta=100.0), 100.0),
    Case("multi_similarity a50 b100 no mining", losses.multi_similarity_loss,
         pair_oracles.multi_similarity, dict(alpha=50.0, beta=100.0, mining_epsilon=None),
         100.0),
    Case("ntxent t0.01", losses.ntxent_loss, pair_oracles.ntxent, dict(temperature=0.01),
         100.0),
    Case("supcon t0.01", losses.supcon_loss, pair_oracles.supcon, dict(temperature=0.01),
         100.0),
]
CLASS_CASES = [
    Case("proxy_anchor a64", losses.proxy_anchor_loss, class_oracles.proxy_anchor,
         dict(alpha=64.0), 64.0),
    Case("proxy_nca t32", losses.proxy_nca_loss, class_oracles.proxy_nca,
         dict(softmax_scale=32.0), 64.0),
    Case("arcface s64", losses.arcface_loss, class_oracles.arcface, dict(scale=64.0), 64.0),
    Case("arcface s64 threshold", losses.arcface_loss, class_oracles.arcface,
         dict(scale=64.0, large_angle="threshold"), 64.0),
    Case("arcface s64 easy", losses.arcface_loss, class_oracles.arcface,
         dict(scale=64.0, large_angle="easy"), 64.0),
    Case("cosface s64", losses.cosface_loss, class_oracles.cosface, dict(scale=64.0), 64.0),
]


def _tolerance(case):
    """Absolute tolerance of a float32 loss against its float64 value.

    The cosines are rounded to about ``EPS32``, so the logits carry errors of about
    ``case.k * EPS32`` (times a few roundings on the way: 8). ArcFace's own logit goes
    through :math:`\\sin\\theta = \\sqrt{1 - \\cos^2\\theta}`, whose condition is infinite
    at :math:`|\\cos\\theta| = 1`: an error ``EPS32`` of a cosine ``±1`` moves
    :math:`\\sin\\theta` by up to :math:`\\sqrt{2 \\cdot EPS32}`, the logit by
    ``s * sin(m) * sqrt(2 EPS32)`` (0.015 at s = 64, m = 0.5): the loss's own sensitivity
    at that point, in any precision short of float64.
    """
    atol = 8 * case.k * EPS32
    if case.fn is losses.arcface_loss:
        atol += case.kw["scale"] * math.sin(case.kw.get("margin", 0.5)) * math.sqrt(2 * EPS32)
    return atol


def _rounded(a):
    return np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)


def _check_value_and_grads(where, loss, grads, want, atol, dtype):
    assert loss.dtype == jnp.float32, where
    assert np.isfinite(float(loss)), where
    for g in grads:
        assert g.dtype == dtype, where
        assert np.isfinite(np.asarray(g, np.float32)).all(), where
    assert abs(float(loss) - want) <= atol + 1e-5 * abs(want), (where, float(loss), want)


def _check_direction(name, f, got):
    """``got`` (the loss's derivative along a direction) against the central difference
    of the float64 oracle ``f(t)`` along it."""
    h = 1e-6
    want = (f(h) - f(-h)) / (2 * h)
    assert abs(got - want) <= 1e-3 * max(1.0, abs(want)), (name, got, want)


DTYPES = (jnp.float32, jnp.bfloat16)


def test_pair_losses_at_large_scales():
    """Every pair case on every input of :func:`_pair_inputs`, from float32 and from
    bfloat16 embeddings: the oracle's value, finite gradients in the input's dtype; on
    the ordinary rows the float32 gradient along a random direction (Circle's weights
    held at the point, as in the paper: ``weights_from``)."""
    rng = np.random.default_rng(0)
    inputs = _pair_inputs(rng)
    direction = rng.normal(size=(B, D))

    def run(x32, x16, y):
        return [[jax.value_and_grad(lambda e, c=c: c.fn(e, y, **c.kw)[0])(x)
                 for c in PAIR_CASES] for x in (x32, x16)]

    run = compile_cheaply(jax.jit(run), *_typed(inputs[0][1]), inputs[0][2])
    for input_name, x, labels in inputs:
        typed = _typed(x)
        for dtype, xd, results in zip(DTYPES, typed, run(*typed, labels), strict=True):
            x64 = _rounded(xd)
            for case, (loss, g) in zip(PAIR_CASES, results, strict=True):
                want = case.oracle(x64, labels, **case.kw)[0]
                _check_value_and_grads(f"{case.name} on {input_name} ({dtype.__name__})",
                                       loss, [g], want, _tolerance(case), dtype)
                if input_name == "random" and dtype == jnp.float32:
                    extra = {"weights_from": x64} if case.oracle is pair_oracles.circle else {}
                    _check_direction(case.name, lambda t, c=case, e=extra, x=x64, y=labels:
                                     c.oracle(x + t * direction, y, **c.kw, **e)[0],
                        float(np.sum(np.asarray(g, np.float64) * direction)))


def test_class_losses_at_large_scales():
    """Every class case on every input of :func:`_class_inputs`, as for the pair
    losses (the gradient with respect to the rows and the class vectors)."""
    rng = np.random.default_rng(1)
    inputs = _class_inputs(rng)
    vx, vw = rng.normal(size=(B, D)), rng.normal(size=(C, D))

    def run(x32, w32, x16, w16, y):
        return [[jax.value_and_grad(lambda e, v, c=c: c.fn(e, y, v, **c.kw)[0], (0, 1))(x, w)
                 for c in CLASS_CASES] for x, w in ((x32, w32), (x16, w16))]

    _, x0, y0, w0 = inputs[0]
    run = compile_cheaply(jax.jit(run), *_typed(x0, w0), y0)
    for input_name, x, labels, w in inputs:
        typed = _typed(x, w)
        results = run(*typed, labels)
        for dtype, (xd, wd), result in zip(DTYPES, (typed[:2], typed[2:]), results,
                                           strict=True):
            x64, w64 = _rounded(xd), _rounded(wd)
            for case, (loss, (gx, gw)) in zip(CLASS_CASES, result, strict=True):
                want = case.oracle(x64, labels, w64, **case.kw)[0]
                _check_value_and_grads(f"{case.name} on {input_name} ({dtype.__name__})",
                                       loss, [gx, gw], want, _tolerance(case), dtype)
                if input_name == "random" and dtype == jnp.float32:
                    _check_direction(case.name, lambda t, c=case, x=x64, y=labels, w=w64: c.oracle(
                        x + t * vx, y, w + t * vw, **c.kw)[0],
                        float(np.sum(np.asarray(gx, np.float64) * vx)
                              + np.sum(np.asarray(gw, np.float64) * vw)))


def _typed(*arrays):
    """The arrays in float32, then in bfloat16."""
    return [jnp.asarray(a, d) for d in DTYPES for a in arrays]


# ------------------------------------------------------------- Adam on ArcFace s = 64


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_adam_on_arcface_scale_64_stays_finite(dtype):
    """pytorch-metric-learning's ArcFace with Adam went NaN once rows reached their
    class weights (``acos`` at 1). Here a linear map of random inputs (computed in
    ``dtype``) and the class weights learn with Adam (learning rate 0.1) for 300
    steps; every loss, gradient and parameter stays finite, the loss falls, and the
    rows do reach their weights: the largest own-class cosine passes 1 - 1e-5, where
    the derivative of the angle, 1 / sin θ, exceeds 200."""
    rng = np.random.default_rng(3)
    n, d_in, dim, classes = 64, 16, 8, 8
    inputs = jnp.asarray(rng.normal(size=(n, d_in)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, classes, n), jnp.int32)
    params = {"map": jnp.asarray(rng.normal(size=(d_in, dim)) / math.sqrt(d_in), jnp.float32),
              "weights": init_weights(jax.random.key(0), classes, dim)}
    tx = optax.adam(0.1)

    def objective(p):
        emb = jnp.matmul(inputs.astype(dtype), p["map"].astype(dtype))
        return losses.arcface_loss(emb, labels, p["weights"], scale=64.0)[0]

    def own_cosine(p):
        emb = inputs @ p["map"]
        emb = emb / jnp.linalg.norm(emb, axis=1, keepdims=True)
        w = p["weights"] / jnp.linalg.norm(p["weights"], axis=1, keepdims=True)
        return jnp.max(jnp.sum(emb * w[labels], axis=1))

    def body(carry, _):
        p, opt = carry
        loss, g = jax.value_and_grad(objective)(p)
        updates, opt = tx.update(g, opt, p)
        p = optax.apply_updates(p, updates)
        return (p, opt), (loss, optax.tree.norm(g), own_cosine(p))

    def run(p):
        (p, _), history = jax.lax.scan(body, (p, tx.init(p)), length=300)
        return p, *history

    run = compile_cheaply(jax.jit(run), params)
    final, values, grad_norms, cos = jax.device_get(run(params))
    assert np.isfinite(values).all() and np.isfinite(grad_norms).all()
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(final))
    assert values[-1] < 0.5 * values[0], (values[0], values[-1])
    assert cos.max() > 1 - 1e-5, cos.max()
