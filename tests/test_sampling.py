"""Tests for jaxmetric.train.sampling: shapes, coverage, P x K structure, errors, determinism."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxmetric.train.sampling import class_balanced_batches, shuffled_batches, steps_per_epoch


def rng(seed=0):
    return np.random.default_rng(seed)


def check_pk(batches, labels, p, k):
    """Every batch is P blocks of K same-label indices, the P labels distinct."""
    for batch in batches:
        blocks = labels[batch].reshape(p, k)
        assert (blocks == blocks[:, :1]).all(), "a block mixes labels"
        assert len(np.unique(blocks[:, 0])) == p, "a label appears in two blocks"


# ----------------------------------------------------------------------------- shuffled


def test_shuffled_batches_shape_range_and_coverage():
    batches = shuffled_batches(rng(), 103, 10)
    assert batches.shape == (10, 10) and batches.dtype == np.int32
    assert batches.min() >= 0 and batches.max() < 103
    assert len(np.unique(batches)) == 100  # each index at most once, 3 dropped


def test_shuffled_batches_drop_different_remainders_and_shuffle():
    a, b = shuffled_batches(rng(1), 103, 10), shuffled_batches(rng(2), 103, 10)
    assert not np.array_equal(a, b)
    assert not np.array_equal(np.sort(a.ravel()), np.arange(100))  # not always the first 100


def test_shuffled_batches_deterministic():
    np.testing.assert_array_equal(shuffled_batches(rng(5), 50, 7), shuffled_batches(rng(5), 50, 7))
    gen = rng(5)
    first, second = shuffled_batches(gen, 50, 7), shuffled_batches(gen, 50, 7)
    assert not np.array_equal(first, second)  # consecutive epochs differ


@pytest.mark.parametrize(
    "n,b,match", [(10, 11, "larger than"), (10, 0, ">= 1"), (0, 1, "larger than")]
)
def test_shuffled_batches_errors(n, b, match):
    with pytest.raises(ValueError, match=match):
        shuffled_batches(rng(), n, b)


def test_steps_per_epoch():
    assert steps_per_epoch(50000, 256) == 195
    assert steps_per_epoch(8, 8) == 1
    with pytest.raises(ValueError):
        steps_per_epoch(7, 8)


# ----------------------------------------------------------------------------- P x K


def test_class_balanced_structure_and_coverage():
    labels = np.repeat(np.arange(10), 50)
    rng(0).shuffle(labels)
    batches = class_balanced_batches(rng(0), labels, batch_size=40, classes_per_batch=4)
    assert batches.shape == (500 // 40, 40) and batches.dtype == np.int32
    assert batches.min() >= 0 and batches.max() < len(labels)
    check_pk(batches, labels, 4, 10)
    for batch in batches:
        assert len(np.unique(batch)) == 40  # no repeats within a batch
    # Per-class queues without replacement: almost every drawn index is distinct.
    assert len(np.unique(batches)) >= 0.95 * batches.size


def test_class_balanced_arbitrary_labels_and_imbalance():
    labels = np.concatenate([np.full(40, 7), np.full(25, -3), np.full(12, 100), np.full(3, 42)])
    batches = class_balanced_batches(rng(3), labels, batch_size=10, classes_per_batch=2)
    assert batches.shape == (8, 10)
    check_pk(batches, labels, 2, 5)
    for batch in batches:
        for block in batch.reshape(2, 5):
            if labels[block[0]] == 42:  # 3 examples, K=5: all of them plus 2 repeats
                assert set(block) == set(np.flatnonzero(labels == 42))
            else:
                assert len(set(block)) == 5


def test_class_balanced_refill_never_repeats_within_block():
    labels = np.repeat(np.arange(2), 7)  # K=4 does not divide 7: queues refill mid-block
    batches = class_balanced_batches(rng(9), labels, batch_size=8, classes_per_batch=2)
    assert batches.shape == (1, 8)
    more = np.concatenate(
        [class_balanced_batches(rng(s), np.repeat(np.arange(2), 7 * 5), 8, 2) for s in range(5)]
    )
    check_pk(more, np.repeat(np.arange(2), 35), 2, 4)
    for block in more.reshape(-1, 4):
        assert len(set(block)) == 4


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 30), min_size=1, max_size=8),
    p=st.integers(1, 4),
    k=st.integers(2, 6),
    seed=st.integers(0, 2**16),
)
def test_class_balanced_properties(sizes, p, k, seed):
    labels = np.repeat(np.arange(len(sizes)), sizes)
    batch_size = p * k
    if p > len(sizes) or batch_size > len(labels):
        with pytest.raises(ValueError):
            class_balanced_batches(rng(seed), labels, batch_size, p)
        return
    batches = class_balanced_batches(rng(seed), labels, batch_size, p)
    assert batches.shape == (len(labels) // batch_size, batch_size)
    check_pk(batches, labels, p, k)
    for block in batches.reshape(-1, k):
        n_class = sizes[labels[block[0]]]
        assert len(set(block)) == min(k, n_class)
    np.testing.assert_array_equal(batches, class_balanced_batches(rng(seed), labels, batch_size, p))


def test_class_balanced_deterministic():
    labels = np.repeat(np.arange(5), 20)
    a = class_balanced_batches(rng(4), labels, 20, 5)
    np.testing.assert_array_equal(a, class_balanced_batches(rng(4), labels, 20, 5))
    assert not np.array_equal(a, class_balanced_batches(rng(5), labels, 20, 5))


@pytest.mark.parametrize(
    "batch_size,p,match",
    [
        (30, 4, "not divisible"),
        (4, 4, "at least 2"),
        (12, 6, "exceeds the 5 classes"),
        (200, 5, "larger than"),
        (10, 0, ">= 1"),
    ],
)
def test_class_balanced_errors(batch_size, p, match):
    labels = np.repeat(np.arange(5), 20)
    with pytest.raises(ValueError, match=match):
        class_balanced_batches(rng(), labels, batch_size, p)


def test_class_balanced_rejects_float_labels():
    with pytest.raises(ValueError, match="integer"):
        class_balanced_batches(rng(), np.zeros(10, np.float32), 4, 2)


# ------------------------------------------------- random or class-balanced: the rule


def test_random_batch_positives_matches_a_simulation():
    from jaxmetric.train.sampling import random_batch_positives

    labels = np.repeat(np.arange(300), 20)  # 300 classes x 20 images
    mean, without = random_batch_positives(labels, 256)
    assert mean == pytest.approx(255 * 19 / 5999)
    g = np.random.default_rng(0)
    sim_mean, sim_without = [], []
    for _ in range(200):
        batch = labels[g.permutation(len(labels))[:256]]
        counts = np.bincount(batch, minlength=300)[batch] - 1
        sim_mean.append(counts.mean())
        sim_without.append((counts == 0).mean())
    assert np.mean(sim_mean) == pytest.approx(mean, rel=0.05)
    assert np.mean(sim_without) == pytest.approx(without, abs=0.02)


def test_auto_chooses_class_balanced_batches_only_when_random_ones_lack_positives():
    from jaxmetric.train.sampling import choose_classes_per_batch

    cifar = np.repeat(np.arange(10), 1000)
    choice = choose_classes_per_batch(cifar, 256, "auto")
    assert choice.classes_per_batch is None and "25.5 positives per anchor" in choice.reason
    many = np.repeat(np.arange(300), 20)
    choice = choose_classes_per_batch(many, 256, "auto")
    assert choice.classes_per_batch == 64 and "64 classes x 4 images" in choice.reason
    assert choice.without_positive > 0.4
    # a batch 4 does not divide: the smallest K >= 4 that does
    assert choose_classes_per_batch(many, 250, "auto").classes_per_batch == 50
    # proxy / classification losses need no positives in the batch
    assert choose_classes_per_batch(many, 256, "auto",
                                    needs_positives=False).classes_per_batch is None
    # explicit settings are kept
    assert choose_classes_per_batch(many, 256, None).classes_per_batch is None
    assert choose_classes_per_batch(cifar, 256, 8).classes_per_batch == 8
    # too few classes for any split of the batch into >= 4 images each: random
    few = np.repeat(np.arange(3), 2)
    assert choose_classes_per_batch(few, 6, "auto").classes_per_batch is None


def test_fit_logs_the_choice_and_warns_about_anchors_without_positives(caplog):
    from jaxmetric.train import sampling
    from jaxmetric.train.config import TrainConfig
    from jaxmetric.train.loop import _log_batches, batch_choice, epoch_indices

    labels = np.repeat(np.arange(300), 20).astype(np.int32)
    config = TrainConfig(loss="triplet", batch_size=256, classes_per_batch=None)
    with caplog.at_level("INFO", logger="jaxmetric"):
        _log_batches(batch_choice(config, labels), pairs=True)
    assert "have no positive" in caplog.text and "random batches" in caplog.text
    auto = TrainConfig(loss="triplet", batch_size=256)
    assert auto.classes_per_batch == "auto"
    indices = epoch_indices(auto, labels, 0)
    per_batch = [len(np.unique(labels[b])) for b in indices]
    assert set(per_batch) == {64}
    assert isinstance(batch_choice(auto, labels), sampling.BatchChoice)
