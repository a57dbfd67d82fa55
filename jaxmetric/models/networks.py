"""Embedding networks for deep metric learning (Flax Linen).

Every model maps a batch of normalised float images ``(B, H, W, C)`` (NHWC) to
float32, L2-normalised embeddings ``(B, embed_dim)``:

* ``resnet18`` / ``resnet34`` (BasicBlock) and ``resnet50`` (Bottleneck, stride on the
  3x3 conv as in torchvision / ResNet v1.5), widths 64-128-256-512, with a ``"cifar"``
  stem (3x3 conv, stride 1, no max-pool) or an ``"imagenet"`` stem (7x7 conv, stride 2,
  3x3 max-pool). The ImageNet-stem ResNets are torchvision's networks layer for layer,
  padding included (:func:`symmetric_padding`), so torchvision's ImageNet weights load
  into them exactly (:mod:`jaxmetric.models.pretrained`);
* ``homebrew``: a small conv-BN-ReLU network for CPU runs and tests.

All trunks end in global average pooling, a ``Dense(embed_dim)`` head and an
epsilon-safe L2 normalisation. Parameters are float32; ``dtype`` is the compute dtype
of the convolutions, BatchNorms and Dense layers (e.g. ``jnp.bfloat16``); the head
output is cast to float32 before normalising.

BatchNorm keeps its running statistics in the ``batch_stats`` collection (momentum
0.9, epsilon 1e-5). With ``bn_axis_name`` set, every BatchNorm averages its batch
statistics over that named axis, so under ``jax.shard_map`` / ``pmap`` the statistics
are those of the global batch (synchronised BN)::

    model = create_model("resnet18", embed_dim=128, bn_axis_name="batch")
    variables = model.init(key, images[:1], train=False)
    emb, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmetric.distances import l2_normalize
from jaxmetric.models.conv import check_chunk_elements, conv_fn, default_chunk_elements

ModuleDef = Any

MODEL_NAMES = ("resnet18", "resnet34", "resnet50", "homebrew")
STEMS = ("cifar", "imagenet")

INITS = ("he", "torch")

# He (kaiming) normal, fan_out, untruncated: torchvision's ResNet conv init.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's default for nn.Conv2d / nn.Linear weights: kaiming_uniform(a=sqrt(5)), i.e.
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)), variance 1 / (3 fan_in).
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_bias_init(fan_in: int):
    """PyTorch's nn.Linear bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound)


def kernel_init(init: str):
    """Conv kernel initialiser for ``init`` (see :data:`INITS`).

    ``"he"``: He normal with fan-out (torchvision's ResNet init); ``"torch"``: PyTorch's
    default layer init. Both are followed by BatchNorm or the L2 normalisation, which
    undo the weights' scale in the forward pass; the scale still matters for training,
    because the effective learning rate of a scale-invariant layer falls as its weights
    grow (a kernel twice as large learns about four times more slowly).
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; expected one of {INITS}")
    return conv_kernel_init if init == "he" else torch_kernel_init


class EmbeddingHead(nn.Module):
    """Global average pool -> Dense(embed_dim) -> float32 -> L2 normalise."""

    embed_dim: int
    dtype: Any = jnp.float32
    weight_init: str = "he"

    @nn.compact
    def __call__(self, x):
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        inits = {}
        if self.weight_init == "torch":
            inits = dict(kernel_init=torch_kernel_init, bias_init=_torch_bias_init(x.shape[-1]))
        x = nn.Dense(self.embed_dim, dtype=self.dtype, param_dtype=jnp.float32, **inits)(x)
        return l2_normalize(x)


class ResNetBlock(nn.Module):
    """Basic residual block (two 3x3 convs), for ResNet-18/34."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    strides: tuple[int, int] = (1, 1)
    zero_init_residual: bool = True

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (3, 3), self.strides)(x)
        y = self.norm()(y)
        y = self.act(y)
        y = self.conv(self.filters, (3, 3))(y)
        y = self.norm(scale_init=_last_scale_init(self.zero_init_residual))(y)
        if residual.shape != y.shape:
            residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
            residual = self.norm(name="norm_proj")(residual)
        return self.act(residual + y)


class BottleneckResNetBlock(nn.Module):
    """Bottleneck block (1x1, 3x3 strided, 1x1 with 4x expansion), for ResNet-50."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    strides: tuple[int, int] = (1, 1)
    zero_init_residual: bool = True

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (1, 1))(x)
        y = self.norm()(y)
        y = self.act(y)
        y = self.conv(self.filters, (3, 3), self.strides)(y)
        y = self.norm()(y)
        y = self.act(y)
        y = self.conv(self.filters * 4, (1, 1))(y)
        y = self.norm(scale_init=_last_scale_init(self.zero_init_residual))(y)
        if residual.shape != y.shape:
            residual = self.conv(self.filters * 4, (1, 1), self.strides, name="conv_proj")(residual)
            residual = self.norm(name="norm_proj")(residual)
        return self.act(residual + y)


def symmetric_padding(conv: ModuleDef) -> ModuleDef:
    """``conv`` with PyTorch's padding: ``k // 2`` zeros on *both* sides of each spatial
    axis of a ``k x k`` kernel (torchvision's ResNet convs: 7x7 pad 3, 3x3 pad 1, 1x1 pad 0).

    For stride 1 this is the same as ``"SAME"``. For stride 2 on an even input size
    ``"SAME"`` pads ``(0, 1)`` instead of ``(1, 1)``: the output has the same shape but
    every window sits one pixel to the right/below, so a torchvision checkpoint would
    compute something else. The ImageNet stem, whose weights can come from torchvision
    (:mod:`jaxmetric.models.pretrained`), pads this way; the CIFAR stem keeps ``"SAME"``.
    """

    def make(features, kernel_size, strides=(1, 1), **kwargs):
        padding = [(k // 2, k // 2) for k in kernel_size]
        return conv(features, kernel_size, strides, padding=padding, **kwargs)

    return make


def _last_scale_init(zero: bool):
    return nn.initializers.zeros_init() if zero else nn.initializers.ones_init()


class ResNet(nn.Module):
    """ResNet trunk with an L2-normalised embedding head.

    Attributes:
      stage_sizes: number of blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
      block_cls: ``ResNetBlock`` or ``BottleneckResNetBlock``.
      embed_dim: embedding size.
      num_filters: width of the first stage (doubled at every later stage).
      stem: ``"cifar"`` (3x3/1 conv, no pool) or ``"imagenet"`` (7x7/2 conv + 3x3/2 max-pool).
      zero_init_residual: zero-init the last BN scale of each block, so every block
        starts as the identity.
      dtype: compute dtype; parameters are always float32.
      bn_axis_name: named axis to synchronise BatchNorm statistics over, or None.
      weight_init: ``"he"`` or ``"torch"`` (see :func:`kernel_init`).
      conv_chunk_elements: run every convolution on chunks of the batch of at most this
        many values (:func:`jaxmetric.models.conv.batch_chunked_conv`: same result, faster on
        CPUs); 0 for one call per convolution.
    """

    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    embed_dim: int = 128
    num_filters: int = 64
    stem: str = "cifar"
    zero_init_residual: bool = True
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    act: Callable = nn.relu
    weight_init: str = "he"
    conv_chunk_elements: int = 0

    @nn.compact
    def __call__(self, x, train: bool = True):
        _check_stem(self.stem)
        conv = partial(nn.Conv, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                       kernel_init=kernel_init(self.weight_init),
                       conv_general_dilated=conv_fn(self.conv_chunk_elements))
        if self.stem == "imagenet":
            conv = symmetric_padding(conv)
        norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                       dtype=self.dtype, param_dtype=jnp.float32, axis_name=self.bn_axis_name)

        if self.stem == "cifar":
            x = conv(self.num_filters, (3, 3), name="conv_init")(x)
        else:
            x = conv(self.num_filters, (7, 7), (2, 2), name="conv_init")(x)
        x = norm(name="bn_init")(x)
        x = self.act(x)
        if self.stem == "imagenet":
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

        for i, block_size in enumerate(self.stage_sizes):
            for j in range(block_size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = self.block_cls(self.num_filters * 2**i, strides=strides, conv=conv, norm=norm,
                                   act=self.act, zero_init_residual=self.zero_init_residual)(x)
        return EmbeddingHead(self.embed_dim, dtype=self.dtype, weight_init=self.weight_init,
                             name="head")(x)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool with stride 2 (NHWC) as a reshape and a max.

    The same values as ``nn.max_pool(x, (2, 2), strides=(2, 2))`` (an odd last row or
    column is dropped, as there), but its gradient is
    an elementwise select instead of XLA's ``select_and_scatter``, which is slow on
    CPUs (the homebrew net's forward+backward is ~15-25 % faster this way). At exact
    ties the gradient is shared between the tied inputs instead of going to the first.
    """
    b, h, w, c = x.shape
    x = x[:, : h - h % 2, : w - w % 2]
    return jnp.max(x.reshape(b, h // 2, 2, w // 2, 2, c), axis=(2, 4))


class HomebrewNet(nn.Module):
    """Small, fast CNN: [3x3 conv -> BN -> ReLU -> 2x2 max-pool] per width, then the head.

    No pooling after the last block. With the default widths ``(32, 64, 128, 128)`` and
    ``embed_dim=128`` it has about 260k parameters. ``conv_chunk_elements`` as in
    :class:`ResNet`.
    """

    embed_dim: int = 128
    widths: Sequence[int] = (32, 64, 128, 128)
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    weight_init: str = "he"
    conv_chunk_elements: int = 0

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = partial(nn.Conv, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                       kernel_init=kernel_init(self.weight_init),
                       conv_general_dilated=conv_fn(self.conv_chunk_elements))
        norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                       dtype=self.dtype, param_dtype=jnp.float32, axis_name=self.bn_axis_name)
        for i, width in enumerate(self.widths):
            x = conv(width, (3, 3), name=f"conv{i}")(x)
            x = norm(name=f"bn{i}")(x)
            x = nn.relu(x)
            if i < len(self.widths) - 1:
                x = max_pool_2x2(x)
        return EmbeddingHead(self.embed_dim, dtype=self.dtype, weight_init=self.weight_init,
                             name="head")(x)


ResNet18 = partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=ResNetBlock)
ResNet34 = partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=ResNetBlock)
ResNet50 = partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckResNetBlock)

_CONSTRUCTORS = {"resnet18": ResNet18, "resnet34": ResNet34, "resnet50": ResNet50,
                 "homebrew": HomebrewNet}


def _check_stem(stem: str) -> None:
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; expected one of {STEMS}")


def create_model(name: str, *, embed_dim: int = 128, dtype=jnp.float32, stem: str = "cifar",
                 bn_axis_name: str | None = None, weight_init: str = "he",
                 conv_chunk_elements: int | None = None, **kwargs) -> nn.Module:
    """Build an embedding model by name.

    Args:
      name: one of ``MODEL_NAMES``.
      embed_dim: embedding size.
      dtype: compute dtype (params stay float32; embeddings are float32).
      stem: ``"cifar"`` or ``"imagenet"`` (ResNets only; validated for every model).
      bn_axis_name: axis name for synchronised BatchNorm under shard_map/pmap.
      weight_init: ``"he"`` or ``"torch"`` (:func:`kernel_init`).
      conv_chunk_elements: batch chunk size of the convolutions in values
        (:func:`jaxmetric.models.conv.batch_chunked_conv`), 0 for none; ``None`` picks
        :func:`jaxmetric.models.conv.default_chunk_elements` for JAX's default backend (chunked
        on CPU, whole elsewhere). The parameters and the outputs do not depend on it.
      **kwargs: extra module attributes, e.g. ``zero_init_residual=False`` or
        ``num_filters`` for ResNets, ``widths`` for homebrew.

    Returns:
      An unbound ``nn.Module``; call it as ``model.apply(variables, x, train=...)``.
    """
    if name not in _CONSTRUCTORS:
        raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")
    _check_stem(stem)
    kernel_init(weight_init)  # validates
    if conv_chunk_elements is None:
        conv_chunk_elements = default_chunk_elements()
    conv_chunk_elements = check_chunk_elements(conv_chunk_elements)
    if name.startswith("resnet"):
        kwargs["stem"] = stem
    return _CONSTRUCTORS[name](embed_dim=embed_dim, dtype=dtype, bn_axis_name=bn_axis_name,
                               weight_init=weight_init, conv_chunk_elements=conv_chunk_elements,
                               **kwargs)


def count_params(variables) -> int:
    """Number of scalars in ``variables["params"]`` (or in all leaves if no such key)."""
    tree = variables["params"] if "params" in variables else variables
    return sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree_util.tree_leaves(tree))
