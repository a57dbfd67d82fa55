"""Tests for jaxmetric.data on tiny data sets built here, plus one on the real tarball."""

import builtins
import io
import os
import pathlib
import pickle
import sys
import tarfile
import time
import types

import numpy as np
import pytest
from PIL import Image

from jaxmetric import data as jdata
from jaxmetric.data import CIFAR10_CLASSES, DataError, Dataset, Split, balanced_subset, load_cifar10
from jaxmetric.data import cifar10 as data

# ----------------------------------------------------------------------------- helpers


def make_image(label, index):
    """A deterministic 32x32 RGB image; pixel (0, 0) encodes (label, index)."""
    img = np.random.default_rng(1000 * label + index).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    img[0, 0] = (label, index, 77)
    return img


def write_tree(root, sizes, ext=".png", classes=("cat", "dog", "emu")):
    """train/<class>/NNNN.<ext> and test/<class>/... with sizes {split: [n per class]}.

    Files are written in reverse name order, so directory order is not sorted order.
    Returns {split: {class: [images in name order]}}.
    """
    written = {}
    for split, counts in sizes.items():
        written[split] = {}
        for label, (cls, n) in enumerate(zip(classes, counts, strict=False)):
            folder = pathlib.Path(root, split, cls)
            folder.mkdir(parents=True)
            images = [make_image(label, i) for i in range(n)]
            for i in reversed(range(n)):
                Image.fromarray(images[i]).save(folder / f"{i:04d}{ext}")
            written[split][cls] = images
    return written


def expected_split(written_split, classes, counts=None):
    images, labels = [], []
    for label, cls in enumerate(classes):
        chosen = written_split[cls] if counts is None else written_split[cls][: counts[label]]
        images += chosen
        labels += [label] * len(chosen)
    return np.stack(images), np.array(labels, np.int32)


def make_tar(tree_root, archive, top=None):
    mode = {".gz": "w:gz", ".xz": "w:xz", ".tar": "w"}[pathlib.Path(archive).suffix]
    with tarfile.open(archive, mode) as tar:
        for split in ("train", "test"):
            tar.add(pathlib.Path(tree_root, split), arcname=f"{top}/{split}" if top else split)
    return archive


def write_batches(folder, n_per_batch=6, protocol=2, n_classes=10):
    """A fake cifar-10-batches-py folder shaped like the official release."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = {"train": [], "test": []}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        hwc = rng.integers(0, 256, (n_per_batch, 32, 32, 3), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, n_classes, n_per_batch)]
        batch = {
            b"batch_label": b"fake " + name.encode(),
            b"labels": labels,
            b"data": hwc.transpose(0, 3, 1, 2).reshape(n_per_batch, 3072),  # rows are CHW
            b"filenames": [f"img_{i}.png".encode() for i in range(n_per_batch)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        out["test" if name == "test_batch" else "train"].append((hwc, labels))
    names = [c.encode() for c in CIFAR10_CLASSES[:n_classes]]
    meta = {b"num_cases_per_batch": n_per_batch, b"label_names": names, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return {
        s: (
            np.concatenate([h for h, _ in parts]),
            np.array(sum((lab for _, lab in parts), []), np.int32),
        )
        for s, parts in out.items()
    }


def assert_split(split, images, labels):
    assert split.images.dtype == np.uint8 and split.labels.dtype == np.int32
    np.testing.assert_array_equal(split.labels, labels)
    np.testing.assert_array_equal(split.images, images)


CLASSES = ("cat", "dog", "emu")


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "tree"
    written = write_tree(root, {"train": [4, 3, 5], "test": [2, 2, 2]})
    return root, written


# ----------------------------------------------------------------------------- image trees


def test_class_names_sorted_is_cifar_order():
    assert tuple(sorted(CIFAR10_CLASSES)) == CIFAR10_CLASSES  # the documented rule relies on it
    assert (
        data._class_order(
            [
                "truck",
                "airplane",
                "ship",
                "frog",
                "bird",
                "cat",
                "deer",
                "dog",
                "horse",
                "automobile",
            ]
        )
        == CIFAR10_CLASSES
    )


def test_load_image_tree(tree, tmp_path):
    root, written = tree
    ds = load_cifar10(root, cache_dir=tmp_path / "cache")
    assert ds.class_names == CLASSES and ds.num_classes == 3
    assert_split(ds.train, *expected_split(written["train"], CLASSES))
    assert_split(ds.test, *expected_split(written["test"], CLASSES))


def test_image_tree_inside_single_top_folder(tree, tmp_path):
    root, written = tree
    outer = tmp_path / "outer"
    outer.mkdir()
    root.rename(outer / "cifar")
    ds = load_cifar10(outer, cache_dir=False)
    assert_split(ds.train, *expected_split(written["train"], CLASSES))


def test_jpeg_tree_decodes_to_rgb(tmp_path):
    root = tmp_path / "jpg"
    smooth = np.zeros((32, 32, 3), np.uint8)
    smooth[..., 0] = np.arange(32)[None, :] * 8
    smooth[..., 2] = 200
    for split in ("train", "test"):
        for cls, ext in (("a", ".jpg"), ("b", ".JPEG")):
            (root / split / cls).mkdir(parents=True)
            Image.fromarray(smooth).save(root / split / cls / f"x{ext}", format="JPEG", quality=95)
        Image.fromarray(smooth[..., 0]).convert("L").save(
            root / split / "b" / "gray.png"
        )  # 1 channel
    ds = load_cifar10(root, cache_dir=False)
    assert ds.train.images.shape == (3, 32, 32, 3)
    assert np.abs(ds.train.images[0].astype(int) - smooth).mean() < 4
    gray = ds.train.images[1]  # "b" sorted: gray.png before x.JPEG
    np.testing.assert_array_equal(gray[..., 0], smooth[..., 0])
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])


def test_max_counts_are_balanced_first_by_name(tmp_path):
    root = tmp_path / "tree"
    written = write_tree(root, {"train": [5, 5, 2], "test": [3, 3, 3]})
    # 10 over 3 classes: 4/3/3, but emu has 2, so its shortfall goes to cat and dog: 4/4/2.
    # 7 over 3 classes: 3/2/2 (the remainder to the lowest label).
    ds = load_cifar10(root, max_train=10, max_test=7, cache_dir=False)
    assert_split(ds.train, *expected_split(written["train"], CLASSES, [4, 4, 2]))
    assert_split(ds.test, *expected_split(written["test"], CLASSES, [3, 2, 2]))


def test_max_skips_decoding_unselected_images(tmp_path):
    root = tmp_path / "tree"
    write_tree(root, {"train": [3, 3, 3], "test": [2, 2, 2]})
    (root / "train" / "dog" / "9999.png").write_bytes(b"not an image")  # last by name
    ds = load_cifar10(root, max_train=6, cache_dir=False)
    assert len(ds.train) == 6
    with pytest.raises(DataError, match="9999.png"):
        load_cifar10(root, cache_dir=False)
    archive = make_tar(root, tmp_path / "t.tar.gz")
    assert len(load_cifar10(archive, max_train=6, cache_dir=False).train) == 6


# ----------------------------------------------------------------------------- archives


@pytest.mark.parametrize(
    "name,top", [("t.tar.gz", "cifar10-jpeg"), ("t.tar.xz", None), ("t.tar", None)]
)
def test_archive_matches_folder(tree, tmp_path, name, top):
    root, written = tree
    archive = make_tar(root, tmp_path / name, top=top)
    ds = load_cifar10(archive, cache_dir=False)
    assert ds.class_names == CLASSES
    assert_split(ds.train, *expected_split(written["train"], CLASSES))
    assert_split(ds.test, *expected_split(written["test"], CLASSES))
    small = load_cifar10(archive, max_train=5, max_test=4, cache_dir=False)
    assert_split(small.train, *expected_split(written["train"], CLASSES, [2, 2, 1]))
    assert_split(small.test, *expected_split(written["test"], CLASSES, [2, 1, 1]))


def test_archive_with_two_top_folders_is_rejected(tree, tmp_path):
    root, _ = tree
    archive = tmp_path / "two.tar"
    with tarfile.open(archive, "w") as tar:
        for top in ("a", "b"):
            for split in ("train", "test"):
                tar.add(root / split, arcname=f"{top}/{split}")
    with pytest.raises(DataError, match="several trees"):
        load_cifar10(archive, cache_dir=False)


def test_not_an_archive(tmp_path):
    bogus = tmp_path / "bogus.tar.xz"
    bogus.write_bytes(b"\xfd7zXZ\x00 garbage" * 10)
    with pytest.raises(DataError, match="bogus.tar.xz"):
        load_cifar10(bogus, cache_dir=False)


def test_archive_without_images(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    archive = tmp_path / "empty.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "notes.txt", arcname="notes.txt")
    with pytest.raises(DataError, match="no train/<class>"):
        load_cifar10(archive, cache_dir=False)


# ----------------------------------------------------------------------------- bad data


def truncate_first_image(root):
    path = root / "train" / "dog" / "0001.jpg"
    buf = io.BytesIO()
    Image.fromarray(make_image(1, 1)).save(buf, format="JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def test_truncated_jpeg_names_the_file(tmp_path):
    root = tmp_path / "tree"
    write_tree(root, {"train": [2, 2, 2], "test": [1, 1, 1]}, ext=".jpg")
    bad = truncate_first_image(root)
    with pytest.raises(DataError, match=r"dog/0001\.jpg.*(corrupt|truncated)") as info:
        load_cifar10(root, cache_dir=False)
    assert str(bad) in str(info.value)
    archive = make_tar(root, tmp_path / "bad.tar.gz")
    with pytest.raises(DataError, match=r"bad\.tar\.gz:train/dog/0001\.jpg"):
        load_cifar10(archive, cache_dir=False)


def test_wrong_image_size_names_the_file(tmp_path):
    root = tmp_path / "tree"
    write_tree(root, {"train": [1, 1, 1], "test": [1, 1, 1]})
    Image.new("RGB", (64, 48)).save(root / "test" / "emu" / "big.png")
    with pytest.raises(DataError, match=r"emu/big\.png: image is 64x48 pixels, expected 32x32"):
        load_cifar10(root, cache_dir=False)


def test_layout_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_cifar10(tmp_path / "nowhere", cache_dir=False)
    (tmp_path / "nothing" / "misc").mkdir(parents=True)
    (tmp_path / "nothing" / "other").mkdir()
    with pytest.raises(DataError, match="--data-dir"):
        load_cifar10(tmp_path / "nothing", cache_dir=False)

    only_train = tmp_path / "only_train"
    write_tree(only_train, {"train": [1, 1, 1]})
    with pytest.raises(DataError, match="no 'test/' folder"):
        load_cifar10(only_train, cache_dir=False)

    mismatch = tmp_path / "mismatch"
    write_tree(mismatch, {"train": [1, 1, 1]})
    write_tree(mismatch, {"test": [1, 1]}, classes=("cat", "owl"))
    with pytest.raises(
        DataError, match=r"only in train/: \['dog', 'emu'\], only in test/: \['owl'\]"
    ):
        load_cifar10(mismatch, cache_dir=False)

    empty = tmp_path / "empty"
    write_tree(empty, {"train": [1, 1, 1], "test": [1, 1, 1]})
    for f in (empty / "test" / "dog").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="test/dog/ holds no images"):
        load_cifar10(empty, cache_dir=False)
    archive = tmp_path / "empty.tar"
    with tarfile.open(archive, "w") as tar:  # the empty class folder survives in the archive
        tar.add(empty / "train", arcname="train")
        tar.add(empty / "test", arcname="test")
    with pytest.raises(DataError, match="test/dog/ holds no images"):
        load_cifar10(archive, cache_dir=False)


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "10"])
def test_bad_max_values(tree, value):
    with pytest.raises(ValueError, match="max_train"):
        load_cifar10(tree[0], max_train=value, cache_dir=False)


# ----------------------------------------------------------------------------- batches-py


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_load_batches_folder(tmp_path, protocol):
    folder = tmp_path / "cifar-10-batches-py"
    expected = write_batches(folder, protocol=protocol)
    for path in (folder, tmp_path):  # the folder itself or the folder holding it
        ds = load_cifar10(path)
        assert ds.class_names == CIFAR10_CLASSES
        assert_split(ds.train, *expected["train"])
        assert_split(ds.test, *expected["test"])
        assert ds.train.images.flags.c_contiguous


def test_batches_folder_max_keeps_first_in_stored_order(tmp_path):
    expected = write_batches(tmp_path / "b", n_per_batch=20, n_classes=2)
    ds = load_cifar10(tmp_path / "b", max_train=10, max_test=4)
    labels = expected["train"][1]
    idx = np.sort(
        np.concatenate([np.flatnonzero(labels == 0)[:5], np.flatnonzero(labels == 1)[:5]])
    )
    assert_split(ds.train, expected["train"][0][idx], labels[idx])
    assert np.bincount(ds.test.labels).tolist() == [2, 2]


def test_batches_in_official_style_archive(tmp_path):
    expected = write_batches(tmp_path / "cifar-10-batches-py")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    ds = load_cifar10(archive, cache_dir=tmp_path / "cache")
    assert_split(ds.train, *expected["train"])
    assert_split(ds.test, *expected["test"])


def test_batches_missing_file(tmp_path):
    write_batches(tmp_path / "b")
    (tmp_path / "b" / "data_batch_4").unlink()
    with pytest.raises(DataError, match="data_batch_4 is missing"):
        load_cifar10(tmp_path / "b")


def test_batches_corrupt_pickle(tmp_path):
    write_batches(tmp_path / "b")
    path = tmp_path / "b" / "test_batch"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataError, match="test_batch: not a valid pickle"):
        load_cifar10(tmp_path / "b")


def test_batches_wrong_shape(tmp_path):
    write_batches(tmp_path / "b")
    bad = {b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}
    (tmp_path / "b" / "data_batch_2").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_2: 'data' must be a uint8 array \(N, 3072\)"):
        load_cifar10(tmp_path / "b")


class SystemCall:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Eval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.eval, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.mark.parametrize(
    "payload,forbidden",
    [(SystemCall, rf"{os.system.__module__}\.system"), (Eval, r"(__builtin__|builtins)\.eval")],
)
def test_malicious_pickle_is_refused_without_running_code(tmp_path, payload, forbidden):
    write_batches(tmp_path / "b")
    marker = tmp_path / "marker"
    evil = pickle.dumps({b"data": payload(marker), b"labels": []}, protocol=2)
    (tmp_path / "b" / "data_batch_3").write_bytes(evil)
    with pytest.raises(
        DataError, match=rf"data_batch_3: refusing to unpickle forbidden global '{forbidden}'"
    ):
        load_cifar10(tmp_path / "b")
    assert not marker.exists()
    pickle.loads(evil)  # control: an ordinary unpickler does run the payload
    assert marker.exists()


def test_codecs_encode_is_limited_to_latin1(tmp_path):
    write_batches(tmp_path / "b")
    crafted = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x06\x00\x00\x00base64\x86R."
    (tmp_path / "b" / "batches.meta").write_bytes(crafted)
    with pytest.raises(DataError, match="batches.meta: not a valid pickle"):
        load_cifar10(tmp_path / "b")


# ----------------------------------------------------------------------------- tfds


def test_tfds_missing_asks_for_data_dir(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    with pytest.raises(DataError, match="tensorflow-datasets is not installed.*--data-dir PATH"):
        load_cifar10()


def test_tfds_offline_fails_fast(monkeypatch, tmp_path):
    calls = []

    class Builder:
        data_dir = str(tmp_path / "tfds" / "cifar10" / "3.0.2")  # nothing prepared there

        def download_and_prepare(self):
            calls.append("download")

    fake = types.ModuleType("tensorflow_datasets")
    fake.builder = lambda name: Builder()
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)

    def unreachable(address, timeout):
        assert timeout <= 5
        raise OSError("Network is unreachable")

    monkeypatch.setattr(data.socket, "create_connection", unreachable)
    start = time.perf_counter()
    with pytest.raises(DataError, match="unreachable.*--data-dir PATH"):
        load_cifar10()
    assert time.perf_counter() - start < 1 and calls == []


def write_batches_bin(folder, n_per_batch=3):
    """A tiny cifar-10-batches-bin folder in CIFAR-10's binary format: per record one
    label byte, then 3,072 pixel bytes as three 32x32 planes (R, G, B). Pixel (0, 0) of
    each image holds (split, index within the split, 0), unique, so that images can be
    matched whatever order tfds stores them in. Returns {split: (HWC images, labels)}."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(7)
    out = {"train": ([], []), "test": ([], [])}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        split = "test" if name == "test_batch.bin" else "train"
        images, labels = out[split]
        hwc = rng.integers(0, 256, (n_per_batch, 32, 32, 3), dtype=np.uint8)
        hwc[:, 0, 0] = [(SPLIT_IDS[split], len(images) + i, 0) for i in range(n_per_batch)]
        lab = rng.integers(0, 10, n_per_batch).astype(np.uint8)
        chw = hwc.transpose(0, 3, 1, 2).reshape(n_per_batch, 3072)  # R plane, G plane, B plane
        (folder / name).write_bytes(np.concatenate([lab[:, None], chw], axis=1).tobytes())
        images.extend(hwc)
        labels.extend(lab)
    (folder / "batches.meta.txt").write_text("\n".join(CIFAR10_CLASSES) + "\n\n")
    return {s: (np.stack(i), np.array(lab, np.int32)) for s, (i, lab) in out.items()}


SPLIT_IDS = {"train": 1, "test": 2}


def by_id_pixel(split):
    """The split's images and labels sorted by the index in pixel (0, 0), green."""
    order = np.argsort(split.images[:, 0, 0, 1], kind="stable")
    return split.images[order], split.labels[order]


def test_tfds_prepares_and_reads_cifar10_offline(monkeypatch, tmp_path):
    """The real tfds cifar10 builder, fed a tiny cifar-10-batches-bin instead of the
    download, through load_cifar10(): prepared once, then read from disk."""
    tfds = pytest.importorskip(
        "tensorflow_datasets",
        reason="tensorflow-datasets is not installed (pip install -e '.[data]')",
    )
    from tensorflow_datasets.core import constants
    from tensorflow_datasets.core.utils import file_utils, gcs_utils

    downloads = tmp_path / "downloads"
    expected = write_batches_bin(downloads / "cifar-10-batches-bin")
    # Everything tfds writes goes under tmp_path, never ~/tensorflow_datasets.
    tfds_dir = tmp_path / "tensorflow_datasets"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TFDS_DATA_DIR", str(tfds_dir))
    monkeypatch.setattr(constants, "DATA_DIR", str(tfds_dir))
    monkeypatch.setattr(file_utils, "_REGISTERED_DATA_DIRS", set())
    # No network: no probe, no GCS metadata look-up, no download.
    online_checks, urls = [], []
    monkeypatch.setattr(data, "_check_online", lambda: online_checks.append(1))
    monkeypatch.setattr(gcs_utils, "_is_gcs_disabled", True)

    def no_network(*args, **kwargs):
        raise AssertionError("the test tried to open a network connection")

    monkeypatch.setattr(data.socket.socket, "connect", no_network)

    def download_and_extract(self, url_or_urls):
        urls.append(url_or_urls)
        return downloads

    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", download_and_extract)

    ds = load_cifar10()
    assert urls == ["https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"]
    assert online_checks == [1]
    assert (tfds_dir / "cifar10" / "3.0.2" / "dataset_info.json").is_file()
    assert not (tmp_path / "home" / "tensorflow_datasets").exists()
    assert ds.class_names == CIFAR10_CLASSES
    for split in ("train", "test"):
        got = getattr(ds, split)
        assert got.images.shape == expected[split][0].shape  # (N, 32, 32, 3)
        assert got.images.dtype == np.uint8 and got.labels.dtype == np.int32
        assert (got.images[:, 0, 0, 0] == SPLIT_IDS[split]).all()
        assert_split(Split(*by_id_pixel(got)), *expected[split])

    # Prepared now: read from disk, with neither a probe nor a download.
    again = load_cifar10(max_train=10)
    assert urls == [urls[0]] and online_checks == [1]
    assert len(again.train) == 10 and len(again.test) == len(ds.test)

    tf = sys.modules["tensorflow"]  # tfds read through TensorFlow, with no GPU visible to it
    assert tf.config.get_visible_devices("GPU") == []


def test_tensorflow_is_kept_off_gpus(monkeypatch):
    calls = []

    class Config:
        @staticmethod
        def set_visible_devices(devices, device_type):
            calls.append((list(devices), device_type))

        @staticmethod
        def get_visible_devices(device_type):
            return []

    fake_tf = types.ModuleType("tensorflow")
    fake_tf.config = Config
    monkeypatch.setitem(sys.modules, "tensorflow", fake_tf)
    data.tensorflow_on_cpu_only()
    assert calls == [([], "GPU")]

    monkeypatch.setitem(sys.modules, "tensorflow", None)  # TensorFlow not installed
    with pytest.raises(DataError, match=r"needs TensorFlow.*\.\[data\].*--data-dir PATH"):
        data.tensorflow_on_cpu_only()


# ----------------------------------------------------------------------------- cache


def cache_files(cache):
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_cache_hit_skips_decoding(tree, tmp_path, monkeypatch):
    root, written = tree
    archive = make_tar(root, tmp_path / "t.tar.gz")
    cache = tmp_path / "cache"
    first = load_cifar10(archive, cache_dir=cache)
    assert len(cache_files(cache)) == 1 and cache_files(cache)[0].endswith(".npz")

    def boom(*args, **kwargs):
        raise AssertionError("decoded again despite a valid cache")

    monkeypatch.setattr(data, "_load_archive", boom)
    again = load_cifar10(archive, cache_dir=cache)
    assert again.class_names == first.class_names
    assert_split(again.train, first.train.images, first.train.labels)
    assert_split(again.test, first.test.images, first.test.labels)
    with pytest.raises(AssertionError, match="decoded again"):  # other options: other entry
        load_cifar10(archive, max_train=3, cache_dir=cache)


def test_stale_cache_is_not_used(tree, tmp_path):
    root, _ = tree
    archive = make_tar(root, tmp_path / "t.tar")
    cache = tmp_path / "cache"
    assert load_cifar10(archive, cache_dir=cache).class_names == CLASSES
    (root / "train" / "dog").rename(root / "train" / "owl")  # same name, new content
    (root / "test" / "dog").rename(root / "test" / "owl")
    make_tar(root, archive)
    ds = load_cifar10(archive, cache_dir=cache)
    assert ds.class_names == ("cat", "emu", "owl")
    # Trees are keyed by every file: changing one image invalidates the cache too.
    load_cifar10(root, cache_dir=cache)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "train" / "cat" / "0000.png")
    os.utime(root / "train" / "cat" / "0000.png", ns=(1, 1))
    assert load_cifar10(root, cache_dir=cache).train.images[0].max() == 0


def test_corrupt_cache_is_rebuilt(tree, tmp_path):
    root, written = tree
    cache = tmp_path / "cache"
    load_cifar10(root, cache_dir=cache)
    (entry,) = cache.iterdir()
    entry.write_bytes(entry.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="unreadable data cache"):
        ds = load_cifar10(root, cache_dir=cache)
    assert_split(ds.train, *expected_split(written["train"], CLASSES))
    np.load(entry)["train_images"]  # rewritten whole


def test_interrupted_cache_write_leaves_nothing(tree, tmp_path, monkeypatch):
    root, written = tree
    cache = tmp_path / "cache"
    real_savez = np.savez

    def interrupted(file, **arrays):
        file.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(data.np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_cifar10(root, cache_dir=cache)
    assert cache_files(cache) == []
    monkeypatch.setattr(data.np, "savez", real_savez)
    ds = load_cifar10(root, cache_dir=cache)
    assert_split(ds.test, *expected_split(written["test"], CLASSES))


def test_default_cache_dir_is_user_cache_not_beside_data(tree, tmp_path, monkeypatch):
    root, _ = tree
    (tmp_path / "data").mkdir()
    archive = make_tar(root, tmp_path / "data" / "t.tar.xz")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert jdata.default_cache_dir() == tmp_path / "xdg" / "jaxmetric"
    load_cifar10(archive)
    assert len(cache_files(tmp_path / "xdg" / "jaxmetric")) == 1
    assert cache_files(tmp_path / "data") == ["t.tar.xz"]


def test_unwritable_cache_warns_and_loads(tree, tmp_path):
    root, _ = tree
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should go")
    with pytest.warns(UserWarning, match="could not write the data cache"):
        ds = load_cifar10(root, cache_dir=blocker / "cache")
    assert len(ds.train) == 12


# ----------------------------------------------------------------------------- small pieces


def test_balanced_subset():
    labels = np.array([2, 0, 0, 1, 0, 2, 1, 0, 2, 2])
    idx = balanced_subset(labels, 5, 3)
    assert idx.dtype == np.int64 and idx.tolist() == [0, 1, 2, 3, 6]  # 2/2/1: remainder to 0, 1
    assert np.bincount(labels[balanced_subset(labels, 7, 4)], minlength=4).tolist() == [3, 2, 2, 0]
    assert balanced_subset(labels, 100, 3).tolist() == list(range(10))
    assert balanced_subset(labels, 0, 3).tolist() == []
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        balanced_subset(labels, 3, 2)
    with pytest.raises(ValueError, match="integer"):
        balanced_subset(labels.astype(float), 3, 3)


def test_split_and_dataset_validation():
    images = np.zeros((2, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        Split(images.astype(np.float32), np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="int32"):
        Split(images, np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        Split(images, np.zeros(3, np.int32))
    split = Split(images, np.array([0, 1], np.int32))
    with pytest.raises(ValueError, match="outside"):
        Dataset(split, split, ("only",))
    two = ("a", "b")
    with pytest.raises(ValueError, match="give both or neither"):
        Dataset(split, split, two, mean=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="one value per channel"):
        Dataset(split, split, two, mean=(0.5,), std=(0.2,))
    with pytest.raises(ValueError, match="std must be > 0"):
        Dataset(split, split, two, mean=(0.5,) * 3, std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="test images are"):
        Dataset(split, Split(np.zeros((2, 8, 8, 3), np.uint8), split.labels), two)


def test_channel_stats_and_dataset_normalization():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (37, 5, 6, 3), dtype=np.uint8)
    images[..., 2] = 7  # a constant channel: std 1, not a division by zero
    mean, std = jdata.channel_stats(images, chunk=8)
    x = images.astype(np.float64) / 255
    np.testing.assert_allclose(mean, x.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(std[:2], x.std(axis=(0, 1, 2))[:2], rtol=1e-9)
    assert std[2] == 1.0
    with pytest.raises(ValueError, match="uint8"):
        jdata.channel_stats(x)
    split = Split(images, np.zeros(37, np.int32))
    computed = Dataset(split, split, ("a",))
    assert computed.image_shape == (5, 6, 3)
    np.testing.assert_allclose(computed.normalization, (mean, std), rtol=1e-12)
    given = Dataset(split, split, ("a",), mean=[0.1, 0.2, 0.3], std=(1, 2, 3))
    assert given.normalization == ((0.1, 0.2, 0.3), (1.0, 2.0, 3.0))


# ----------------------------------------------------------------------------- real data


def test_real_cifar10_tarball(cifar_tarball, tmp_path):
    start = time.perf_counter()
    ds = load_cifar10(cifar_tarball, max_train=500, max_test=200, cache_dir=tmp_path)
    cold = time.perf_counter() - start
    assert ds.class_names == CIFAR10_CLASSES
    assert ds.train.images.shape == (500, 32, 32, 3) and ds.test.images.shape == (200, 32, 32, 3)
    assert ds.normalization == (data.CIFAR10_MEAN, data.CIFAR10_STD)  # the published ones
    assert ds.description.startswith("CIFAR-10 (JPEG q75 copy")
    computed = jdata.channel_stats(ds.train.images)  # close to them even on 500 images
    np.testing.assert_allclose(computed[0], data.CIFAR10_MEAN, atol=0.03)
    np.testing.assert_allclose(computed[1], data.CIFAR10_STD, atol=0.03)
    assert np.bincount(ds.train.labels).tolist() == [50] * 10
    assert np.bincount(ds.test.labels).tolist() == [20] * 10
    assert 90 < ds.train.images.mean() < 150 and ds.train.images.std() > 40
    assert len({img.tobytes() for img in ds.train.images}) == 500  # all distinct pictures
    start = time.perf_counter()
    cached = load_cifar10(cifar_tarball, max_train=500, max_test=200, cache_dir=tmp_path)
    warm = time.perf_counter() - start
    np.testing.assert_array_equal(cached.train.images, ds.train.images)
    assert warm < cold
