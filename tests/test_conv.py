"""Tests for jaxmetric.models.conv: the batch-chunked convolution equals lax's, values and
gradients, under jit / vmap / grad, and in the models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxmetric.models import create_model
from jaxmetric.models.conv import (
    DEFAULT_CHUNK_ELEMENTS,
    batch_chunked_conv,
    check_chunk_elements,
    chunk_rows,
    conv_fn,
    default_chunk_elements,
)
from jaxmetric.train.config import TrainConfig

NHWC = ("NHWC", "HWIO", "NHWC")
TOL = dict(rtol=2e-5, atol=2e-5)

CASES = {
    # name: (lhs shape, rhs shape, conv kwargs); lhs per example: H*W*C values
    "3x3 same": ((7, 6, 6, 4), (3, 3, 4, 5), dict(window_strides=(1, 1), padding="SAME",
                                                   dimension_numbers=NHWC)),
    "3x3 stride 2 explicit": ((5, 7, 7, 3), (3, 3, 3, 4),
                              dict(window_strides=(2, 2), padding=((1, 1), (1, 1)),
                                   dimension_numbers=NHWC)),
    "1x1 stride 2": ((6, 8, 8, 4), (1, 1, 4, 8), dict(window_strides=(2, 2), padding="VALID",
                                                       dimension_numbers=NHWC)),
    "grouped, dilated": ((5, 9, 9, 4), (3, 3, 2, 6),
                         dict(window_strides=(1, 1), padding="SAME", rhs_dilation=(2, 2),
                              feature_group_count=2, dimension_numbers=NHWC)),
    "NCHW": ((5, 4, 6, 6), (5, 4, 3, 3), dict(window_strides=(1, 1), padding="SAME",
                                               dimension_numbers=("NCHW", "OIHW", "NCHW"))),
}


def operands(lhs_shape, rhs_shape, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return (jax.random.normal(k1, lhs_shape, jnp.float32),
            jax.random.normal(k2, rhs_shape, jnp.float32) * 0.3)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_values_and_gradients_equal_lax(case, chunk):
    lhs_shape, rhs_shape, kw = CASES[case]
    x, w = operands(lhs_shape, rhs_shape)
    per_example = max(int(np.prod(lhs_shape[1:])), 8 * 8 * 8)  # >= any output per example
    # chunks of `chunk` examples (the batch is not a multiple of 2 or 3 in most cases)
    budget = chunk * per_example
    ref = lambda x, w: lax.conv_general_dilated(x, w, **kw)  # noqa: E731
    ours = jax.jit(lambda x, w: batch_chunked_conv(x, w, **kw, max_chunk_elements=budget))
    np.testing.assert_allclose(ours(x, w), ref(x, w), **TOL)

    def loss(f):
        g = jax.random.normal(jax.random.key(3), jax.eval_shape(ref, x, w).shape)
        return lambda x, w: jnp.sum(f(x, w) * g)

    got = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(x, w)
    want = jax.grad(loss(ref), argnums=(0, 1))(x, w)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, **TOL)


def test_chunks_really_split_the_batch():
    x, w = operands((6, 4, 4, 2), (3, 3, 2, 3))
    kw = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=NHWC)
    jaxpr = jax.make_jaxpr(lambda x: batch_chunked_conv(x, w, **kw, max_chunk_elements=2 * 48))(x)
    convs = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    assert [e.invars[0].aval.shape[0] for e in convs] == [2, 2, 2]
    whole = jax.make_jaxpr(lambda x: batch_chunked_conv(x, w, **kw, max_chunk_elements=0))(x)
    assert [e.primitive.name for e in whole.eqns] == ["conv_general_dilated"]


def test_vmap_and_second_order():
    x, w = operands((4, 5, 5, 3), (3, 3, 3, 2))
    kw = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=NHWC)
    ours = lambda x, w: batch_chunked_conv(x, w, **kw, max_chunk_elements=75)  # noqa: E731
    ref = lambda x, w: lax.conv_general_dilated(x, w, **kw)  # noqa: E731
    xs = jnp.stack([x, 2 * x])
    np.testing.assert_allclose(jax.vmap(ours, (0, None))(xs, w),
                               jax.vmap(ref, (0, None))(xs, w), **TOL)
    hvp = lambda f: jax.jvp(jax.grad(lambda w: jnp.sum(f(x, w) ** 2)), (w,), (w,))[1]  # noqa: E731
    np.testing.assert_allclose(hvp(ours), hvp(ref), rtol=1e-4, atol=1e-4)


def test_batch_group_count_is_left_whole():
    x, w = operands((4, 5, 5, 2), (3, 3, 2, 4))
    kw = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=NHWC,
              batch_group_count=2)
    np.testing.assert_allclose(batch_chunked_conv(x, w, **kw, max_chunk_elements=1),
                               lax.conv_general_dilated(x, w, **kw), **TOL)


def test_chunk_rows():
    assert chunk_rows(100, 64, 1000) == 10
    assert chunk_rows(100, 16, 50) == 1            # at least one example
    assert chunk_rows(100, 64, 50) == 2            # at most MAX_CHUNKS = 32 chunks
    assert chunk_rows(100, 64, 50, max_chunks=64) == 1
    assert chunk_rows(100, 64, 10**9) == 64        # at most the batch
    assert chunk_rows(100, 64, 0) == 64            # 0: off
    # no int32 arithmetic: large products stay exact
    assert chunk_rows(3 * 2**30, 1000, 2**40) == 341


@pytest.mark.parametrize("bad", [-1, 1.5, True, "big", None])
def test_bad_chunk_sizes_are_refused(bad):
    with pytest.raises(ValueError, match="conv chunk size"):
        check_chunk_elements(bad)
    with pytest.raises(ValueError, match="conv chunk size"):
        conv_fn(bad)
    if bad is not None:  # None: the backend's default in create_model and TrainConfig
        with pytest.raises(ValueError, match="conv chunk size"):
            create_model("homebrew", conv_chunk_elements=bad)
        with pytest.raises(ValueError, match="conv chunk size"):
            TrainConfig(conv_chunk_elements=bad)


def test_default_is_on_for_cpu_only():
    assert default_chunk_elements("cpu") == DEFAULT_CHUNK_ELEMENTS
    assert default_chunk_elements("gpu") == 0 and default_chunk_elements("tpu") == 0
    assert conv_fn(0) is None
    expected = default_chunk_elements()
    assert create_model("homebrew").conv_chunk_elements == expected


@pytest.mark.parametrize("name", ["homebrew", "resnet18"])
def test_models_do_not_depend_on_the_chunking(name):
    x = jax.random.normal(jax.random.key(1), (5, 16, 16, 3), jnp.float32)
    whole = create_model(name, embed_dim=8, conv_chunk_elements=0)
    chunked = create_model(name, embed_dim=8, conv_chunk_elements=2 * 16 * 16 * 64)
    variables = whole.init(jax.random.key(0), x[:1], train=False)
    assert (jax.tree.structure(chunked.init(jax.random.key(0), x[:1], train=False))
            == jax.tree.structure(variables))

    def loss(model):
        def f(params):
            emb, _ = model.apply({**variables, "params": params}, x, train=True,
                                 mutable=["batch_stats"])
            return jnp.sum(emb * jnp.arange(emb.shape[1])), emb
        return jax.jit(jax.value_and_grad(f, has_aux=True))

    (_, e_whole), g_whole = loss(whole)(variables["params"])
    (_, e_chunked), g_chunked = loss(chunked)(variables["params"])
    np.testing.assert_allclose(e_chunked, e_whole, rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_chunked), jax.tree.leaves(g_whole), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
