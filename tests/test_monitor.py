"""Run monitoring: durations, the slow-CPU warning and collapse detection."""

import math

import pytest

from jaxmetric.train import monitor


@pytest.mark.parametrize("seconds,text", [
    (3.21, "3.2 s"), (35, "35 s"), (250, "4 min 10 s"), (7500, "2 h 05 min"),
    (3 * 86400, "3.0 days"),
])
def test_format_duration(seconds, text):
    assert monitor.format_duration(seconds) == text


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_format_duration_rejects_nonsense(bad):
    with pytest.raises(ValueError, match="seconds"):
        monitor.format_duration(bad)


def test_estimate_line_names_time_and_speed():
    line = monitor.estimate_line(0.5, 7200, 256)
    assert "1 h 00 min" in line and "7,200 steps" in line and "512 img/s" in line


def test_slow_cpu_warning_only_without_accelerator_and_when_long():
    hint = "python -m experiments.cifar10 --loss triplet --model homebrew"
    assert monitor.slow_cpu_warning(10 * 3600, accelerator=True, hint=hint) is None
    assert monitor.slow_cpu_warning(60, accelerator=False, hint=hint) is None
    text = monitor.slow_cpu_warning(10 * 3600, accelerator=False, hint=hint)
    assert "no GPU or TPU" in text and "10 h 00 min" in text and hint in text


def test_collapse_by_distances_warns_once():
    detector = monitor.CollapseDetector(patience=100)
    healthy = {"mean_pos_distance": 0.6, "mean_neg_distance": 1.3, "active_fraction": 0.4}
    collapsed = {"mean_pos_distance": 1e-4, "mean_neg_distance": 2e-4, "active_fraction": 0.9}
    assert detector.update(healthy, 10) is None
    text = detector.update(collapsed, 10)
    assert "collapsed" in text and "--lr" in text and "--margin" in text and "semihard" in text
    assert detector.update(collapsed, 10) is None  # once


def test_collapse_by_active_fraction_needs_patience_and_consecutive_steps():
    detector = monitor.CollapseDetector(patience=50)
    stuck = {"mean_pos_distance": 0.2, "mean_neg_distance": 0.3, "active_fraction": 0.995}
    moving = dict(stuck, active_fraction=0.7)
    assert detector.update(stuck, 40) is None
    assert detector.update(moving, 10) is None  # the streak is broken
    assert detector.update(stuck, 40) is None
    text = detector.update(stuck, 10)
    assert text is not None and "50 steps" in text
