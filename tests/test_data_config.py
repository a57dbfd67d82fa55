"""jaxmetric.data.DataConfig: the data of a run described once, checked, saved and read
back, and what ``data.load`` builds from it."""

import json
import pathlib

import numpy as np
import pytest

from jaxmetric import data
from jaxmetric.data import DataConfig, splits
from jaxmetric.train import load_data_config

OLD_RUN = pathlib.Path(__file__).resolve().parent / "fixtures" / "run-0.1.0"


@pytest.mark.parametrize("kwargs, match", [
    (dict(source="imagenet"), "unknown source"),
    (dict(max_train=0), "max_train must be >= 1"),
    (dict(unseen_classes=1), "unseen_classes must be >= 2"),
    (dict(train_classes=3), "not for CIFAR-10"),
    (dict(image_size=64), "32x32 RGB"),
    (dict(channels=1), "32x32 RGB"),
    (dict(source="folder"), "needs path"),
    (dict(source="folder", path="t", unseen_classes=2), "CIFAR-10's"),
    (dict(source="folder", path="t", tfds="cars196"), "one way"),
    (dict(source="tfds"), "needs the benchmark"),
    (dict(source="tfds", tfds="mnist"), "unknown tfds benchmark"),
    (dict(source="tfds", tfds="cars196", train_classes=3), "standard split"),
    (dict(source="folder", path="t", channels=2), "unknown channels"),
])
def test_bad_settings_name_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**kwargs)


def test_types_are_checked():
    with pytest.raises(TypeError, match="max_test must be an int"):
        DataConfig(max_test=2.5)
    with pytest.raises(TypeError, match="sequence of class names"):
        DataConfig(source="folder", path="t", train_class_list="cat,dog")


def test_round_trip_through_json_and_differences():
    cfg = DataConfig(source="folder", path="/data/tree", train_class_list=["b", "a"],
                     image_size=64, channels=1, max_test=10)
    assert cfg.train_class_list == ("b", "a")  # a tuple: hashable, frozen
    back = DataConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    moved = DataConfig.from_dict(cfg.to_dict() | {"path": "/elsewhere/tree"})
    assert cfg.differences(moved) == []  # the same data in another place
    other = DataConfig.from_dict(cfg.to_dict() | {"train_class_list": ["a", "b"]})
    assert cfg.differences(other) == [
        "train_class_list: saved ['b', 'a'], now ['a', 'b']"]
    with pytest.raises(ValueError, match="unknown DataConfig fields: size"):
        DataConfig.from_dict({"size": 3})


def test_configs_written_before_the_data_section_read_as_cifar10():
    cfg = load_data_config(OLD_RUN)
    saved = json.loads((OLD_RUN / "config.json").read_text())
    assert cfg == DataConfig(source="cifar10", path=saved["data_dir"], max_train=200,
                             max_test=100)
    assert DataConfig.of_run({"data": cfg.to_dict()} | saved) == cfg
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_data_config(OLD_RUN / "checkpoints")


def _png_tree(root, classes=4, per_class=5):
    from PIL import Image

    for c in range(classes):
        (root / f"k{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((20, 24, 3), 50 * c + i, np.uint8)).save(
                root / f"k{c}" / f"{i}.png")
    return root


def test_load_builds_the_split_the_config_describes(tmp_path):
    tree = _png_tree(tmp_path / "tree")
    cfg = DataConfig(source="folder", path=str(tree), train_class_list=("k1", "k3"),
                     image_size=16, max_train=6)
    loaded = data.load(cfg)
    assert isinstance(loaded, splits.ClassSplit)
    assert loaded.train.class_names == ("k1", "k3")
    assert loaded.eval.class_names == ("k0", "k2")
    assert len(loaded.train.train) == 6 and loaded.train.train.images.shape[1:] == (16, 16, 3)
    again = data.load(cfg)  # the same config, the same images
    np.testing.assert_array_equal(again.train.train.images, loaded.train.train.images)
    with pytest.raises(ValueError, match="unknown classes"):
        data.load(DataConfig(source="folder", path=str(tree), train_class_list=("k9", "k1")))
    with pytest.raises(data.DataError):
        data.load(DataConfig(source="folder", path=str(tmp_path / "nowhere"), train_classes=2))


def test_load_cifar10_holds_out_the_last_classes(cifar_tarball, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = DataConfig(path=str(cifar_tarball), max_train=100, max_test=50, unseen_classes=4)
    loaded = data.load(cfg)
    assert loaded.train.class_names == data.CIFAR10_CLASSES[:6]
    assert loaded.eval.class_names == data.CIFAR10_CLASSES[6:]
    whole = data.load(DataConfig(path=str(cifar_tarball), max_train=100, max_test=50))
    assert isinstance(whole, data.Dataset) and len(whole.train) == 100
