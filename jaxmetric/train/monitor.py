"""Watching a training run from its step metrics: time estimates and collapse warnings.

Pure host-side helpers that :func:`jaxmetric.train.fit` feeds with the metrics it
already fetches every ``log_every`` steps, so watching costs no extra device work.

**Time estimate.** The first step of a run compiles, so its time says nothing about
the rest; :func:`estimate_line` takes the seconds per step measured over the next few
steps and the number of steps left. On a machine without an accelerator a full-size
run can take days: :func:`slow_cpu_warning` says so, with a smaller command to try.

**Collapse.** Embeddings *collapse* when the network maps every image to (nearly) the
same point: all distances go to 0, the contrastive loss sits at ``margin**power`` per
negative pair, every triplet is active with loss ``margin``, and nothing is learned
any more. Two symptoms, either of which :class:`CollapseDetector` reports once:

* the mean positive and the mean negative distance are both below ``distance_floor``
  (for unit-norm embeddings random points sit at distance ~1.4, squared ~2);
* the active fraction (pairs or triplets with a non-zero loss) stays at or above
  ``active_ceiling`` for ``patience`` consecutive steps (healthy runs start below it:
  at initialisation most negatives are already beyond the margin).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

__all__ = ["CollapseDetector", "COLLAPSE_ADVICE", "estimate_line", "format_duration",
           "slow_cpu_warning"]

COLLAPSE_ADVICE = ("what usually helps: a lower learning rate (--lr), a smaller margin "
                   "(--margin), or semi-hard mining (--loss triplet --mining semihard)")

SLOW_RUN_SECONDS = 30 * 60
"""Without an accelerator, runs estimated to take longer than this get a warning."""


def format_duration(seconds: float) -> str:
    """``"2 h 05 min"``, ``"4 min 10 s"``, ``"35 s"``, ``"3.2 days"``."""
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"seconds must be finite and >= 0; got {seconds}")
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        hours, rest = divmod(int(round(seconds)), 3600)
        return f"{hours} h {rest // 60:02d} min"
    if seconds >= 60:
        minutes, rest = divmod(int(round(seconds)), 60)
        return f"{minutes} min {rest:02d} s"
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"


def estimate_line(seconds_per_step: float, steps_left: int, images_per_step: int) -> str:
    """One line: the estimated training time left and the speed it is based on."""
    total = seconds_per_step * steps_left
    return (f"estimated training time left: {format_duration(total)} for {steps_left:,} steps "
            f"({seconds_per_step:.3f} s/step, {images_per_step / seconds_per_step:,.0f} img/s; "
            "evaluation not included)")


def slow_cpu_warning(seconds_left: float, *, accelerator: bool, hint: str | None = None,
                     threshold: float | None = None) -> str | None:
    """A warning when a run without GPU/TPU would take longer than ``threshold``
    (default :data:`SLOW_RUN_SECONDS`)."""
    threshold = SLOW_RUN_SECONDS if threshold is None else threshold
    if accelerator or seconds_left <= threshold:
        return None
    text = (f"no GPU or TPU found: JAX runs on the CPU, and this run would take about "
            f"{format_duration(seconds_left)}.")
    if hint:
        text += f" For a short CPU run try:\n    {hint}"
    return text


class CollapseDetector:
    """Feed it the averaged metrics of each fetched chunk of steps; it warns once.

    Args:
      patience: consecutive steps with ``active_fraction >= active_ceiling`` that count
        as "stuck".
      distance_floor: both mean distances below this count as collapsed at once.
      active_ceiling: see ``patience``.
    """

    def __init__(self, *, patience: int, distance_floor: float = 0.01,
                 active_ceiling: float = 0.99):
        if patience < 1:
            raise ValueError(f"patience must be >= 1; got {patience}")
        self.patience = patience
        self.distance_floor = distance_floor
        self.active_ceiling = active_ceiling
        self.stuck_steps = 0
        self.warned = False

    def update(self, metrics: Mapping[str, float], steps: int) -> str | None:
        """``metrics``: means over the last ``steps`` steps of ``mean_pos_distance``,
        ``mean_neg_distance`` and ``active_fraction``. Returns the warning the first
        time a collapse is seen, else None."""
        pos, neg = metrics["mean_pos_distance"], metrics["mean_neg_distance"]
        active = metrics["active_fraction"]
        self.stuck_steps = self.stuck_steps + steps if active >= self.active_ceiling else 0
        if self.warned:
            return None
        if pos < self.distance_floor and neg < self.distance_floor:
            why = (f"mean positive distance {pos:.4f} and mean negative distance {neg:.4f} "
                   "are both near 0")
        elif self.stuck_steps >= self.patience:
            why = (f"{active:.1%} of pairs/triplets have been active for "
                   f"{self.stuck_steps} steps")
        else:
            return None
        self.warned = True
        return f"the embeddings look collapsed: {why}; {COLLAPSE_ADVICE}"
