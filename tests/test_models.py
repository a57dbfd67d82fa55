"""Tests for jaxmetric.models: shapes, dtypes, BatchNorm behaviour, sync-BN, weight loading.

Kept small for CPU: real forward passes use 2-4 images of 32x32, and each model is
initialised once per module (ResNet-34 is only checked through ``jax.eval_shape``).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxmetric.models import (
    MODEL_NAMES,
    count_params,
    create_model,
    flatten_variables,
    load_pretrained_trunk,
)

EMBED_DIM = 16


def images(n=4, seed=1, size=32):
    return jax.random.normal(jax.random.key(seed), (n, size, size, 3), jnp.float32)


# Models with a real forward pass in the tests (resnet50 through its cheaper imagenet stem).
REAL = {"homebrew": "cifar", "resnet18": "cifar", "resnet50": "imagenet"}


@functools.cache
def _model_and_init(name, dtype):
    model = create_model(name, embed_dim=EMBED_DIM, dtype=dtype, stem=REAL[name])
    return model, jax.jit(lambda k: model.init(k, images(1), train=False))


@functools.cache
def model_and_variables(name, dtype=jnp.float32, seed=0):
    model, init = _model_and_init(name, dtype)
    return model, init(jax.random.key(seed))


def apply_train(model, variables, x):
    return model.apply(variables, x, train=True, mutable=["batch_stats"])


def assert_unit_embeddings(emb, n):
    assert emb.shape == (n, EMBED_DIM)
    assert emb.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(np.asarray(emb), axis=-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", list(REAL))
def test_forward_shape_dtype_unit_norm(name):
    model, variables = model_and_variables(name)
    x = images(2)
    emb_eval = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    emb_train, _ = jax.jit(functools.partial(apply_train, model))(variables, x)
    assert_unit_embeddings(emb_eval, 2)
    assert_unit_embeddings(emb_train, 2)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_shapes_via_eval_shape(name, stem):
    model = create_model(name, embed_dim=EMBED_DIM, stem=stem)
    x = jax.ShapeDtypeStruct((3, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    out, updates = jax.eval_shape(functools.partial(apply_train, model), variables, x)
    assert out.shape == (3, EMBED_DIM) and out.dtype == jnp.float32
    assert set(variables) == {"params", "batch_stats"}
    assert (jax.tree.structure(updates["batch_stats"])
            == jax.tree.structure(variables["batch_stats"]))


def test_param_counts():
    def n_params(name, stem="imagenet", embed_dim=128):
        model = create_model(name, embed_dim=embed_dim, stem=stem)
        return count_params(jax.eval_shape(
            lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)))

    # torchvision trunks (without fc) + Dense(feature_dim -> 128) head.
    assert n_params("resnet18") == 11_176_512 + 512 * 128 + 128
    assert n_params("resnet34") == 21_284_672 + 512 * 128 + 128
    assert n_params("resnet50") == 23_508_032 + 2048 * 128 + 128
    # The CIFAR stem swaps the 7x7 conv for a 3x3 one.
    assert n_params("resnet18", "cifar") == n_params("resnet18") - 64 * 3 * (49 - 9)
    assert 50_000 < n_params("homebrew") < 400_000


@pytest.mark.parametrize("name", ["homebrew", "resnet18"])
def test_bfloat16_compute(name):
    model32, variables = model_and_variables(name)
    model16 = create_model(name, embed_dim=EMBED_DIM, dtype=jnp.bfloat16, stem=REAL[name])
    x = images(4)
    # Parameters created by the bf16 model are float32.
    shapes = jax.eval_shape(lambda: model16.init(jax.random.key(0), x, train=False))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))

    out32 = jax.jit(lambda v, x: model32.apply(v, x, train=False))(variables, x)
    apply16 = jax.jit(lambda v, x: model16.apply(v, x, train=False, mutable=["batch_stats"]))
    (out16, upd16) = apply16(variables, x)
    assert out16.dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(upd16))
    assert_unit_embeddings(out16, 4)
    np.testing.assert_allclose(out16, out32, atol=0.05)
    assert np.min(np.sum(np.asarray(out16) * np.asarray(out32), axis=-1)) > 0.99  # cosine


def test_eval_mode_uses_running_averages_and_is_pure():
    model, variables = model_and_variables("homebrew")
    x = images(4)
    emb, updates = model.apply(variables, x, train=False, mutable=["batch_stats"])
    jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], variables["batch_stats"])
    # Running statistics make each embedding independent of the rest of the batch ...
    np.testing.assert_allclose(model.apply(variables, x[:1], train=False), emb[:1], atol=1e-6)
    # ... while batch statistics (train mode) do not.
    emb_train, _ = apply_train(model, variables, x)
    assert not np.allclose(emb_train, emb, atol=1e-3)


def test_train_mode_updates_batch_stats_with_momentum_09():
    model, variables = model_and_variables("homebrew")
    x = images(4)
    _, updates = apply_train(model, variables, x)
    new, old = updates["batch_stats"], variables["batch_stats"]
    for layer in old:
        assert not np.allclose(new[layer]["mean"], old[layer]["mean"])
        assert not np.allclose(new[layer]["var"], old[layer]["var"])
    # First BN: running mean = 0.9 * 0 + 0.1 * batch mean of the first conv's output.
    conv0 = nn.Conv(32, (3, 3), use_bias=False).apply({"params": variables["params"]["conv0"]}, x)
    np.testing.assert_allclose(new["bn0"]["mean"], 0.1 * conv0.mean(axis=(0, 1, 2)), atol=1e-5)
    np.testing.assert_allclose(new["bn0"]["var"], 0.9 + 0.1 * conv0.var(axis=(0, 1, 2)),
                               rtol=1e-4)


@pytest.mark.parametrize("name", ["homebrew", "resnet18"])
def test_gradients_finite_for_zero_images(name):
    model, variables = model_and_variables(name)
    x = jnp.zeros((2, 32, 32, 3), jnp.float32)

    def loss(params):
        emb, _ = apply_train(model, {**variables, "params": params}, x)
        return jnp.sum(emb * jnp.arange(EMBED_DIM)), emb

    grads, emb = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
    assert np.all(np.isfinite(emb))
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_zero_init_residual_option(name):
    def block_scales(zero_init_residual):
        # One block per model keeps this cheap; every block is built the same way.
        model = create_model(name, embed_dim=EMBED_DIM, stage_sizes=(1,), num_filters=8,
                             zero_init_residual=zero_init_residual)
        params = model.init(jax.random.key(0), images(1, size=8), train=False)["params"]
        block = params["BottleneckResNetBlock_0" if name == "resnet50" else "ResNetBlock_0"]
        return [block[k]["scale"] for k in sorted(block) if k.startswith("BatchNorm_")]

    *first, last = block_scales(True)
    assert np.all(last == 0) and all(np.all(s == 1) for s in first)
    assert all(np.all(s == 1) for s in block_scales(False))


def test_unknown_name_or_stem_raises():
    with pytest.raises(ValueError, match="resnet18.*homebrew"):
        create_model("vgg16")
    with pytest.raises(ValueError, match="cifar.*imagenet"):
        create_model("resnet18", stem="tiny")
    with pytest.raises(ValueError, match="cifar.*imagenet"):
        create_model("homebrew", stem="tiny")


def test_sync_batchnorm_under_shard_map_matches_single_device():
    assert len(jax.devices()) >= 8, "conftest should force 8 host devices"
    mesh = Mesh(np.array(jax.devices()[:8]), ("batch",))
    x = images(16, seed=3)
    single = create_model("homebrew", embed_dim=EMBED_DIM)
    synced = create_model("homebrew", embed_dim=EMBED_DIM, bn_axis_name="batch")
    _, variables = model_and_variables("homebrew")

    emb_ref, upd_ref = jax.jit(functools.partial(apply_train, single))(variables, x)
    sharded = jax.jit(jax.shard_map(functools.partial(apply_train, synced), mesh=mesh,
                                    in_specs=(P(), P("batch")), out_specs=(P("batch"), P())))
    emb, upd = sharded(variables, x)
    np.testing.assert_allclose(emb, emb_ref, atol=1e-5)
    jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-5), upd, upd_ref)
    # Without sync, per-device statistics give different embeddings.
    unsynced = jax.jit(jax.shard_map(functools.partial(apply_train, single), mesh=mesh,
                                     in_specs=(P(), P("batch")),
                                     out_specs=(P("batch"), P("batch"))))
    assert not np.allclose(unsynced(variables, x)[0], emb_ref, atol=1e-3)


@pytest.mark.parametrize("fmt", ["npz", "msgpack"])
def test_load_pretrained_trunk_roundtrip(tmp_path, fmt):
    _, source = model_and_variables("homebrew", seed=0)
    _, target = model_and_variables("homebrew", seed=1)
    path = tmp_path / f"trunk.{fmt}"
    if fmt == "npz":
        np.savez(path, **flatten_variables(source))
    else:
        path.write_bytes(serialization.msgpack_serialize(jax.device_get(source)))
    loaded = load_pretrained_trunk(target, path)
    np.testing.assert_array_equal(loaded["params"]["conv0"]["kernel"],
                                  source["params"]["conv0"]["kernel"])
    np.testing.assert_array_equal(loaded["batch_stats"]["bn3"]["var"],
                                  source["batch_stats"]["bn3"]["var"])
    # The head is not loaded: it keeps the target's weights.
    np.testing.assert_array_equal(loaded["params"]["head"]["Dense_0"]["kernel"],
                                  target["params"]["head"]["Dense_0"]["kernel"])
    assert jax.tree.structure(loaded) == jax.tree.structure(target)


def test_load_pretrained_trunk_errors(tmp_path):
    _, target = model_and_variables("homebrew")
    flat = flatten_variables(target)
    bad_shape = dict(flat, **{"params/conv1/kernel": np.zeros((3, 3, 32, 48), np.float32)})
    np.savez(tmp_path / "shape.npz", **bad_shape)
    with pytest.raises(ValueError, match="shape mismatch.*params/conv1/kernel"):
        load_pretrained_trunk(target, tmp_path / "shape.npz")
    missing = {k: v for k, v in flat.items() if k != "params/bn2/scale"}
    np.savez(tmp_path / "missing.npz", **missing)
    with pytest.raises(ValueError, match="missing keys.*params/bn2/scale"):
        load_pretrained_trunk(target, tmp_path / "missing.npz")
    load_pretrained_trunk(target, tmp_path / "missing.npz", strict=False)  # partial load is fine


@pytest.mark.parametrize("shape", [(3, 8, 8, 5), (2, 7, 9, 4)])
def test_max_pool_2x2_equals_flax_max_pool(shape):
    from jaxmetric.models import max_pool_2x2

    x = jax.random.normal(jax.random.key(0), shape)
    expected = nn.max_pool(x, (2, 2), strides=(2, 2))
    np.testing.assert_array_equal(max_pool_2x2(x), expected)
    # Without ties the gradients agree too.
    g = jax.grad(lambda x: jnp.sum(max_pool_2x2(x) ** 2))(x)
    g_ref = jax.grad(lambda x: jnp.sum(nn.max_pool(x, (2, 2), strides=(2, 2)) ** 2))(x)
    np.testing.assert_allclose(g, g_ref, rtol=1e-6)


@pytest.mark.parametrize("weight_init", ["he", "torch"])
def test_weight_init_scales(weight_init):
    """He normal fan-out: var 2 / (9 c_out); PyTorch default: var 1 / (3 * 9 c_in)."""
    model = create_model("homebrew", weight_init=weight_init)
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)["params"]
    for name, (c_in, c_out) in {"conv1": (32, 64), "conv2": (64, 128)}.items():
        expected = (2 / (9 * c_out)) ** 0.5 if weight_init == "he" else (1 / (27 * c_in)) ** 0.5
        assert float(np.std(params[name]["kernel"])) == pytest.approx(expected, rel=0.05)
    head_bias = params["head"]["Dense_0"]["bias"]
    if weight_init == "he":
        assert not np.any(head_bias)
    else:  # U(-1/sqrt(128), 1/sqrt(128))
        assert 0 < float(np.max(np.abs(head_bias))) <= 128 ** -0.5


def test_unknown_weight_init_is_refused():
    with pytest.raises(ValueError, match="unknown init 'xavier'"):
        create_model("homebrew", weight_init="xavier")
