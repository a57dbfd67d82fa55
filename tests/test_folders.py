"""jaxmetric.data.folders and experiments.retrieval: image-folder trees split by class, and the
tfds benchmarks' splits."""

import json
import pathlib
import tarfile

import numpy as np
import pytest

from jaxmetric.data import DataError, folders, tfds_benchmarks
from jaxmetric.train import InputSpec


@pytest.fixture(scope="module")
def jpeg_tree(tmp_path_factory, cifar_tarball):
    """A flat tree of 6 classes x 20 real JPEGs (CIFAR-10's first test images)."""
    root = tmp_path_factory.mktemp("jpeg") / "tree"
    counts = {}
    with tarfile.open(cifar_tarball, "r|*") as archive:
        for member in archive:
            parts = member.name.split("/")
            if len(parts) != 3 or parts[0] != "test" or not member.isfile():
                continue
            if parts[1] not in counts and len(counts) == 6:
                break  # the archive lists test/ class by class
            if counts.get(parts[1], 0) == 20:
                continue
            counts[parts[1]] = counts.get(parts[1], 0) + 1
            (root / parts[1]).mkdir(parents=True, exist_ok=True)
            (root / parts[1] / parts[2]).write_bytes(archive.extractfile(member).read())
    assert sorted(counts.values()) == [20] * 6
    return root


def _png_tree(root: pathlib.Path, classes=5, per_split=(6, 3), size=(30, 44)):
    """A train/ + test/ tree of grayscale PNGs of a non-32 size; class c is dark to
    light with c."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in zip(("train", "test"), per_split, strict=True):
        for c in range(classes):
            (root / split / f"k{c}").mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.clip(40 * c + rng.integers(0, 30, size), 0, 255).astype(np.uint8)
                Image.fromarray(pixels, "L").save(root / split / f"k{c}" / f"{i:02d}.png")
    return root


def test_flat_tree_split_is_class_disjoint_and_deterministic(jpeg_tree):
    split = folders.load_folder(jpeg_tree, image_size=32, train_classes=4, workers=2)
    names = sorted(p.name for p in jpeg_tree.iterdir())
    assert split.train.class_names == tuple(names[:4])
    assert split.eval.class_names == tuple(names[4:])
    assert len(split.train.train) == 80 and len(split.train.test) == 0
    assert len(split.eval.test) == 40 and not split.has_gallery  # leave-one-out only
    assert split.train.train.images.shape[1:] == (32, 32, 3)
    assert split.train.input_size is None
    again = folders.load_folder(jpeg_tree, image_size=32, train_classes=4, workers=1)
    np.testing.assert_array_equal(again.train.train.images, split.train.train.images)
    np.testing.assert_array_equal(again.eval.test.labels, split.eval.test.labels)
    # By name; images of unnamed classes are not used at all.
    named = folders.load_folder(jpeg_tree, image_size=16, train_class_list=[names[5], names[0]],
                                test_class_list=[names[2], names[3]])
    assert named.train.class_names == (names[0], names[5])
    assert named.eval.class_names == (names[2], names[3])
    assert named.eval.test.images.shape == (40, 16, 16, 3)


def test_split_tree_of_grayscale_pngs_any_size(tmp_path):
    root = _png_tree(tmp_path / "gray")
    split = folders.load_folder(root, image_size=24, channels=1, train_classes=3)
    assert split.train.train.images.shape == (18, 24, 24, 1)  # train/ of the 3 classes
    assert split.eval.test.images.shape == (6, 24, 24, 1)  # test/ of k3, k4: queries
    assert split.eval.train.images.shape == (12, 24, 24, 1)  # train/ of k3, k4: gallery
    # Class k is 40 k + U(0, 30) everywhere, so its mean pixel places it.
    means = split.eval.test.images.reshape(6, -1).mean(1)
    np.testing.assert_array_equal(np.round((means - 15) / 40), split.eval.test.labels + 3)
    rgb = folders.load_folder(root, image_size=24, channels=3, train_classes=3)
    img = rgb.train.train.images
    assert img.shape[-1] == 3 and (img[..., 0] == img[..., 2]).all()
    # Large inputs: stored at 8/7 of the size, the model sees resized crops.
    big = folders.load_folder(root, image_size=64, channels=1, train_classes=3)
    assert big.train.train.images.shape[1:] == (73, 73, 1)
    assert big.train.input_size == 64
    spec = InputSpec.of(big.train)
    assert spec.shape == (64, 64, 1) and spec.crop == "resized"
    assert InputSpec.from_dict(spec.to_dict()) == spec
    assert InputSpec.from_dict({"shape": [8, 8, 1], "mean": [0], "std": [1]}).crop == "pad"


def test_disjoint_split_tree_has_its_own_split(tmp_path):
    root = _png_tree(tmp_path / "own", classes=4)
    for c in ("k2", "k3"):
        for f in (root / "train" / c).iterdir():
            f.unlink()
        (root / "train" / c).rmdir()
    for c in ("k0", "k1"):
        for f in (root / "test" / c).iterdir():
            f.unlink()
        (root / "test" / c).rmdir()
    split = folders.load_folder(root, image_size=20, channels=1)
    assert split.train.class_names == ("k0", "k1") and split.eval.class_names == ("k2", "k3")
    assert not split.has_gallery


def test_bad_trees_give_clear_errors(tmp_path, jpeg_tree):
    with pytest.raises(DataError, match="is not a folder"):
        folders.scan_folder(tmp_path / "missing")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="holds no class folders"):
        folders.scan_folder(tmp_path / "nothing")
    root = _png_tree(tmp_path / "t", classes=4)
    (root / "train" / "k9").mkdir()
    (root / "train" / "k9" / "notes.txt").write_text("no image here")
    with pytest.raises(DataError, match=r"train/k9: class folder holds no images"):
        folders.scan_folder(root)
    one = tmp_path / "one" / "only"
    one.mkdir(parents=True)
    (one / "a.png").write_bytes((root / "train" / "k0" / "00.png").read_bytes())
    with pytest.raises(DataError, match=r"has 1 class\(es\) \(only\).*at least 4"):
        folders.scan_folder(tmp_path / "one")
    half = tmp_path / "half" / "train" / "k0"
    half.mkdir(parents=True)
    with pytest.raises(DataError, match="no test/ folder"):
        folders.scan_folder(tmp_path / "half")
    with pytest.raises(ValueError, match=r"unknown classes \['zebra'\]"):
        folders.load_folder(jpeg_tree, image_size=32, train_class_list=["zebra", "bird"])
    with pytest.raises(ValueError, match="choose the training classes"):
        folders.load_folder(jpeg_tree, image_size=32)
    broken = _png_tree(tmp_path / "broken", classes=4)
    (broken / "test" / "k3" / "00.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"k3/00.png: cannot decode"):
        folders.load_folder(broken, image_size=16, train_classes=2)


def test_tfds_benchmarks_split_by_label_or_by_their_own_split():
    rng = np.random.default_rng(0)

    def examples(labels_by_split):
        for split, labels in labels_by_split.items():
            for label in labels:
                yield rng.integers(0, 256, (40, 50, 3), dtype=np.uint8), label, split

    names = [f"n{i}" for i in range(6)]
    merged = tfds_benchmarks.Benchmark("label", train_below=3)
    split = tfds_benchmarks.split_examples(
        examples({"train": [0, 4, 1, 5, 2, 3], "test": [3, 0, 4, 1, 5, 2]}), merged, names,
        image_size=16)
    assert split.train.class_names == ("n0", "n1", "n2") and len(split.train.train) == 6
    assert split.eval.class_names == ("n3", "n4", "n5") and len(split.eval.test) == 6
    assert not split.has_gallery and split.eval.test.images.shape[1:] == (16, 16, 3)
    own = tfds_benchmarks.Benchmark("class_id", train_below=None)
    split = tfds_benchmarks.split_examples(
        examples({"train": [0, 0, 2, 2], "test": [1, 1, 5, 5]}), own, names, image_size=64,
        channels=1)
    assert split.train.class_names == ("n0", "n2") and split.eval.class_names == ("n1", "n5")
    assert split.train.train.images.shape[1:] == (73, 73, 1) and split.train.input_size == 64
    assert tfds_benchmarks.BENCHMARKS["caltech_birds2011"].train_below == 100
    assert tfds_benchmarks.BENCHMARKS["cars196"].train_below == 98
    with pytest.raises(ValueError, match="unknown tfds data set"):
        tfds_benchmarks.load_tfds("mnist", image_size=28)


# ------------------------------------------------------------------ the command line


def _small(tree, out, *extra):
    return ["--loss", "triplet", "--model", "homebrew", "--embed-dim", "16",
            "--data-dir", str(tree), "--batch-size", "32", "--epochs", "1",
            "--tsne-points", "0", "--no-progress", "--out", str(out), *extra]


@pytest.mark.slow
def test_retrieval_cli_end_to_end(jpeg_tree, tmp_path):
    from experiments import retrieval

    out = tmp_path / "run"
    assert retrieval.main(_small(jpeg_tree, out, "--train-classes", "3")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "test_vs_train" not in metrics  # a flat tree: no gallery
    held = metrics["test_vs_test"]
    for key in ("recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "r_precision",
                "map_at_r"):
        assert 0.0 <= held[key] <= 1.0, key
    assert held["n_queries"] == 60
    assert metrics["split"]["eval_classes"] == sorted(p.name for p in jpeg_tree.iterdir())[3:]
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["precision_at_1_of"] == "held-out classes, leave-one-out"
    report = (out / "report.md").read_text()
    assert "recall_at_4" in report and '"train_classes": 3' in report
    saved = json.loads((out / "config.json").read_text())["data"]
    assert (saved["source"], saved["train_classes"]) == ("folder", 3)

    # The run folder alone is enough to evaluate the run again: the same split, the
    # same numbers (the report command reads the data settings from config.json).
    from jaxmetric.report import cli

    (out / "metrics.json").unlink()
    assert cli.main([str(out), "--tsne-points", "0", "--no-progress"]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["split"] == metrics["split"]
    assert again["test_vs_test"]["map_at_r"] == pytest.approx(held["map_at_r"], abs=1e-6)

    # Resuming with another class split is refused (exit 2), naming the setting.
    with pytest.raises(SystemExit) as e:
        retrieval.main(_small(jpeg_tree, out, "--train-classes", "4", "--resume",
                              "--epochs", "2"))
    assert e.value.code == 2


def test_retrieval_cli_bad_flags_and_data(jpeg_tree, tmp_path, capsys):
    from experiments import retrieval

    out = tmp_path / "run"
    for argv in (_small(jpeg_tree, out, "--train-classes", "1"),
                 _small(jpeg_tree, out, "--train-class-list", "airplane,zebra"),
                 _small(jpeg_tree, out, "--unseen-classes", "2"),
                 ["--loss", "triplet", "--out", str(out)],  # no data
                 _small(jpeg_tree, out, "--train-classes", "3", "--tfds", "cars196")):
        with pytest.raises(SystemExit) as e:
            retrieval.main(argv)
        assert e.value.code == 2, argv
    assert "zebra" in capsys.readouterr().err
    assert retrieval.main(_small(tmp_path / "nowhere", out, "--train-classes", "2")) == 1
    assert "nowhere" in capsys.readouterr().err
    assert not out.exists()
