"""Every training knob in one place: :class:`TrainConfig`.

The defaults are a ResNet-18 (CIFAR stem) recipe for one GPU, from the standard
CIFAR-10 ResNet training setup, with the loss settings and the initialisation chosen by
controlled runs against pytorch-metric-learning (README, "Side by side with PyTorch"):

* SGD with Nesterov momentum 0.9, weight decay 5e-4 on the conv/dense kernels only (not
  on BatchNorm scales and biases), a linear warm-up over 5 epochs (a tenth of the run
  when that is shorter) to a peak learning rate ``0.1 * batch_size / 256`` (Goyal et
  al.'s linear scaling rule: 0.2 at the default batch of 512) and a cosine decay to 0;
* batch 512: with 10 classes a random batch has ~51 images per class, so every anchor
  has plenty of positives and negatives and no class-balanced sampling is needed
  (``classes_per_batch=None``); 100 epochs with random crop + flip augmentation;
* PyTorch's default layer initialisation (``weight_init="torch"``): its weights are
  about half as large as He's, and since every conv is followed by BatchNorm and the
  head by the L2 normalisation, smaller weights mean a larger effective learning rate.
  Measured on the CPU recipe (10 epochs, 2 seeds): +4 to +5 points of P@1;
* embeddings are L2-normalised, so distances lie in [0, 2] (random unit vectors in
  high dimension sit near sqrt(2)). The contrastive loss is pytorch-metric-learning's
  form: a plain hinge (``power=1``) on Euclidean distances with margin 1.0, negatives
  closer than 1.0 pushed apart and positives pulled together (Hadsell's squared form,
  ``power=2``, is the library function's default). The triplet loss uses FaceNet's
  margin 0.2 on squared distances with all triplets. Both average over the non-zero terms
  (``reduction="mean_nonzero"``): as the easy pairs and triplets pile up, the plain mean
  shrinks the gradient, the non-zero mean keeps its scale.

``lr=None`` and ``weight_decay=None`` mean "the default for this optimizer and batch
size" (see :meth:`TrainConfig.peak_lr`, :meth:`TrainConfig.decay`); an explicit value is
used as given. AdamW defaults to lr 1e-3 (not batch-scaled) and weight decay 0.05.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jaxmetric.losses import MINING_MODES, REDUCTIONS
from jaxmetric.models import INITS, MODEL_NAMES, STEMS
from jaxmetric.utils import check_choice

__all__ = ["TrainConfig", "LOSSES", "OPTIMIZERS", "DTYPES"]

LOSSES = ("contrastive", "triplet")
OPTIMIZERS = ("sgd", "adamw")
DTYPES = ("float32", "bfloat16")

DEFAULT_MARGIN = {"contrastive": 1.0, "triplet": 0.2}
DEFAULT_CONTRASTIVE_POWER = 1.0
SGD_LR_PER_256 = 0.1
DEFAULT_WARMUP_EPOCHS = 5.0
ADAMW_LR = 1e-3
DEFAULT_WEIGHT_DECAY = {"sgd": 5e-4, "adamw": 0.05}


def _field(default, help: str, **meta) -> Any:
    """A :class:`TrainConfig` field: its default, its help text and, for the command
    line (:mod:`jaxmetric.flags`), ``choices`` (also checked here), ``false_flag`` (an
    extra flag that sets a bool field to False) and ``metavar``."""
    return dataclasses.field(default=default, metadata={"help": help, **meta})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters and paths of one training run.

    Every field carries its help text (``dataclasses.fields(TrainConfig)[i].metadata``),
    from which :mod:`jaxmetric.flags` builds one command-line flag per field (``embed_dim``
    -> ``--embed-dim``); ``choices`` list the allowed values and are checked here.
    """

    model: str = _field("resnet18", "network", choices=MODEL_NAMES)
    embed_dim: int = _field(128, "embedding size")
    stem: str = _field("cifar", "ResNet stem: cifar (3x3 conv) or imagenet (7x7 conv + pool)",
                       choices=STEMS)
    weight_init: str = _field(
        "torch", "weight init: torch (PyTorch's default layer init) or he (He normal, "
        "fan-out); see jaxmetric.models.kernel_init", choices=INITS)
    dtype: str = _field("float32", "compute dtype of the model and augmentation (params "
                        "stay float32)", choices=DTYPES)
    loss: str = _field("contrastive", "metric-learning loss", choices=LOSSES)
    margin: float | None = _field(None, "loss margin; None: 1.0 contrastive, 0.2 triplet")
    pos_margin: float = _field(0.0, "contrastive only: positives closer than this are not "
                               "penalised")
    mining: str | None = _field(None, "triplet only: which triplets (None: all)",
                                choices=MINING_MODES)
    squared: bool = _field(True, "triplet only: squared distances (FaceNet); "
                           "--euclidean: plain Euclidean ones", false_flag="--euclidean")
    power: float | None = _field(None, "contrastive only: exponent of each pair's hinge (2: "
                                 "Hadsell's squared form, 1: pytorch-metric-learning's "
                                 "ContrastiveLoss); None: 1")
    reduction: str = _field(
        "mean_nonzero", "how the loss terms are averaged: mean over all selected pairs/triplets, "
        "mean_nonzero over the non-zero ones (pytorch-metric-learning's AvgNonZeroReducer; "
        "contrastive: positive and negative means taken apart and added), or sum",
        choices=REDUCTIONS)
    epochs: int = _field(100, "passes over the training set")
    batch_size: int = _field(512, "global batch, split evenly over the devices")
    classes_per_batch: int | None = _field(
        None, "P of class-balanced 'P classes x K images' batches; None: plain shuffling")
    augment: bool = _field(True, "random crop (pad 4) + horizontal flip on device; "
                           "--no-augment: normalise only")
    optimizer: str = _field("sgd", "sgd (Nesterov momentum) or adamw", choices=OPTIMIZERS)
    lr: float | None = _field(None, "peak learning rate; None: 0.1 * batch_size / 256 (sgd) "
                              "or 1e-3 (adamw)")
    weight_decay: float | None = _field(
        None, "None: 5e-4 (sgd, added to the gradient) or 0.05 (adamw, decoupled)")
    momentum: float = _field(0.9, "SGD momentum (Nesterov), or AdamW's b1")
    warmup_epochs: float | None = _field(
        None, "linear warm-up length in epochs (may be fractional), then cosine to 0; "
        "None: min(5, epochs / 10)")
    seed: int = _field(0, "fixes initialisation, sampling and augmentation")
    max_train: int | None = _field(None, "keep only the first N training images, "
                                   "class-balanced; None: all")
    max_test: int | None = _field(None, "keep only the first N test images, class-balanced; "
                                  "None: all")
    eval_every: int = _field(10, "call the evaluation hook (precision@1) every N epochs "
                             "and after the last")
    log_every: int = _field(50, "fetch step metrics from the device every N steps")
    keep_checkpoints: int = _field(3, "number of epoch checkpoints to keep")
    checkpoint_every: int = _field(1, "save a checkpoint every N epochs and after the last")
    data_dir: str | None = _field(None, "data source for the experiment's loader (CIFAR-10: "
                                  "a folder or archive; None: tensorflow-datasets)",
                                  metavar="PATH")
    out: str | None = _field(None, "run folder (config.json, metrics.jsonl, checkpoints/); "
                             "None: the caller names one (fit's out_dir)", metavar="PATH")

    # Fine-tuning from ImageNet weights (jaxmetric.pretrained).
    pretrained: str | None = _field(
        None, "torchvision ResNet weights (.pth or .safetensors state dict, downloaded by "
        "you) to start the trunk from; needs a resnet model with --stem imagenet; the "
        "embedding head starts fresh", metavar="PATH")
    freeze_bn: bool = _field(False, "BatchNorm normalises with its running statistics "
                             "while training and never updates them (eval-mode BN)")
    trunk_lr_multiplier: float = _field(
        1.0, "the trunk learns at lr times this (its weight decay scaled alike); the head "
        "(the final Dense) at lr")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if "choices" in f.metadata and value is not None:
                check_choice(f.name, value, f.metadata["choices"])
        for name in ("embed_dim", "epochs", "batch_size", "eval_every", "log_every",
                     "keep_checkpoints", "checkpoint_every"):
            _int(name, getattr(self, name), minimum=1)
        _int("seed", self.seed, minimum=0)
        for name in ("max_train", "max_test"):
            if getattr(self, name) is not None:
                _int(name, getattr(self, name), minimum=1)
        if self.margin is not None:
            _number("margin", self.margin, minimum=0.0)
        _number("pos_margin", self.pos_margin, minimum=0.0)
        if self.lr is not None:
            _number("lr", self.lr, minimum=0.0, strict=True)
        if self.weight_decay is not None:
            _number("weight_decay", self.weight_decay, minimum=0.0)
        _number("momentum", self.momentum, minimum=0.0)
        if self.momentum >= 1:
            raise ValueError(f"momentum must be < 1; got {self.momentum}")
        if self.warmup_epochs is not None:
            _number("warmup_epochs", self.warmup_epochs, minimum=0.0)
        if self.warmup_epochs is not None and self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"warmup_epochs ({self.warmup_epochs}) must be shorter than epochs "
                f"({self.epochs}), or the cosine decay never starts"
            )
        if self.loss == "contrastive":
            if self.mining is not None:
                raise ValueError(
                    f"mining={self.mining!r} applies to the triplet loss only; the "
                    "contrastive loss uses every pair (leave mining=None)"
                )
            if self.squared is not True:
                raise ValueError("squared=False applies to the triplet loss only")
            if self.power is not None:
                _number("power", self.power, minimum=0.0, strict=True)
        else:
            if self.pos_margin != 0.0:
                raise ValueError(
                    f"pos_margin={self.pos_margin} applies to the contrastive loss only"
                )
            if self.power is not None:
                raise ValueError(f"power={self.power} applies to the contrastive loss only")
        if self.classes_per_batch is not None:
            _int("classes_per_batch", self.classes_per_batch, minimum=1)
            if self.batch_size % self.classes_per_batch:
                raise ValueError(
                    f"batch_size {self.batch_size} is not divisible by classes_per_batch "
                    f"{self.classes_per_batch}"
                )
            if self.batch_size // self.classes_per_batch < 2:
                raise ValueError(
                    f"batch_size {self.batch_size} / classes_per_batch "
                    f"{self.classes_per_batch} leaves fewer than 2 images per class: "
                    "anchors would have no positive"
                )
        if self.max_train is not None and self.max_train < self.batch_size:
            raise ValueError(
                f"max_train {self.max_train} is smaller than batch_size {self.batch_size}: "
                "an epoch would have no full batch"
            )
        self._check_finetuning()

    def _check_finetuning(self) -> None:
        if self.pretrained is not None:
            if not isinstance(self.pretrained, str) or not self.pretrained:
                raise TypeError(f"pretrained must be a file path; got {self.pretrained!r}")
            if not self.model.startswith("resnet") or self.stem != "imagenet":
                raise ValueError(
                    f"pretrained weights are torchvision ResNets with the ImageNet stem: use "
                    f"a resnet model with stem='imagenet' (got model={self.model!r}, "
                    f"stem={self.stem!r})")
        if not isinstance(self.freeze_bn, bool):
            raise TypeError(f"freeze_bn must be a bool; got {self.freeze_bn!r}")
        _number("trunk_lr_multiplier", self.trunk_lr_multiplier, minimum=0.0)

    # ------------------------------------------------------------------ resolved values

    @property
    def loss_margin(self) -> float:
        """The margin actually used: ``margin``, or the loss's default."""
        return DEFAULT_MARGIN[self.loss] if self.margin is None else float(self.margin)

    @property
    def loss_power(self) -> float:
        """The contrastive hinge exponent actually used: ``power``, or 1."""
        return DEFAULT_CONTRASTIVE_POWER if self.power is None else float(self.power)

    @property
    def warmup(self) -> float:
        """The warm-up length actually used, in epochs (see ``warmup_epochs``)."""
        if self.warmup_epochs is not None:
            return float(self.warmup_epochs)
        return min(DEFAULT_WARMUP_EPOCHS, self.epochs / 10)

    @property
    def peak_lr(self) -> float:
        """The learning rate reached after warm-up."""
        if self.lr is not None:
            return float(self.lr)
        if self.optimizer == "sgd":
            return SGD_LR_PER_256 * self.batch_size / 256
        return ADAMW_LR

    @property
    def decay(self) -> float:
        """The weight decay actually used."""
        if self.weight_decay is not None:
            return float(self.weight_decay)
        return DEFAULT_WEIGHT_DECAY[self.optimizer]

    def check_devices(self, num_devices: int) -> None:
        """Raise if the global batch cannot be split evenly over ``num_devices``."""
        if self.batch_size % num_devices:
            raise ValueError(
                f"batch_size {self.batch_size} is not divisible by the number of devices "
                f"{num_devices}; use a multiple of {num_devices}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error, missing ones default."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {', '.join(unknown)}")
        return cls(**d)


def _int(name: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")


def _number(name: str, value, *, minimum: float, strict: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number; got {value!r}")
    if math.isnan(value) or math.isinf(value) or value < minimum or (strict and value <= minimum):
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ValueError(f"{name} must be a finite number {bound}; got {value}")
