"""Every training knob in one place: :class:`TrainConfig`.

The defaults are a ResNet-18 (CIFAR stem) recipe for one GPU, chosen from the standard
CIFAR-10 ResNet training setup rather than tuned here:

* SGD with Nesterov momentum 0.9, weight decay 5e-4 on the conv/dense kernels only (not
  on BatchNorm scales and biases), a linear warm-up over 5 epochs (a tenth of the run
  when that is shorter) to a peak learning
  rate ``0.1 * batch_size / 256`` (Goyal et al.'s linear scaling rule: 0.2 at the
  default batch of 512) and a cosine decay to 0 over the remaining epochs;
* batch 512: with 10 classes a random batch has ~51 images per class, so every anchor
  has plenty of positives and negatives and no class-balanced sampling is needed
  (``classes_per_batch=None``); 100 epochs with random crop + flip augmentation;
* embeddings are L2-normalised, so distances lie in [0, 2] (random unit vectors in
  high dimension sit near sqrt(2)). The contrastive loss uses margin 1.0 (Hadsell's
  squared hinge; pytorch-metric-learning's default negative margin for normalised
  embeddings): negatives closer than 1.0 are pushed apart, positives pulled together.
  The triplet loss uses FaceNet's margin 0.2 on squared distances with all triplets.

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

__all__ = ["TrainConfig", "LOSSES", "OPTIMIZERS", "DTYPES"]

LOSSES = ("contrastive", "triplet")
OPTIMIZERS = ("sgd", "adamw")
DTYPES = ("float32", "bfloat16")

DEFAULT_MARGIN = {"contrastive": 1.0, "triplet": 0.2}
SGD_LR_PER_256 = 0.1
DEFAULT_WARMUP_EPOCHS = 5.0
ADAMW_LR = 1e-3
DEFAULT_WEIGHT_DECAY = {"sgd": 5e-4, "adamw": 0.05}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters and paths of one training run.

    Attributes:
      model: a :data:`jaxmetric.models.MODEL_NAMES` entry.
      embed_dim: embedding size.
      stem: ResNet stem, ``"cifar"`` or ``"imagenet"``.
      weight_init: ``"he"`` (He normal, fan-out) or ``"torch"``
        (PyTorch's default layer init); see :func:`jaxmetric.models.kernel_init`.
      dtype: compute dtype of the model and augmentation (params stay float32).
      loss: ``"contrastive"`` or ``"triplet"``.
      margin: loss margin; None = 1.0 (contrastive) or 0.2 (triplet).
      pos_margin: contrastive only: positives closer than this are not penalised.
      mining: triplet only: a :data:`jaxmetric.losses.MINING_MODES` entry (None = "all").
      squared: triplet only: squared (True, FaceNet) or plain Euclidean distances.
      power: contrastive only: exponent of each pair's hinge (2 = Hadsell's squared
        form, 1 = pytorch-metric-learning's ``ContrastiveLoss``).
      reduction: how the loss terms are averaged, a :data:`jaxmetric.losses.REDUCTIONS`
        entry: ``"mean"`` over all selected pairs / triplets, ``"mean_nonzero"`` over
        the non-zero ones (pytorch-metric-learning's ``AvgNonZeroReducer``; for the
        contrastive loss the positive and negative means are taken apart and added).
      epochs: passes over the training set.
      batch_size: global batch, split evenly over the devices.
      classes_per_batch: P of "P classes x K images" batches; None = plain shuffling.
      augment: random crop (pad 4) + horizontal flip on device; False = normalise only.
      optimizer: ``"sgd"`` (Nesterov momentum) or ``"adamw"``.
      lr: peak learning rate; None = 0.1 * batch_size / 256 (sgd) or 1e-3 (adamw).
      weight_decay: None = 5e-4 (sgd, added to the gradient) or 0.05 (adamw, decoupled).
      momentum: SGD momentum (Nesterov), or AdamW's b1.
      warmup_epochs: linear warm-up length (may be fractional), then cosine to 0;
        None = ``min(5, epochs / 10)`` (5 epochs for long runs, a tenth of a short one).
      seed: fixes initialisation, sampling and augmentation.
      max_train, max_test: keep only this many (class-balanced) images; None = all.
      eval_every: call the evaluation hook every this many epochs (and after the last).
      log_every: fetch step metrics from the device every this many steps.
      keep_checkpoints: number of epoch checkpoints to keep.
      checkpoint_every: save a checkpoint every this many epochs (and after the last).
      data_dir: CIFAR-10 source for :func:`jaxmetric.data.load_cifar10` (None = tfds).
      out: run folder (metrics.jsonl, config.json, checkpoints/).
    """

    model: str = "resnet18"
    embed_dim: int = 128
    stem: str = "cifar"
    weight_init: str = "he"
    dtype: str = "float32"
    loss: str = "contrastive"
    margin: float | None = None
    pos_margin: float = 0.0
    mining: str | None = None
    squared: bool = True
    power: float = 2.0
    reduction: str = "mean"
    epochs: int = 100
    batch_size: int = 512
    classes_per_batch: int | None = None
    augment: bool = True
    optimizer: str = "sgd"
    lr: float | None = None
    weight_decay: float | None = None
    momentum: float = 0.9
    warmup_epochs: float | None = None
    seed: int = 0
    max_train: int | None = None
    max_test: int | None = None
    eval_every: int = 10
    log_every: int = 50
    keep_checkpoints: int = 3
    checkpoint_every: int = 1
    data_dir: str | None = None
    out: str = "runs/cifar10"

    def __post_init__(self):
        _choice("model", self.model, MODEL_NAMES)
        _choice("stem", self.stem, STEMS)
        _choice("weight_init", self.weight_init, INITS)
        _choice("dtype", self.dtype, DTYPES)
        _choice("loss", self.loss, LOSSES)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("reduction", self.reduction, REDUCTIONS)
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
            _number("power", self.power, minimum=0.0, strict=True)
        else:
            if self.mining is not None:
                _choice("mining", self.mining, MINING_MODES)
            if self.pos_margin != 0.0:
                raise ValueError(
                    f"pos_margin={self.pos_margin} applies to the contrastive loss only"
                )
            if self.power != 2.0:
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

    # ------------------------------------------------------------------ resolved values

    @property
    def loss_margin(self) -> float:
        """The margin actually used: ``margin``, or the loss's default."""
        return DEFAULT_MARGIN[self.loss] if self.margin is None else float(self.margin)

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


def _choice(name: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(options)}")


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
