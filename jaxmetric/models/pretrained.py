"""Pretrained weights into jaxmetric's networks: torchvision's ResNets, or a saved trunk.

Two kinds of file, one module: :func:`load_torchvision_resnet` reads torchvision's
ImageNet ResNets (below); :func:`load_pretrained_trunk` reads a trunk saved from a
jaxmetric model (``.npz`` of :func:`flatten_variables`, or flax ``.msgpack``), for
fine-tuning a model of the same architecture.

**torchvision's ResNets.**

torchvision's ``resnet18`` / ``resnet34`` / ``resnet50`` (He et al., "Deep Residual
Learning for Image Recognition", CVPR 2016; ResNet-50 as v1.5, the stride on the
bottleneck's 3x3 conv) are, layer for layer, :mod:`jaxmetric.models`' ResNets with the
``"imagenet"`` stem: same convolutions and padding, BatchNorm epsilon 1e-5, 3x3/2
max-pool padded with -inf. Their state dict (``model.state_dict()``, saved as ``.pth``
with ``torch.save`` or as ``.safetensors``) converts name by name:

==========================================  ==============================================
torchvision                                 jaxmetric (collection / module path / leaf)
==========================================  ==============================================
``conv1.weight`` (O, I, kh, kw)             ``params/conv_init/kernel`` (kh, kw, I, O)
``bn1.weight`` / ``bn1.bias``               ``params/bn_init/scale`` / ``.../bias``
``bn1.running_mean`` / ``running_var``      ``batch_stats/bn_init/mean`` / ``.../var``
``layer{s}.{j}.conv{k}`` / ``bn{k}``        ``<Block>_{n}/Conv_{k-1}`` / ``BatchNorm_{k-1}``
``layer{s}.{j}.downsample.0`` / ``.1``      ``<Block>_{n}/conv_proj`` / ``norm_proj``
``fc.*``, ``*.num_batches_tracked``         ignored (ImageNet classifier, a step counter)
==========================================  ==============================================

where ``n`` counts the blocks over all stages (``layer2.0`` of ResNet-18 is block 2) and
``<Block>`` is ``ResNetBlock`` (18/34) or ``BottleneckResNetBlock`` (50). Conv kernels go
from PyTorch's OIHW to Flax's HWIO; everything else is copied as is. The metric head
(``Dense(embed_dim)`` + L2 normalisation) has no counterpart in the checkpoint (its
``fc`` is the 1000-way classifier) and keeps its fresh initialisation.

Nothing is downloaded: the user fetches the file (for example the URL of torchvision's
``ResNet50_Weights.IMAGENET1K_V2``, or the copy ``torch.hub`` keeps under
``~/.cache/torch/hub/checkpoints/``). Reading ``.safetensors`` needs only the
``safetensors`` package (``pip install jaxmetric[pretrained]``); reading ``.pth`` needs
torch (``torch.load(weights_only=True)``: tensors only, no pickled code)::

    model = create_model("resnet50", stem="imagenet")
    variables = model.init(key, jnp.zeros((1, 224, 224, 3)), train=False)
    variables, report = load_torchvision_resnet("resnet50-11ad3fa6.pth", model, variables)

torchvision's weights expect RGB images normalised with ImageNet's mean
``(0.485, 0.456, 0.406)`` and std ``(0.229, 0.224, 0.225)``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import serialization, traverse_util

from jaxmetric.models.networks import BottleneckResNetBlock, ResNet, ResNetBlock
from jaxmetric.utils import require

__all__ = ["LoadReport", "describe_state_dict", "flatten_variables", "load_pretrained_trunk",
           "load_torchvision_resnet", "read_state_dict", "torchvision_name"]

log = logging.getLogger("jaxmetric.models.pretrained")

SUFFIXES = (".pth", ".pt", ".safetensors")
"""File types :func:`read_state_dict` reads."""

PRETRAINED_INSTALL = "pip install jaxmetric[pretrained]"

_BN_LEAVES = {("params", "scale"): "weight", ("params", "bias"): "bias",
              ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}

_ARCHITECTURES = {("basic", (2, 2, 2, 2)): "resnet18", ("basic", (3, 4, 6, 3)): "resnet34",
                  ("bottleneck", (3, 4, 6, 3)): "resnet50",
                  ("bottleneck", (3, 4, 23, 3)): "resnet101",
                  ("bottleneck", (3, 8, 36, 3)): "resnet152"}


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What :func:`load_torchvision_resnet` did.

    Attributes:
      loaded: the checkpoint's names that were copied into the model.
      ignored: the checkpoint's names that were skipped on purpose (``fc.*``,
        ``*.num_batches_tracked``).
      fresh: the model's variables (``"params/head/Dense_0/kernel"``, ...) that kept
        their initial values: the metric head.
    """

    loaded: tuple[str, ...]
    ignored: tuple[str, ...]
    fresh: tuple[str, ...]

    def summary(self) -> str:
        """One line, e.g. ``"265 arrays loaded; ignored: fc.bias, fc.weight, 53
        num_batches_tracked; kept as initialised: params/head/Dense_0/bias, ..."``."""
        counters = [k for k in self.ignored if k.endswith(".num_batches_tracked")]
        ignored = [k for k in self.ignored if k not in counters]
        if counters:
            ignored.append(f"{len(counters)} num_batches_tracked")
        return (f"{len(self.loaded)} arrays loaded; ignored: {', '.join(ignored) or 'none'}; "
                f"kept as initialised: {_short(self.fresh)}")


def _short(names, limit: int = 4) -> str:
    names = list(names)
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _ignored(name: str) -> bool:
    return name.startswith("fc.") or name.endswith(".num_batches_tracked")


def _to_numpy(name: str, value) -> np.ndarray:
    """A torch tensor (any float dtype, bfloat16 included) or array -> NumPy."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        return value.numpy()
    array = np.asarray(value)
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise ValueError(f"state dict entry {name!r} is not a numeric array: "
                         f"{type(value).__name__}")
    return array


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The ``{name: array}`` state dict stored in ``path``.

    ``.safetensors``: read with ``safetensors.numpy`` (no torch needed). ``.pth`` /
    ``.pt``: ``torch.load(path, weights_only=True, map_location="cpu")``, which must give
    a mapping of names to tensors (``torch.save(model.state_dict(), path)``; a whole
    pickled model is refused).

    Raises:
      FileNotFoundError: no such file.
      ValueError: another suffix, or a file that is not a state dict of that kind.
      ImportError: the reader's package (safetensors or torch) is missing.
    """
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{path}: expected a torchvision state dict as one of {SUFFIXES}; "
                         f"got suffix {path.suffix!r}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (the pretrained weights are read from "
                                "a file you downloaded; nothing is fetched)")
    if suffix == ".safetensors":
        st = require("safetensors.numpy", "reading .safetensors weights",
                     install=PRETRAINED_INSTALL)
        try:
            state = st.load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"{path}: not a readable .safetensors file ({e})") from e
    else:
        torch = require("torch", "reading .pth weights (or convert them to .safetensors)",
                        install="pip install torch")
        try:
            state = torch.load(str(path), weights_only=True, map_location="cpu")
        except Exception as e:  # noqa: BLE001 - torch raises pickle, zip and runtime errors
            raise ValueError(
                f"{path}: torch.load(weights_only=True) cannot read it as a state dict ({e}). "
                "Save the weights with torch.save(model.state_dict(), path), not the "
                "model object.") from e
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict "
                         "(a mapping of parameter names to tensors)")
    return {k: _to_numpy(k, v) for k, v in state.items()}


def _block_names(model: ResNet) -> dict[str, str]:
    """``{"ResNetBlock_2": "layer2.0", ...}``: each Flax block's torchvision prefix."""
    kind = _block_kind(model)
    names, n = {}, 0
    for stage, size in enumerate(model.stage_sizes):
        for j in range(size):
            names[f"{kind.__name__}_{n}"] = f"layer{stage + 1}.{j}"
            n += 1
    return names


def _block_kind(model: ResNet) -> type:
    if model.block_cls not in (ResNetBlock, BottleneckResNetBlock):
        raise ValueError(f"block_cls {model.block_cls!r} has no torchvision counterpart")
    return model.block_cls


def torchvision_name(path: tuple[str, ...], blocks: Mapping[str, str]) -> str | None:
    """torchvision's name for the variable at ``path`` (collection first, e.g.
    ``("params", "ResNetBlock_2", "Conv_0", "kernel")`` -> ``"layer2.0.conv1.weight"``);
    None for the metric head. ``blocks``: the Flax block -> ``layer{s}.{j}`` table of
    the model. Raises ``ValueError`` for a path with no counterpart."""
    collection, *modules, leaf = path
    if modules and modules[0] == "head":
        return None
    if modules == ["conv_init"] and (collection, leaf) == ("params", "kernel"):
        return "conv1.weight"
    if modules == ["bn_init"] and (collection, leaf) in _BN_LEAVES:
        return f"bn1.{_BN_LEAVES[collection, leaf]}"
    if len(modules) == 2 and modules[0] in blocks:
        prefix, layer = blocks[modules[0]], modules[1]
        if layer == "conv_proj" and (collection, leaf) == ("params", "kernel"):
            return f"{prefix}.downsample.0.weight"
        if layer == "norm_proj" and (collection, leaf) in _BN_LEAVES:
            return f"{prefix}.downsample.1.{_BN_LEAVES[collection, leaf]}"
        kind, _, index = layer.rpartition("_")
        if index.isdigit():
            k = int(index) + 1
            if kind == "Conv" and (collection, leaf) == ("params", "kernel"):
                return f"{prefix}.conv{k}.weight"
            if kind == "BatchNorm" and (collection, leaf) in _BN_LEAVES:
                return f"{prefix}.bn{k}.{_BN_LEAVES[collection, leaf]}"
    raise ValueError(f"variable {'/'.join(path)} has no torchvision counterpart")


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torchvision shape of a Flax variable's: HWIO kernels are OIHW there."""
    return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape


def describe_state_dict(state: Mapping[str, Any]) -> str:
    """What architecture a state dict looks like, for error messages: e.g.
    ``"a torchvision resnet18 (BasicBlock stages (2, 2, 2, 2))"``."""
    stages = []
    for s in range(1, 5):
        blocks = {int(k.split(".")[1]) for k in state
                  if k.startswith(f"layer{s}.") and k.split(".")[1].isdigit()}
        stages.append(max(blocks) + 1 if blocks else 0)
    if not any(stages):
        return "not a torchvision ResNet (no layer1..layer4 keys)"
    kind = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
    name = _ARCHITECTURES.get((kind, tuple(stages)), "ResNet of unknown depth")
    block = "Bottleneck" if kind == "bottleneck" else "BasicBlock"
    return f"a torchvision {name} ({block} stages {tuple(stages)})"


def _model_name(model: ResNet) -> str:
    kind = "bottleneck" if model.block_cls is BottleneckResNetBlock else "basic"
    return _ARCHITECTURES.get((kind, tuple(model.stage_sizes)), "this ResNet")


def load_torchvision_resnet(source: str | os.PathLike | Mapping[str, Any], model,
                            variables) -> tuple[dict[str, Any], LoadReport]:
    """``variables`` with the trunk replaced by a torchvision ResNet's weights.

    Args:
      source: a ``.pth`` / ``.safetensors`` file (:func:`read_state_dict`) or the state
        dict itself (names to tensors or arrays).
      model: the :class:`jaxmetric.models.ResNet` (``create_model("resnet50",
        stem="imagenet")``) that ``variables`` belong to.
      variables: ``{"params": ..., "batch_stats": ...}`` of ``model`` (``model.init``);
        the head's entries are returned unchanged.

    Returns:
      ``(variables, report)``: the new variables (every array cast to the dtype of the
      one it replaces) and a :class:`LoadReport`.

    Raises:
      ValueError: ``model`` is not an ImageNet-stem ResNet, or the state dict does not
        fit it: the message names the missing, unexpected and mis-shaped entries and
        what architecture the file looks like.
    """
    if not isinstance(model, ResNet):
        raise ValueError(f"torchvision weights load into a resnet18/34/50 model; got "
                         f"{type(model).__name__}")
    if model.stem != "imagenet":
        raise ValueError(f"torchvision's ResNets have the ImageNet stem (7x7 conv + max-pool); "
                         f"build the model with stem='imagenet', not {model.stem!r}")
    where = str(source) if not isinstance(source, Mapping) else "the state dict"
    state = (read_state_dict(source) if not isinstance(source, Mapping)
             else {k: _to_numpy(k, v) for k, v in source.items()})

    flat = traverse_util.flatten_dict(serialization.to_state_dict(variables))
    blocks = _block_names(model)
    targets: dict[str, tuple] = {}
    fresh = []
    for path in flat:
        name = torchvision_name(path, blocks)
        if name is None:
            fresh.append("/".join(path))
        else:
            targets[name] = path
    ignored = sorted(k for k in state if _ignored(k))
    given = {k for k in state if not _ignored(k)}
    missing, unexpected = sorted(set(targets) - given), sorted(given - set(targets))
    misshaped = [f"{k} {tuple(state[k].shape)} (expected {_torch_shape(np.shape(flat[p]))})"
                 for k, p in targets.items()
                 if k in given and tuple(state[k].shape) != _torch_shape(np.shape(flat[p]))]
    if missing or unexpected or misshaped:
        problems = [f"{len(v)} {what}: {_short(v, 6)}" for what, v in
                    (("missing", missing), ("unexpected", unexpected),
                     ("mis-shaped", misshaped)) if v]
        raise ValueError(f"{where} does not fit {_model_name(model)}: " + "; ".join(problems)
                         + f". The file looks like {describe_state_dict(state)}.")

    for name, path in targets.items():
        value = state[name]
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{where}: {name} holds NaN or inf")
        flat[path] = jnp.asarray(value, dtype=jnp.asarray(flat[path]).dtype)
    report = LoadReport(loaded=tuple(sorted(targets)), ignored=tuple(ignored),
                        fresh=tuple(sorted(fresh)))
    log.info("%s: %s", where, report.summary())
    restored = serialization.from_state_dict(variables, traverse_util.unflatten_dict(flat))
    return restored, report


# ------------------------------------------------------------- jaxmetric trunks


def flatten_variables(variables) -> dict[str, np.ndarray]:
    """``{"params/conv_init/kernel": array, ...}``: the format of ``load_pretrained_trunk``."""
    flat = traverse_util.flatten_dict(serialization.to_state_dict(variables), sep="/")
    return {k: np.asarray(v) for k, v in flat.items()}


def load_pretrained_trunk(variables, path, *, skip_prefixes: Sequence[str] = ("params/head/",
                                                                              "batch_stats/head/"),
                          strict: bool = True):
    """Return ``variables`` with trunk weights replaced by those stored in ``path``.

    File format: a ``.npz`` whose keys are '/'-joined variable paths, collection first,
    e.g. ``params/conv_init/kernel``, ``params/ResNetBlock_0/BatchNorm_0/scale``,
    ``batch_stats/bn_init/mean`` (exactly ``flatten_variables(variables)``; write one with
    ``np.savez(path, **flatten_variables(variables))``), or a ``.msgpack`` file of the
    nested variables dict (``flax.serialization.msgpack_serialize``).

    Entries under ``skip_prefixes`` (by default the embedding head) are neither loaded
    nor required. Arrays are cast to the dtype of the variable they replace.

    Raises:
      ValueError: on a shape mismatch, or (if ``strict``) when the file has keys the
        model lacks or lacks trunk keys the model has.
    """
    path = str(path)
    if path.endswith(".msgpack"):
        with open(path, "rb") as f:
            loaded = traverse_util.flatten_dict(serialization.msgpack_restore(f.read()), sep="/")
    else:
        with np.load(path) as npz:
            loaded = {k: npz[k] for k in npz.files}
    skip = lambda k: any(k.startswith(p) for p in skip_prefixes)  # noqa: E731
    loaded = {k: v for k, v in loaded.items() if not skip(k)}

    state = serialization.to_state_dict(variables)
    flat = traverse_util.flatten_dict(state, sep="/")
    trunk = {k for k in flat if not skip(k)}
    if strict:
        unexpected, missing = sorted(set(loaded) - trunk), sorted(trunk - set(loaded))
        if unexpected or missing:
            raise ValueError(f"{path}: unexpected keys {unexpected[:5]}, missing keys {missing[:5]}"
                             f" ({len(unexpected)} unexpected, {len(missing)} missing)")
    mismatched = [f"{k}: file {np.shape(v)} vs model {np.shape(flat[k])}"
                  for k, v in loaded.items() if k in flat and np.shape(v) != np.shape(flat[k])]
    if mismatched:
        raise ValueError(f"{path}: shape mismatch for " + "; ".join(mismatched))
    for k, v in loaded.items():
        if k in flat:
            flat[k] = jnp.asarray(v, dtype=jnp.asarray(flat[k]).dtype)
    return serialization.from_state_dict(variables, traverse_util.unflatten_dict(flat, sep="/"))
