"""Embedding networks (Flax Linen) and what builds and loads them.

* :mod:`~jaxmetric.models.networks` -- the ResNets (18 / 34 / 50, CIFAR or ImageNet
  stem) and the small ``homebrew`` network, each ending in an L2-normalised embedding
  head; :func:`create_model` by name;
* :mod:`~jaxmetric.models.conv` -- convolutions computed on batch chunks (the same
  result; faster kernel gradients on XLA:CPU), on by default on the CPU;
* :mod:`~jaxmetric.models.pretrained` -- the one place weights come in from a file:
  torchvision's ImageNet ResNets, or a trunk saved from a jaxmetric model.
"""

from jaxmetric.distances import l2_normalize
from jaxmetric.models.networks import (
    INITS,
    MODEL_NAMES,
    STEMS,
    BottleneckResNetBlock,
    EmbeddingHead,
    HomebrewNet,
    ResNet,
    ResNet18,
    ResNet34,
    ResNet50,
    ResNetBlock,
    conv_kernel_init,
    count_params,
    create_model,
    kernel_init,
    max_pool_2x2,
    symmetric_padding,
    torch_kernel_init,
)
from jaxmetric.models.pretrained import (
    flatten_variables,
    load_pretrained_trunk,
    load_torchvision_resnet,
)

__all__ = [
    "INITS",
    "MODEL_NAMES",
    "STEMS",
    "BottleneckResNetBlock",
    "EmbeddingHead",
    "HomebrewNet",
    "ResNet",
    "ResNet18",
    "ResNet34",
    "ResNet50",
    "ResNetBlock",
    "conv_kernel_init",
    "count_params",
    "create_model",
    "flatten_variables",
    "kernel_init",
    "l2_normalize",
    "load_pretrained_trunk",
    "load_torchvision_resnet",
    "max_pool_2x2",
    "symmetric_padding",
    "torch_kernel_init",
]
