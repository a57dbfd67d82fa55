"""jaxmetric.data.splits: class-disjoint splits, their choice by count or by name, and errors."""

import numpy as np
import pytest

from jaxmetric.data import Dataset, Split, channel_stats, splits

NAMES = tuple(f"c{i}" for i in range(6))


def _dataset(mean=None, std=None, per_class=(4, 2)):
    """6 classes; class c's pixels are all 10 * c + 1 (train) or 10 * c + 2 (test), so
    every image says where it came from."""
    rng = np.random.default_rng(0)
    parts = {}
    for split, n, offset in (("train", per_class[0], 1), ("test", per_class[1], 2)):
        labels = rng.permutation(np.repeat(np.arange(len(NAMES)), n)).astype(np.int32)
        images = np.broadcast_to((10 * labels + offset).astype(np.uint8)[:, None, None, None],
                                 (len(labels), 5, 7, 3)).copy()
        parts[split] = Split(images, labels)
    return Dataset(parts["train"], parts["test"], NAMES, mean=mean, std=std,
                   description="toy")


def _origin(images):
    """(class, offset) of toy images."""
    v = images[:, 0, 0, 0].astype(int)
    return v // 10, v % 10


def test_choose_classes_by_count_and_by_name():
    assert splits.choose_classes(NAMES, train_classes=2) == (NAMES[:2], NAMES[2:])
    assert splits.choose_classes(NAMES, unseen_classes=2) == (NAMES[:4], NAMES[4:])
    # By name: returned in the source's order whatever the order given.
    assert splits.choose_classes(NAMES, train_class_list=["c3", "c0"]) == (
        ("c0", "c3"), ("c1", "c2", "c4", "c5"))
    assert splits.choose_classes(NAMES, train_class_list=["c5", "c1"],
                                 test_class_list=["c2", "c0"]) == (("c1", "c5"), ("c0", "c2"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "one way"),
    (dict(train_classes=2, unseen_classes=2), "one way"),
    (dict(train_classes=1), r"out of range.*\[2, 4\]"),
    (dict(train_classes=5), "out of range"),
    (dict(unseen_classes=1), "out of range"),
    (dict(unseen_classes=5), "out of range"),
    (dict(train_classes=2.0), "must be an int"),
    (dict(train_class_list=["c0", "bird"]), r"unknown classes \['bird'\]"),
    (dict(train_class_list=["c0", "c1"], test_class_list=["c2", "zebra"]), "zebra"),
    (dict(train_class_list=["c0", "c1", "c0"]), "more than once"),
    (dict(train_class_list=["c0", "c1"], test_class_list=["c1", "c2"]),
     r"\['c1'\] are in both"),
    (dict(train_class_list=["c0"]), "1 training class"),
    (dict(train_class_list=["c0", "c1"], test_class_list=["c2"]), "1 held-out class"),
    (dict(test_class_list=["c0", "c1"]), "needs train_class_list"),
])
def test_choose_classes_errors_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        splits.choose_classes(NAMES, **kwargs)


def test_split_is_class_disjoint_relabelled_and_deterministic():
    dataset = _dataset()
    split = splits.split_classes(dataset, ("c1", "c4"), ("c0", "c2", "c5"))
    assert split.train.class_names == ("c1", "c4")
    assert split.eval.class_names == ("c0", "c2", "c5")
    # Training: only training images of the training classes, labels renumbered.
    cls, offset = _origin(split.train.train.images)
    assert set(offset) == {1} and set(cls) == {1, 4}
    np.testing.assert_array_equal(np.array([1, 4])[split.train.train.labels], cls)
    assert len(split.train.train) == 2 * 4 and len(split.train.test) == 2 * 2
    # Held out: queries are their test images, the gallery their training images.
    cls, offset = _origin(split.eval.test.images)
    assert set(offset) == {2}
    np.testing.assert_array_equal(np.array([0, 2, 5])[split.eval.test.labels], cls)
    cls, offset = _origin(split.eval.train.images)
    assert set(offset) == {1} and set(cls) == {0, 2, 5}
    assert split.has_gallery
    # The order within a split is kept, and the same call gives the same arrays.
    again = splits.split_classes(dataset, ("c1", "c4"), ("c0", "c2", "c5"))
    np.testing.assert_array_equal(again.train.train.images, split.train.train.images)
    np.testing.assert_array_equal(again.eval.test.labels, split.eval.test.labels)
    assert split.describe() == {
        "protocol": "class-disjoint", "train_classes": ["c1", "c4"],
        "eval_classes": ["c0", "c2", "c5"], "num_train_images": 8, "num_queries": 6,
        "num_gallery": 12}
    assert "3 classes held out" in split.eval.description


def test_statistics_come_from_the_training_classes_only():
    split = splits.hold_out_last(_dataset(), 3)
    expected = channel_stats(split.train.train.images)
    np.testing.assert_allclose(split.train.normalization, expected)
    assert expected[0][0] == pytest.approx((1 + 11 + 21) / 3 / 255)  # classes c0-c2 only
    assert (split.eval.mean, split.eval.std) == split.train.normalization
    # Published statistics are kept as they are.
    published = splits.hold_out_last(_dataset(mean=(0.5,) * 3, std=(0.25,) * 3), 3)
    assert published.train.mean == (0.5,) * 3 and published.eval.std == (0.25,) * 3


def test_hold_out_last_and_its_bounds():
    split = splits.hold_out_last(_dataset(), 2)
    assert split.train.class_names == NAMES[:4] and split.eval.class_names == NAMES[4:]
    for n in (1, 5, 6):
        with pytest.raises(ValueError, match="unseen_classes"):
            splits.hold_out_last(_dataset(), n)


def test_split_classes_errors():
    dataset = _dataset()
    with pytest.raises(ValueError, match="unknown training classes"):
        splits.split_classes(dataset, ("c0", "nope"), ("c2", "c3"))
    with pytest.raises(ValueError, match="both sides"):
        splits.split_classes(dataset, ("c0", "c1"), ("c1", "c3"))
    with pytest.raises(ValueError, match="at least 2"):
        splits.split_classes(dataset, ("c0",), ("c1", "c3"))
    no_test = Dataset(dataset.train, Split(dataset.test.images[:0], dataset.test.labels[:0]),
                      NAMES)
    with pytest.raises(ValueError, match=r"held-out class\(es\) \['c2', 'c3'\] have no test"):
        splits.split_classes(no_test, ("c0", "c1"), ("c2", "c3"))


def test_without_a_gallery_and_limit():
    dataset = _dataset()
    # A flat tree: training classes only in train, held-out classes only in test.
    train_mask = dataset.train.labels < 3
    test_mask = dataset.test.labels >= 3
    flat = Dataset(Split(dataset.train.images[train_mask], dataset.train.labels[train_mask]),
                   Split(dataset.test.images[test_mask], dataset.test.labels[test_mask]), NAMES)
    split = splits.split_classes(flat, NAMES[:3], NAMES[3:])
    assert not split.has_gallery and len(split.eval.train) == 0
    assert len(split.train.test) == 0
    small = splits.limit(splits.hold_out_last(dataset, 3), max_train=5, max_test=3)
    assert len(small.train.train) == 5 and np.bincount(small.train.train.labels).tolist() == [
        2, 2, 1]
    assert len(small.eval.test) == 3 and len(small.eval.train) == 3 * 4  # gallery whole
    with pytest.raises(ValueError, match="not class-disjoint"):
        splits.ClassSplit(split.train, split.train)
