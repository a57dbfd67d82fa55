"""Every loss by name: its function and how a training run drives it.

One table, :data:`LOSSES`, maps each name a user types (``--loss NAME``) to a
:class:`LossEntry`: the loss function and what training needs to know about it that
the function's signature does not say (which keyword the run's margin sets, the margin
and distance a run uses by default, the argument the run learns with the network, and
at what learning-rate multiplier). The command line, the config's checks and the train
step all read this table; nothing builds a function's name from a string.

The training defaults are the settings a run uses when no flag overrides them; the loss
functions keep their papers' defaults. Where the paper's settings train poorly in this
library's recipes, an entry holds the settings tuned for it on a validation split
(``docs/tuning.md``): its optimizer, a learning-rate factor, the margin, the multiplier
of its learned argument and other keywords (:attr:`LossEntry.options`). For example the
contrastive loss trains on plain Euclidean distances with margin 1.0
(pytorch-metric-learning's defaults) and the triplet loss on squared ones with FaceNet's
margin 0.2; the proxies of Proxy-Anchor and Proxy-NCA learn 100 times faster than the
network, as in Kim et al. 2020 and Movshovitz-Attias et al. 2017, and SoftTriple's
centers too (Qian et al. 2019 train them at 100 times the network's learning rate).
Sub-center ArcFace and SoftTriple learn ``K`` vectors per class:
:attr:`LossEntry.centers_arg` names the keyword that says how many, so that a run makes
``(C*K, D)`` of them.

**Search spaces.** Each entry may also declare the ranges its hyper-parameters are tuned
over (``search_space``: a name -> :class:`Range` or :class:`Choice` mapping), read by
:mod:`jaxmetric.tune`, which tunes every loss the same way on a validation split (the
protocol of Musgrave et al. 2020). It is data only; :attr:`LossEntry.tuning_space` adds
what every loss shares (:data:`GENERIC_SPACE`: the optimizer and its learning rate, and
for a loss with a learned argument its learning-rate multiplier,
:data:`LEARNED_LR_RANGE`), so an entry without a space of its own is still tuned. A name
is a :class:`~jaxmetric.train.config.TrainConfig` field (``margin`` is the entry's
``margin_arg``, ``temperature``, ``pos_margin``, ``loss_lr_multiplier``, ``optimizer``),
``lr_factor`` (the peak learning rate in units of the run's default one,
:meth:`~jaxmetric.train.config.TrainConfig.peak_lr`: ``0.1 * batch / 256`` for SGD,
``1e-3`` for AdamW, so one range serves both optimizers and every batch size), or another
keyword-only argument of the loss function (set through ``loss_options``).

Example::

    >>> from jaxmetric.losses import registry
    >>> entry = registry.get("triplet")
    >>> entry.fn.__name__, entry.margin_arg, entry.margin, entry.distance
    ('triplet_loss', 'margin', 0.2, 'squared_l2')
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from jaxmetric.losses.contrastive import contrastive_loss, snr_contrastive_loss
from jaxmetric.losses.fastap import fastap_loss
from jaxmetric.losses.margin import margin_loss
from jaxmetric.losses.margin_softmax import (
    arcface_loss,
    cosface_loss,
    normalized_softmax_loss,
    subcenter_arcface_loss,
)
from jaxmetric.losses.proxy import proxy_anchor_loss, proxy_nca_loss
from jaxmetric.losses.smooth_ap import smooth_ap_loss
from jaxmetric.losses.soft_triple import soft_triple_loss
from jaxmetric.losses.softmax import ntxent_loss, supcon_loss
from jaxmetric.losses.triplet import triplet_loss
from jaxmetric.losses.weighted_pair import (
    circle_loss,
    lifted_structure_loss,
    multi_similarity_loss,
)
from jaxmetric.utils import check_choice, check_positive_int

__all__ = ["GENERIC_SPACE", "LEARNED_LR_RANGE", "LOSSES", "NAMES", "STEP_KEYWORDS", "Choice",
           "LossEntry", "Range", "get"]

STEP_KEYWORDS = frozenset({"valid", "axis_name", "ref_embeddings", "ref_labels", "ref_valid",
                           "key"})
"""Keyword arguments the train step passes the loss itself (never a run's setting)."""


@dataclasses.dataclass(frozen=True)
class Range:
    """A number tuned in ``[low, high]``, uniformly or (``log``) log-uniformly.

    >>> Range(0.1, 0.7).low, Range(8.0, 64.0, log=True).log
    (0.1, True)
    """

    low: float
    high: float
    log: bool = False

    def __post_init__(self):
        for name in ("low", "high"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise ValueError(f"Range.{name} must be a finite number; got {value!r}")
        if not self.low < self.high:
            raise ValueError(f"Range needs low < high; got [{self.low}, {self.high}]")
        if self.log and self.low <= 0:
            raise ValueError(f"a log Range needs low > 0; got {self.low}")


@dataclasses.dataclass(frozen=True)
class Choice:
    """A setting tuned among ``options`` (strings, numbers or bools).

    >>> Choice(("sgd", "adamw")).options
    ('sgd', 'adamw')
    """

    options: tuple

    def __post_init__(self):
        if not isinstance(self.options, tuple) or len(self.options) < 2:
            raise ValueError(f"Choice needs a tuple of at least 2 options; got {self.options!r}")
        if len(set(self.options)) != len(self.options):
            raise ValueError(f"Choice repeats an option: {self.options!r}")


GENERIC_SPACE: Mapping[str, Range | Choice] = MappingProxyType({
    "optimizer": Choice(("sgd", "adamw")),
    "lr_factor": Range(0.1, 3.0, log=True),
})
"""What every loss is tuned over: the optimizer, and the peak learning rate from a tenth
to three times the run's default (``lr_factor``, see the module docstring)."""

LEARNED_LR_RANGE = Range(1.0, 300.0, log=True)
"""The learning-rate multiplier of a learned argument (proxies, class weights, beta),
tuned for every loss that has one unless its entry declares its own range."""


@dataclasses.dataclass(frozen=True)
class LossEntry:
    """How a run drives one loss.

    Attributes:
      fn: the loss function (``jaxmetric.losses.<name>_loss``).
      margin_arg: the keyword that a run's ``margin`` sets (None: the loss has none).
      margin: its default in training (None: the function's own default).
      distance: the distance a run uses by default, for the losses that take
        ``distance=`` (None for the losses that compare cosines themselves).
      learned: the positional argument the run learns with the network (``"proxies"``,
        ``"weights"`` (C, D) or ``"beta"`` (C,)), or None.
      pairs: a pair-based loss: takes a reference set, so a cross-batch memory.
      lr_multiplier: default learning-rate multiplier of the learned argument.
      search_space: the ranges this loss's own hyper-parameters are tuned over (see the
        module docstring), or None: only :data:`GENERIC_SPACE` (and the learned
        argument's multiplier).
      centers_arg: the keyword giving the number ``K`` of learned vectors per class
        (the ``weights`` are then ``(C*K, D)``), or None: one per class.
      optimizer: the optimizer a run uses by default (``"sgd"`` or ``"adamw"``).
      lr_factor: the default peak learning rate in units of the optimizer's usual one
        (``0.1 * batch / 256`` for SGD, ``1e-3`` for AdamW), applied when the run's
        optimizer is ``optimizer`` (another optimizer gets its usual rate).
      options: training defaults of the function's other keyword-only arguments
        (``{"scale": 30.0}``): a run passes them unless ``loss_options`` (or
        ``temperature``) sets them; the function's own defaults stay the paper's.
    """

    fn: Callable
    margin_arg: str | None = None
    margin: float | None = None
    distance: str | None = None
    learned: str | None = None
    pairs: bool = True
    lr_multiplier: float = 1.0
    centers_arg: str | None = None
    optimizer: str = "sgd"
    lr_factor: float = 1.0
    options: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: MappingProxyType({}), hash=False)
    search_space: Mapping[str, Range | Choice] | None = dataclasses.field(
        default=None, hash=False)

    def __post_init__(self):
        check_choice("optimizer", self.optimizer, GENERIC_SPACE["optimizer"].options)
        if not (isinstance(self.lr_factor, (int, float)) and math.isfinite(self.lr_factor)
                and self.lr_factor > 0):
            raise ValueError(f"lr_factor must be a finite number > 0; got {self.lr_factor!r}")
        unknown = set(self.options) - self.options_allowed
        if unknown:
            raise ValueError(f"options: {self.fn.__name__} has no keyword "
                             f"{', '.join(map(repr, sorted(unknown)))}")
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))
        if self.search_space is not None:
            bad = {k: v for k, v in self.search_space.items()
                   if not isinstance(k, str) or not isinstance(v, (Range, Choice))}
            if bad:
                raise TypeError(f"search_space maps names to Range or Choice; got {bad!r}")
            object.__setattr__(self, "search_space", MappingProxyType(dict(self.search_space)))

    @property
    def tuning_space(self) -> Mapping[str, Range | Choice]:
        """Everything this loss is tuned over: :data:`GENERIC_SPACE`, the learned
        argument's multiplier (:data:`LEARNED_LR_RANGE`) where it has one, and its own
        ``search_space`` (which wins where the names meet)."""
        space = dict(GENERIC_SPACE)
        if self.learned is not None:
            space["loss_lr_multiplier"] = LEARNED_LR_RANGE
        return MappingProxyType(space | dict(self.search_space or {}))

    @property
    def name(self) -> str:
        """The loss's name (``"triplet"`` for :func:`~jaxmetric.losses.triplet_loss`)."""
        return self.fn.__name__.removesuffix("_loss")

    @property
    def keywords(self) -> frozenset[str]:
        """The function's keyword-only arguments."""
        return frozenset(n for n, p in inspect.signature(self.fn).parameters.items()
                         if p.kind is inspect.Parameter.KEYWORD_ONLY)

    @property
    def options_allowed(self) -> frozenset[str]:
        """The keywords :attr:`options` may give defaults to: the function's keyword-only
        arguments but the margin (:attr:`margin`) and those the train step passes."""
        return self.keywords - STEP_KEYWORDS - {self.margin_arg}

    @property
    def reduction(self) -> bool:
        """Whether a run chooses the loss's ``reduction`` (the hinge losses whose
        ``mean`` and ``mean_nonzero`` differ in training: contrastive, SNR contrastive
        and triplet)."""
        return self.fn in (contrastive_loss, snr_contrastive_loss, triplet_loss)

    @property
    def temperature(self) -> bool:
        """Whether the loss takes ``temperature=``."""
        return "temperature" in self.keywords

    @property
    def key(self) -> bool:
        """Whether the loss takes a PRNG ``key=`` (the train step passes one per step)."""
        return "key" in self.keywords

    def num_centers(self, kwargs: Mapping) -> int:
        """``K``, the learned vectors per class with the keyword arguments ``kwargs``:
        ``kwargs[centers_arg]`` or the function's default; 1 without ``centers_arg``."""
        if self.centers_arg is None:
            return 1
        default = inspect.signature(self.fn).parameters[self.centers_arg].default
        return check_positive_int(self.centers_arg, kwargs.get(self.centers_arg, default))


def _entries(*entries: LossEntry) -> Mapping[str, LossEntry]:
    return MappingProxyType({e.name: e for e in entries})


# The entries with an optimizer, lr_factor or options hold the settings tuned for them
# (docs/tuning.md, "Tuned training defaults"): 8 trials of the CPU recipe's network and batch
# on a validation split of the training images, values rounded to 3 figures.
LOSSES: Mapping[str, LossEntry] = _entries(
    LossEntry(contrastive_loss, "margin", 1.0, distance="l2",
              search_space={"margin": Range(0.3, 1.6), "pos_margin": Range(0.0, 0.3)}),
    LossEntry(triplet_loss, "margin", 0.2, distance="squared_l2",
              search_space={"margin": Range(0.02, 1.0, log=True)}),
    LossEntry(supcon_loss, search_space={"temperature": Range(0.02, 0.5, log=True)}),
    LossEntry(ntxent_loss, search_space={"temperature": Range(0.02, 0.5, log=True)}),
    LossEntry(multi_similarity_loss, optimizer="adamw", lr_factor=0.777,
              options={"alpha": 2.56, "beta": 24.1, "base": 0.588},
              search_space={"alpha": Range(0.5, 10.0, log=True),
                            "beta": Range(10.0, 80.0, log=True), "base": Range(0.2, 0.8)}),
    LossEntry(circle_loss, "m", 0.172, optimizer="adamw", lr_factor=1.63,
              options={"gamma": 8.37},  # tuned; the study's best gamma lay near 8, so from 4
              search_space={"margin": Range(0.1, 0.5), "gamma": Range(4.0, 256.0, log=True)}),
    LossEntry(lifted_structure_loss, "neg_margin", distance="l2",
              search_space={"margin": Range(0.3, 1.6)}),
    LossEntry(margin_loss, "margin", 0.357, distance="l2", learned="beta", lr_multiplier=1.33,
              lr_factor=1.53, options={"sampling": "distance_weighted"},
              search_space={"margin": Range(0.05, 0.5)}),
    LossEntry(proxy_anchor_loss, "margin", learned="proxies", pairs=False,
              lr_multiplier=100.0,
              search_space={"margin": Range(0.0, 0.3), "alpha": Range(8.0, 64.0, log=True),
                            "loss_lr_multiplier": Range(10.0, 1000.0, log=True)}),
    LossEntry(proxy_nca_loss, learned="proxies", pairs=False, lr_multiplier=100.0,
              search_space={"softmax_scale": Range(1.0, 32.0, log=True),
                            "loss_lr_multiplier": Range(10.0, 1000.0, log=True)}),
    LossEntry(arcface_loss, "margin", 0.354, learned="weights", pairs=False,
              lr_multiplier=22.4, optimizer="adamw", lr_factor=0.777,
              options={"scale": 30.6, "large_angle": "threshold"},
              search_space={"margin": Range(0.1, 0.7), "scale": Range(8.0, 64.0, log=True)}),
    LossEntry(cosface_loss, "margin", learned="weights", pairs=False,
              search_space={"margin": Range(0.1, 0.5), "scale": Range(8.0, 64.0, log=True)}),
    LossEntry(normalized_softmax_loss, learned="weights", pairs=False,
              search_space={"temperature": Range(0.01, 0.2, log=True)}),
    LossEntry(subcenter_arcface_loss, "margin", 0.354, learned="weights", pairs=False,
              centers_arg="centers", lr_multiplier=22.4, optimizer="adamw", lr_factor=0.777,
              options={"scale": 30.6, "centers": 5, "large_angle": "threshold"},
              search_space={"margin": Range(0.1, 0.7), "scale": Range(8.0, 64.0, log=True),
                            "centers": Choice((2, 3, 5))}),
    LossEntry(soft_triple_loss, "margin", learned="weights", pairs=False,
              lr_multiplier=100.0, centers_arg="centers",
              search_space={"margin": Range(0.0, 0.3), "la": Range(4.0, 40.0, log=True),
                            "gamma": Range(0.03, 0.3, log=True), "centers": Choice((2, 5, 10)),
                            "loss_lr_multiplier": Range(10.0, 1000.0, log=True)}),
    LossEntry(snr_contrastive_loss, "margin", search_space={"margin": Range(0.2, 1.5)}),
    LossEntry(fastap_loss, pairs=False, search_space={"num_bins": Choice((5, 10, 20, 40))}),
    LossEntry(smooth_ap_loss, pairs=False,
              search_space={"temperature": Range(0.001, 0.1, log=True)}),
)
"""Every loss a run can train with, by name, in the order the documentation lists them."""

NAMES: tuple[str, ...] = tuple(LOSSES)
"""The loss names, :data:`LOSSES`' keys."""


def get(name: str) -> LossEntry:
    """The :class:`LossEntry` of ``name``; a clear error naming the choices otherwise."""
    check_choice("loss", name, NAMES)
    return LOSSES[name]
