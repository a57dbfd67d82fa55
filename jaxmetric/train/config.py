"""Every training knob in one place: :class:`TrainConfig`.

The defaults are a ResNet-18 (CIFAR stem) recipe for one GPU, from the standard
CIFAR-10 ResNet training setup, with the loss settings and the initialisation chosen by
controlled runs against pytorch-metric-learning (docs/benchmarks/peer-training.md):

* SGD with Nesterov momentum 0.9, weight decay 5e-4 on the conv/dense kernels only (not
  on BatchNorm scales and biases), a linear warm-up over 5 epochs (a tenth of the run
  when that is shorter) to a peak learning rate ``0.1 * batch_size / 256`` (Goyal et
  al.'s linear scaling rule: 0.2 at the default batch of 512) and a cosine decay to 0;
* batch 512: with 10 classes a random batch has ~51 images per class, so every anchor
  has plenty of positives and negatives and no class-balanced sampling is needed
  (``classes_per_batch="auto"`` chooses random batches there, and class-balanced ones
  for data of many classes with few images each); 100 epochs with random crop + flip augmentation;
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

``optimizer=None``, ``margin=None``, ``loss_lr_multiplier=None`` and the loss keywords
not given in ``loss_options`` mean "the loss's training default": the settings tuned for
it on a validation split (:mod:`jaxmetric.losses.registry`, ``docs/tuning.md``), such as
AdamW at 0.78 x 1e-3 with scale 30.6 for ArcFace; SGD and the paper's settings for the
losses that train well with them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jaxmetric.data.config import LEGACY_FIELDS as LEGACY_DATA_FIELDS
from jaxmetric.distances import DISTANCES
from jaxmetric.losses import MINING_MODES, REDUCTIONS, SOFT_MINING_MODES, registry
from jaxmetric.models import INITS, MODEL_NAMES, STEMS
from jaxmetric.models.conv import check_chunk_elements
from jaxmetric.utils import check_choice

__all__ = ["TrainConfig", "LOSSES", "OPTIMIZERS", "DTYPES"]


LOSSES = registry.NAMES
"""Every loss a run can train with (:data:`jaxmetric.losses.registry.LOSSES`)."""
OPTIMIZERS = ("sgd", "adamw")
DTYPES = ("float32", "bfloat16")

DEFAULT_REDUCTION = "mean_nonzero"
STEP_ARGUMENTS = registry.STEP_KEYWORDS
"""Keyword arguments the train step passes itself (never in ``loss_options``)."""
CONFIG_ARGUMENTS = frozenset({"pos_margin", "power", "mining", "distance", "reduction",
                              "temperature"})
"""Keyword arguments with a setting of their own."""
DEFAULT_CONTRASTIVE_POWER = 1.0
SGD_LR_PER_256 = 0.1
DEFAULT_WARMUP_EPOCHS = 5.0
ADAMW_LR = 1e-3
DEFAULT_WEIGHT_DECAY = {"sgd": 5e-4, "adamw": 0.05}


AUTO = "auto"


def _classes_per_batch(text: str) -> int | str:  # argparse names it "P|auto" in errors
    """``--classes-per-batch``: ``auto`` or a number of classes."""
    return AUTO if text.strip().lower() == AUTO else int(text)


_classes_per_batch.__name__ = "P|auto"


def _field(default, help: str, **meta) -> Any:
    """A :class:`TrainConfig` field: its default, its help text and, for the command
    line (:mod:`jaxmetric.train.flags`), ``choices`` (also checked here), ``false_flag`` (an
    extra flag that sets a bool field to False) and ``metavar``."""
    return dataclasses.field(default=default, metadata={"help": help, **meta})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters and paths of one training run.

    Every field carries its help text (``dataclasses.fields(TrainConfig)[i].metadata``),
    from which :mod:`jaxmetric.train.flags` builds one command-line flag per field (``embed_dim``
    -> ``--embed-dim``); ``choices`` list the allowed values and are checked here.
    """

    model: str = _field("resnet18", "network", choices=MODEL_NAMES)
    embed_dim: int = _field(128, "embedding size")
    stem: str = _field("cifar", "ResNet stem: cifar (3x3 conv) or imagenet (7x7 conv + pool)",
                       choices=STEMS)
    weight_init: str = _field(
        "torch", "weight init: torch (PyTorch's default layer init) or he (He normal, "
        "fan-out); see jaxmetric.models.kernel_init", choices=INITS)
    conv_chunk_elements: int | None = _field(
        None, "run each convolution on batch chunks of at most this many values (same "
        "result, faster gradients on CPUs; jaxmetric.models.conv); 0: off; None: 2**18 on CPU, "
        "off on GPU/TPU")
    dtype: str = _field("float32", "compute dtype of the model and augmentation (params "
                        "stay float32)", choices=DTYPES)
    loss: str = _field("contrastive", "metric-learning loss (jaxmetric.losses.registry)",
                       choices=LOSSES)
    margin: float | None = _field(None, "loss margin (circle: m; lifted_structure: neg_margin; "
                                  "arcface: radians); None: the loss's training default "
                                  "(jaxmetric.losses.registry: 1.0 contrastive, 0.2 "
                                  "triplet, ...), else the loss function's default")
    soft_margin: bool = _field(False, "triplet only: softplus(d_ap - d_an) instead of the "
                               "hinge (Hermans et al.; mining all or batch_hard)")
    temperature: float | None = _field(None, "supcon / ntxent / normalized_softmax / "
                                       "smooth_ap: the temperature; None: the loss "
                                       "function's default")
    loss_options: str | None = _field(
        None, "more keyword arguments of the loss function, as k=v,k=v (e.g. "
        "alpha=2,beta=50 for multi_similarity; numbers, true/false, none or words)",
        metavar="K=V,...")
    pos_margin: float = _field(0.0, "contrastive / snr_contrastive / lifted_structure: "
                               "positives closer than this are not penalised")
    mining: str | None = _field(None, "triplet only: which triplets (None: all)",
                                choices=MINING_MODES)
    distance: str | None = _field(
        None, "contrastive / triplet / lifted_structure / margin: the distance between "
        "embeddings (l2, squared_l2 or cosine = 1 - cos); None: the loss's default in "
        "training, squared_l2 for triplet (FaceNet), l2 for the others",
        choices=tuple(DISTANCES))
    power: float | None = _field(None, "contrastive / snr_contrastive: exponent of each "
                                 "pair's hinge (2: "
                                 "Hadsell's squared form, 1: pytorch-metric-learning's "
                                 "ContrastiveLoss); None: 1")
    reduction: str | None = _field(
        None, "contrastive / snr_contrastive / triplet: how the loss terms are averaged: "
        "mean over all selected "
        "pairs/triplets, mean_nonzero over the non-zero ones (pytorch-metric-learning's "
        "AvgNonZeroReducer; contrastive: positive and negative means taken apart and "
        "added), or sum; None: mean_nonzero", choices=REDUCTIONS)
    loss_lr_multiplier: float | None = _field(
        None, "learning-rate multiplier of the loss's own parameters (proxies, class "
        "weights, margin beta); None: the loss's training default (jaxmetric.losses."
        "registry: 100 for proxy_anchor / proxy_nca / soft_triple, ...), else 1")
    xbm_size: int | None = _field(
        None, "pair-based losses: a cross-batch memory of the last N embeddings (Wang et "
        "al. 2020), N >= batch_size; None: off")
    xbm_start_epochs: float = _field(1.0, "epochs before the memory's loss term is used")
    xbm_weight: float = _field(1.0, "weight of the memory's loss term, added to the batch's")
    epochs: int = _field(100, "passes over the training set")
    batch_size: int = _field(512, "global batch, split evenly over the devices")
    classes_per_batch: int | str | None = _field(
        "auto", "P of class-balanced 'P classes x K images' batches; none: plain shuffling; "
        "auto: class-balanced batches of 4 images per class when a random batch would give "
        "a pair-based loss fewer than 3 positives per anchor, else shuffling "
        "(jaxmetric.train.sampling)", convert=_classes_per_batch, metavar="P|auto")
    augment: bool = _field(True, "random crop (pad 4) + horizontal flip on device; "
                           "--no-augment: normalise only")
    flip: bool = _field(True, "with augment: mirror a random half of the images; --no-flip "
                        "keeps the crop and drops the flip (digits, characters, text: "
                        "mirroring changes their class)")
    optimizer: str | None = _field(
        None, "sgd (Nesterov momentum) or adamw; None: the loss's default in training "
        "(jaxmetric.losses.registry: adamw for the losses tuned with it, else sgd)",
        choices=OPTIMIZERS)
    lr: float | None = _field(None, "peak learning rate; None: 0.1 * batch_size / 256 (sgd) "
                              "or 1e-3 (adamw), times the loss's tuned factor when the "
                              "optimizer is the loss's default one")
    weight_decay: float | None = _field(
        None, "None: 5e-4 (sgd, added to the gradient) or 0.05 (adamw, decoupled)")
    momentum: float = _field(0.9, "SGD momentum (Nesterov), or AdamW's b1")
    warmup_epochs: float | None = _field(
        None, "linear warm-up length in epochs (may be fractional), then cosine to 0; "
        "None: min(5, epochs / 10)")
    seed: int = _field(0, "fixes initialisation, sampling and augmentation")
    eval_every: int = _field(10, "call the evaluation hook (precision@1) every N epochs "
                             "and after the last")
    log_every: int = _field(50, "fetch step metrics from the device every N steps")
    keep_checkpoints: int = _field(3, "number of epoch checkpoints to keep")
    checkpoint_every: int = _field(1, "save a checkpoint every N epochs and after the last")
    out: str | None = _field(None, "run folder (config.json, metrics.jsonl, checkpoints/); "
                             "None: the caller names one (fit's out_dir)", metavar="PATH")

    # Fine-tuning from ImageNet weights (jaxmetric.models.pretrained).
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
        self._check_loss()
        if self.classes_per_batch is not None and self.classes_per_batch != AUTO:
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
        if self.conv_chunk_elements is not None:
            check_chunk_elements(self.conv_chunk_elements)
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

    def _check_loss(self) -> None:
        """The loss settings: each applies to the losses that have it."""
        spec = registry.get(self.loss)

        def only(setting, owners):
            return ValueError(f"{setting} applies to the {owners} loss only, not to "
                              f"loss={self.loss!r}")

        def owners(keyword):
            names = [n for n in registry.NAMES if keyword in registry.get(n).keywords]
            return ", ".join(names[:-1]) + " and " + names[-1]

        if "pos_margin" not in spec.keywords and self.pos_margin != 0.0:
            raise only(f"pos_margin={self.pos_margin}", owners("pos_margin"))
        if self.power is not None:
            if "power" not in spec.keywords:
                raise only(f"power={self.power}", owners("power"))
            _number("power", self.power, minimum=0.0, strict=True)
        if self.loss != "triplet":
            if self.mining is not None:
                raise ValueError(
                    f"mining={self.mining!r} applies to the triplet loss only; the "
                    f"{self.loss} loss uses every pair (leave mining=None)")
            if self.soft_margin:
                raise only("soft_margin", "triplet")
        elif self.soft_margin and (self.mining or "all") not in SOFT_MINING_MODES:
            raise ValueError(f"soft_margin works with mining {', '.join(SOFT_MINING_MODES)}; "
                             f"got mining={self.mining!r}")
        if self.distance is not None and spec.distance is None:
            raise ValueError(f"distance={self.distance!r}: the {self.loss} loss compares "
                             "cosine similarities itself and takes no distance")
        if self.margin is not None and spec.margin_arg is None:
            raise ValueError(f"the {self.loss} loss has no margin (margin={self.margin})")
        if self.soft_margin and self.margin is not None:
            raise ValueError("soft_margin replaces the margin: give one or the other")
        if self.temperature is not None:
            if not spec.temperature:
                owners = [n for n in registry.NAMES if registry.get(n).temperature]
                raise only(f"temperature={self.temperature}",
                           ", ".join(owners[:-1]) + " and " + owners[-1])
            _number("temperature", self.temperature, minimum=0.0, strict=True)
        if self.reduction is not None and not spec.reduction:
            raise only(f"reduction={self.reduction!r}",
                       "contrastive, snr_contrastive and triplet")
        if self.loss_lr_multiplier is not None:
            if spec.learned is None:
                raise ValueError(f"the {self.loss} loss learns no parameters of its own "
                                 f"(loss_lr_multiplier={self.loss_lr_multiplier})")
            _number("loss_lr_multiplier", self.loss_lr_multiplier, minimum=0.0)
        if self.xbm_size is not None:
            if not spec.pairs:
                raise ValueError(f"xbm_size: a cross-batch memory serves pair-based losses; "
                                 f"the {self.loss} loss compares with class proxies/weights")
            _int("xbm_size", self.xbm_size, minimum=self.batch_size)
        _number("xbm_start_epochs", self.xbm_start_epochs, minimum=0.0)
        _number("xbm_weight", self.xbm_weight, minimum=0.0)
        _ = self.loss_kwargs  # parses and checks loss_options

    # ------------------------------------------------------------------ resolved values

    @property
    def loss_margin(self) -> float | None:
        """The margin actually used: ``margin``, or the loss's default in training (None:
        the loss function's own default, or no margin)."""
        return registry.get(self.loss).margin if self.margin is None else float(self.margin)

    @property
    def loss_distance(self) -> str | None:
        """The distance actually used: ``distance``, or the loss's default in training
        (None for the losses that take no distance)."""
        spec = registry.get(self.loss)
        return spec.distance if self.distance is None or spec.distance is None else self.distance

    @property
    def loss_reduction(self) -> str:
        """The reduction actually used (contrastive and triplet)."""
        return DEFAULT_REDUCTION if self.reduction is None else self.reduction

    @property
    def loss_lr_scale(self) -> float:
        """The learning-rate multiplier of the loss's own parameters."""
        if self.loss_lr_multiplier is not None:
            return float(self.loss_lr_multiplier)
        return registry.get(self.loss).lr_multiplier

    @property
    def loss_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``jaxmetric.losses.<loss>_loss`` this config sets:
        the loss's training defaults (:attr:`jaxmetric.losses.registry.LossEntry.options`),
        then the margin, the temperature and ``loss_options`` over them, checked against
        the function's signature. (Arguments the train step itself passes are not among
        them.)"""
        spec = registry.get(self.loss)
        kwargs: dict[str, Any] = dict(spec.options)  # the loss's training defaults
        if spec.margin_arg is not None and self.loss_margin is not None:
            kwargs[spec.margin_arg] = self.loss_margin
        if self.temperature is not None:
            kwargs["temperature"] = float(self.temperature)
        if spec.reduction:
            kwargs["reduction"] = self.loss_reduction
        if spec.distance is not None:
            kwargs["distance"] = self.loss_distance
        if "pos_margin" in spec.keywords:  # contrastive, snr_contrastive, lifted_structure
            kwargs["pos_margin"] = self.pos_margin
        if "power" in spec.keywords:  # contrastive, snr_contrastive
            kwargs["power"] = self.loss_power
        if self.loss == "triplet":
            kwargs["mining"] = self.mining or "all"
            if self.soft_margin:
                kwargs["margin"] = "soft"
        options = parse_options(self.loss_options)
        own_setting = CONFIG_ARGUMENTS | {spec.margin_arg}
        allowed = spec.keywords - STEP_ARGUMENTS - own_setting
        for key in options:
            if key in own_setting:
                flag = "margin" if key == spec.margin_arg else key.replace("_", "-")
                raise ValueError(f"loss_options: set {key!r} with --{flag}, not here")
            if key not in allowed:
                raise ValueError(f"loss_options: {self.loss}_loss has no option {key!r}; "
                                 f"it takes {', '.join(sorted(allowed)) or 'none'}")
        return kwargs | options

    @property
    def loss_power(self) -> float:
        """The exponent of the contrastive (and SNR contrastive) hinge actually used:
        ``power``, or 1."""
        return DEFAULT_CONTRASTIVE_POWER if self.power is None else float(self.power)

    @property
    def warmup(self) -> float:
        """The warm-up length actually used, in epochs (see ``warmup_epochs``)."""
        if self.warmup_epochs is not None:
            return float(self.warmup_epochs)
        return min(DEFAULT_WARMUP_EPOCHS, self.epochs / 10)

    @property
    def run_optimizer(self) -> str:
        """The optimizer actually used: ``optimizer``, or the loss's default in training
        (:attr:`jaxmetric.losses.registry.LossEntry.optimizer`)."""
        return registry.get(self.loss).optimizer if self.optimizer is None else self.optimizer

    @property
    def base_lr(self) -> float:
        """The usual peak learning rate of the run's optimizer and batch: ``0.1 *
        batch_size / 256`` for SGD (the linear scaling rule), ``1e-3`` for AdamW."""
        if self.run_optimizer == "sgd":
            return SGD_LR_PER_256 * self.batch_size / 256
        return ADAMW_LR

    @property
    def peak_lr(self) -> float:
        """The learning rate reached after warm-up: ``lr``, or :attr:`base_lr` times the
        loss's tuned ``lr_factor`` when the optimizer is the loss's default one (another
        optimizer gets :attr:`base_lr` itself)."""
        if self.lr is not None:
            return float(self.lr)
        spec = registry.get(self.loss)
        factor = spec.lr_factor if self.run_optimizer == spec.optimizer else 1.0
        return self.base_lr * factor

    @property
    def decay(self) -> float:
        """The weight decay actually used."""
        if self.weight_decay is not None:
            return float(self.weight_decay)
        return DEFAULT_WEIGHT_DECAY[self.run_optimizer]

    def check_devices(self, num_devices: int) -> None:
        """Raise if the global batch cannot be split evenly over ``num_devices``."""
        if self.batch_size % num_devices:
            raise ValueError(
                f"batch_size {self.batch_size} is not divisible by the number of devices "
                f"{num_devices}; use a multiple of {num_devices}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Every field by name, as a run's ``config.json`` holds them."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error, missing ones default.

        Configs written by earlier versions still load: ``squared=False``
        (``--euclidean``, triplet) becomes ``distance="l2"``, and ``squared=True`` (the
        default) the triplet's default, ``squared_l2``; the data settings they held
        (``data_dir``, ``max_train``, ``max_test``, ``unseen_classes``) and the ``data``
        section of ``config.json`` belong to :class:`jaxmetric.data.DataConfig`
        (:func:`jaxmetric.train.load_data_config`) and are left out here.
        """
        d = {k: v for k, v in d.items() if k != "data" and k not in LEGACY_DATA_FIELDS}
        if "squared" in d:
            squared = d.pop("squared")
            if squared is False and "distance" not in d:
                d["distance"] = "l2"
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


def parse_options(text: str | None) -> dict[str, Any]:
    """``"alpha=2,beta=50,distance=cosine"`` -> ``{"alpha": 2.0, "beta": 50.0,
    "distance": "cosine"}``: numbers become floats (ints when integral and written
    without a point), ``true`` / ``false`` bools, ``none`` None, anything else a word."""
    if text is None or not text.strip():
        return {}
    options: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key.isidentifier() or not raw:
            raise ValueError(f"loss_options must be k=v,k=v; cannot read {item!r} in {text!r}")
        if key in options:
            raise ValueError(f"loss_options: {key!r} is given twice in {text!r}")
        lowered = raw.lower()
        if lowered in ("true", "false"):
            value: Any = lowered == "true"
        elif lowered == "none":
            value = None
        else:
            try:
                value = int(raw)
            except ValueError:
                try:
                    value = float(raw)
                except ValueError:
                    value = raw
        options[key] = value
    return options
