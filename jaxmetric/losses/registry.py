"""Every loss by name: its function and how a training run drives it.

One table, :data:`LOSSES`, maps each name a user types (``--loss NAME``) to a
:class:`LossEntry`: the loss function and what training needs to know about it that
the function's signature does not say (which keyword the run's margin sets, the margin
and distance a run uses by default, the argument the run learns with the network, and
at what learning-rate multiplier). The command line, the config's checks and the train
step all read this table; nothing builds a function's name from a string.

The training defaults are the settings a run uses when no flag overrides them; the
loss functions keep their papers' defaults. For example the contrastive loss trains
on plain Euclidean distances with margin 1.0 (pytorch-metric-learning's defaults) and
the triplet loss on squared ones with FaceNet's margin 0.2; the proxies of Proxy-Anchor
and Proxy-NCA learn 100 times faster than the network, as in Kim et al. 2020 and
Movshovitz-Attias et al. 2017, and SoftTriple's centers too (Qian et al. 2019 train
them at 100 times the network's learning rate). Sub-center ArcFace and SoftTriple learn
``K`` vectors per class: :attr:`LossEntry.centers_arg` names the keyword that says how
many, so that a run makes ``(C*K, D)`` of them.

Example::

    >>> from jaxmetric.losses import registry
    >>> entry = registry.get("triplet")
    >>> entry.fn.__name__, entry.margin_arg, entry.margin, entry.distance
    ('triplet_loss', 'margin', 0.2, 'squared_l2')
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from types import MappingProxyType

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

__all__ = ["LOSSES", "NAMES", "LossEntry", "get"]


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
      centers_arg: the keyword giving the number ``K`` of learned vectors per class
        (the ``weights`` are then ``(C*K, D)``), or None: one per class.
    """

    fn: Callable
    margin_arg: str | None = None
    margin: float | None = None
    distance: str | None = None
    learned: str | None = None
    pairs: bool = True
    lr_multiplier: float = 1.0
    centers_arg: str | None = None

    @property
    def name(self) -> str:
        """The loss's name (``"triplet"`` for :func:`~jaxmetric.losses.triplet_loss`)."""
        return self.fn.__name__.removesuffix("_loss")

    @property
    def options(self) -> frozenset[str]:
        """The function's keyword-only arguments."""
        return frozenset(n for n, p in inspect.signature(self.fn).parameters.items()
                         if p.kind is inspect.Parameter.KEYWORD_ONLY)

    @property
    def reduction(self) -> bool:
        """Whether a run chooses the loss's ``reduction`` (the hinge losses whose
        ``mean`` and ``mean_nonzero`` differ in training: contrastive and triplet)."""
        return self.fn in (contrastive_loss, triplet_loss)

    @property
    def temperature(self) -> bool:
        """Whether the loss takes ``temperature=``."""
        return "temperature" in self.options

    @property
    def key(self) -> bool:
        """Whether the loss takes a PRNG ``key=`` (the train step passes one per step)."""
        return "key" in self.options

    def num_centers(self, kwargs: Mapping) -> int:
        """``K``, the learned vectors per class with the keyword arguments ``kwargs``:
        ``kwargs[centers_arg]`` or the function's default; 1 without ``centers_arg``."""
        if self.centers_arg is None:
            return 1
        default = inspect.signature(self.fn).parameters[self.centers_arg].default
        return check_positive_int(self.centers_arg, kwargs.get(self.centers_arg, default))


def _entries(*entries: LossEntry) -> Mapping[str, LossEntry]:
    return MappingProxyType({e.name: e for e in entries})


LOSSES: Mapping[str, LossEntry] = _entries(
    LossEntry(contrastive_loss, "margin", 1.0, distance="l2"),
    LossEntry(triplet_loss, "margin", 0.2, distance="squared_l2"),
    LossEntry(supcon_loss),
    LossEntry(ntxent_loss),
    LossEntry(multi_similarity_loss),
    LossEntry(circle_loss, "m"),
    LossEntry(lifted_structure_loss, "neg_margin", distance="l2"),
    LossEntry(margin_loss, "margin", distance="l2", learned="beta"),
    LossEntry(proxy_anchor_loss, "margin", learned="proxies", pairs=False,
              lr_multiplier=100.0),
    LossEntry(proxy_nca_loss, learned="proxies", pairs=False, lr_multiplier=100.0),
    LossEntry(arcface_loss, "margin", learned="weights", pairs=False),
    LossEntry(cosface_loss, "margin", learned="weights", pairs=False),
    LossEntry(normalized_softmax_loss, learned="weights", pairs=False),
    LossEntry(subcenter_arcface_loss, "margin", learned="weights", pairs=False,
              centers_arg="centers"),
    LossEntry(soft_triple_loss, "margin", learned="weights", pairs=False,
              lr_multiplier=100.0, centers_arg="centers"),
    LossEntry(snr_contrastive_loss, "margin"),
    LossEntry(fastap_loss, pairs=False),
    LossEntry(smooth_ap_loss, pairs=False),
)
"""Every loss a run can train with, by name, in the order the documentation lists them."""

NAMES: tuple[str, ...] = tuple(LOSSES)
"""The loss names, :data:`LOSSES`' keys."""


def get(name: str) -> LossEntry:
    """The :class:`LossEntry` of ``name``; a clear error naming the choices otherwise."""
    check_choice("loss", name, NAMES)
    return LOSSES[name]
