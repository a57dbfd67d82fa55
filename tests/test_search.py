"""jaxmetric.search: the Embedder of a run, the persistent index, the command line.

The model is the real homebrew run in tests/fixtures/run-0.1.0 (embed_dim 16, 32x32 RGB),
copied into a temporary folder; the images are small PNG/JPEG files written with Pillow
(four colour classes), so nothing needs the CIFAR-10 data.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from jaxmetric.search import Embedder, Index, SearchError, save_embeddings
from jaxmetric.search.cli import main

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "run-0.1.0")
COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200),
           "yellow": (200, 200, 30)}


def _write_tree(root, per_class, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, base in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            arr = np.clip(np.array(base) + rng.normal(0, 30, (32, 32, 3)), 0, 255)
            suffix = "png" if i % 2 else "jpg"
            Image.fromarray(arr.astype(np.uint8)).save(root / name / f"{i}.{suffix}")
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    run = root / "run"
    shutil.copytree(FIXTURE, run)
    gallery = _write_tree(root / "gallery", 5, 0)
    probe = _write_tree(root / "probe", 2, 1)
    embedder = Embedder.from_run(run, batch_size=8)
    return {"root": root, "run": run, "gallery": gallery, "probe": probe,
            "embedder": embedder}


# ---------------------------------------------------------------------- Embedder


def test_embedder_streams_a_tree_with_the_runs_preprocessing(world):
    from jaxmetric.data.images import decode_image
    from jaxmetric.evaluate import embed
    from jaxmetric.train import make_embed_fn

    emb = world["embedder"]
    got = emb.embed_folder(world["gallery"], progress=False)  # 20 images, batches of 8
    assert len(got.ids) == 20 and got.skipped == []
    assert got.labels == sorted(got.labels) and set(got.labels) == set(COLOURS)
    images = np.stack([decode_image(p, size=32, channels=3, resize=False) for p in got.ids])
    expected = embed(make_embed_fn(emb.state), images, batch_size=20, progress=False)
    np.testing.assert_allclose(got.embeddings, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got.embeddings, axis=1), 1, atol=1e-5)
    assert emb.dim == 16 and emb.describe()["epoch"] == 1


def test_fingerprint_names_the_weights(world):
    import jax

    emb = world["embedder"]
    fp = emb.fingerprint
    assert len(fp) == 16 and int(fp, 16) >= 0
    bumped = emb.state.replace(params=jax.tree.map(lambda x: x + 1e-3, emb.state.params))
    assert Embedder(bumped).fingerprint != fp
    assert Embedder(emb.state).fingerprint == fp


def test_export_runs_without_flax(world, tmp_path):
    emb = world["embedder"]
    artefact = emb.export(tmp_path / "embed.jax")
    x = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    code = ("import sys, jax, numpy as np\n"
            f"f = jax.export.deserialize(open({str(artefact)!r}, 'rb').read())\n"
            f"y = np.asarray(f.call(np.load({str(tmp_path / 'x.npy')!r})))\n"
            "assert 'flax' not in sys.modules and 'jaxmetric' not in sys.modules\n"
            f"np.save({str(tmp_path / 'y.npy')!r}, y)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), emb.embed_images(x), atol=1e-5)


def test_save_embeddings_round_trip(tmp_path):
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    path = save_embeddings(tmp_path / "e.npz", x, ["a", "b", "c"], ["u", None, "v"])
    back = np.load(path)
    np.testing.assert_array_equal(back["embeddings"], x)
    assert list(back["ids"]) == ["a", "b", "c"] and list(back["labels"]) == ["u", "", "v"]
    assert [p.name for p in tmp_path.iterdir()] == ["e.npz"]


# ---------------------------------------------------------------------- Index


def _unit(n, d=8, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("kind,params", [("flat", {}), ("hnsw", {"hnsw_m": 8}),
                                         ("ivfpq", {"nlist": 2, "nbits": 4, "m": 4})])
def test_index_round_trip_and_exact_distances(kind, params, tmp_path):
    g, q = _unit(80), _unit(5, seed=1)
    ids = [f"img{i}.png" for i in range(80)]
    labels = [f"c{i % 3}" for i in range(80)]
    index = Index.build(g, ids, labels, kind=kind, **params)
    dist, got_ids, got_labels = index.search(q, 4)
    if kind == "flat":
        d = np.linalg.norm(q[:, None] - g[None], axis=2)
        order = np.argsort(d, axis=1)[:, :4]
        np.testing.assert_allclose(dist, np.take_along_axis(d, order, 1), atol=1e-5)
        assert got_ids.tolist() == [[ids[j] for j in row] for row in order]
        assert got_labels.tolist() == [[labels[j] for j in row] for row in order]
        assert "recall" not in index.metadata
    else:
        assert 0 <= index.metadata["recall"]["value"] <= 1
    index.save(tmp_path / "idx")
    again = Index.load(tmp_path / "idx")
    d2, i2, l2 = again.search(q, 4)
    np.testing.assert_array_equal(d2, dist)
    assert i2.tolist() == got_ids.tolist() and l2.tolist() == got_labels.tolist()
    assert again.metadata["params"] == index.metadata["params"]


def test_classify_is_the_distance_weighted_vote():
    g = _unit(30)
    labels = [i % 3 for i in range(30)]
    index = Index.build(g, range(30), labels)
    q = _unit(6, seed=2)
    got, conf = index.classify(q, k=5)
    d = np.linalg.norm(q[:, None] - g[None], axis=2)
    for row in range(6):
        near = np.argsort(d[row])[:5]
        votes = {}
        for j in near:
            votes[labels[j]] = votes.get(labels[j], 0) + 1 / (d[row, j] + 1e-6)
        best = max(votes, key=votes.get)
        assert got[row] == best
        assert conf[row] == pytest.approx(votes[best] / sum(votes.values()), rel=1e-4)
    one, conf1 = index.classify(q, k=1)
    assert list(one) == [labels[j] for j in d.argmin(1)] and np.all(conf1 == 1)


def test_index_bad_inputs_are_clear_errors(tmp_path):
    g = _unit(10)
    with pytest.raises(SearchError, match="gallery is empty"):
        Index.build(np.zeros((0, 8)), [])
    with pytest.raises(SearchError, match="NaN"):
        Index.build(np.full((2, 8), np.nan), ["a", "b"])
    with pytest.raises(SearchError, match="as many"):
        Index.build(g, ["a"])
    index = Index.build(g, range(10), embedder={"fingerprint": "abc", "dim": 8})
    with pytest.raises(SearchError, match="larger than the gallery"):
        index.search(g[:1], 11)
    with pytest.raises(SearchError, match="dimension 4"):
        index.search(np.ones((1, 4)), 1)
    with pytest.raises(SearchError, match="NaN"):
        index.search(np.full((1, 8), np.nan), 1)
    with pytest.raises(SearchError, match="another model"):
        index.search(g[:1], 1, embedder={"fingerprint": "xyz", "dim": 8})
    with pytest.raises(SearchError, match="16-dimensional"):
        index.check_embedder({"fingerprint": "abc", "dim": 16})
    path = index.save(tmp_path / "idx")
    data = (path / "index.faiss").read_bytes()
    (path / "index.faiss").write_bytes(data[: len(data) // 2])
    with pytest.raises(SearchError, match="corrupt or truncated"):
        Index.load(path)
    with pytest.raises(SearchError, match="not an index folder"):
        Index.load(tmp_path)


def test_save_replaces_an_index_whole(tmp_path):
    first = Index.build(_unit(10), range(10))
    first.save(tmp_path / "idx")
    second = Index.build(_unit(12, seed=3), range(12))
    second.save(tmp_path / "idx")
    assert len(Index.load(tmp_path / "idx")) == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temporaries left
    (tmp_path / "other").mkdir()
    with pytest.raises(SearchError, match="not an index"):
        first.save(tmp_path / "other")


# ---------------------------------------------------------------------- the command line


@pytest.fixture
def cached_run(world, monkeypatch):
    """The command line without restoring the checkpoint again at every call: the
    module's Embedder stands in for ``Embedder.from_run(world["run"])`` (restoring is
    checked once, by the ``world`` fixture and the slow end-to-end test)."""
    real = Embedder.from_run

    def from_run(run_dir, epoch=None, *, batch_size=64):
        if os.path.samefile(run_dir, world["run"]):
            return world["embedder"]
        return real(run_dir, epoch, batch_size=batch_size)

    monkeypatch.setattr(Embedder, "from_run", staticmethod(from_run))


@pytest.mark.slow

def test_cli_build_calibrate_query(world, capsys):
    root, idx = world["root"], world["root"] / "idx"
    assert main(["build", str(world["run"]), "--images", str(world["gallery"]), "--out",
                 str(idx), "--no-progress", "--batch-size", "8"]) == 0
    assert "20 images" in capsys.readouterr().out
    assert main(["calibrate", str(idx), "--images", str(world["probe"]),
                 "--target-precision", "0.9", "--no-progress"]) == 0
    meta = json.loads((idx / "metadata.json").read_text())
    assert meta["threshold"]["precision"] >= 0.9 and Index.load(idx).threshold is not None
    query = world["probe"] / "red" / "0.jpg"
    picture = root / "n.png"
    capsys.readouterr()
    assert main(["query", str(idx), str(query), "-k", "3", "--picture", str(picture)]) == 0
    out = capsys.readouterr().out
    assert f"{query}: predicted " in out and "threshold" in out
    assert out.count(str(world["gallery"])) == 3 and picture.stat().st_size > 0


def test_cli_reads_a_streamed_archive(world, cached_run, tmp_path, capsys):
    archive = tmp_path / "g.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(world["gallery"], arcname="train")
    assert main(["build", str(world["run"]), "--images", str(archive), "--under", "train",
                 "--out", str(tmp_path / "idx"), "--no-progress", "--index", "hnsw"]) == 0
    index = Index.load(tmp_path / "idx")
    assert len(index) == 20 and set(index.labels) == set(COLOURS)
    assert all("::train/" in i for i in index.ids)
    assert main(["query", str(tmp_path / "idx"), str(world["probe"] / "blue" / "1.png"),
                 "-k", "2", "--picture", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").is_file()


def test_cli_bad_inputs(world, cached_run, tmp_path, capsys):
    run, gallery = str(world["run"]), tmp_path / "g"
    shutil.copytree(world["gallery"], gallery)
    (gallery / "red" / "broken.jpg").write_bytes(b"not a jpeg")
    out = str(tmp_path / "idx")

    def fails(argv, message, status=1):
        assert main(argv) == status
        assert message in capsys.readouterr().err

    fails(["build", run, "--images", str(gallery), "--out", out, "--no-progress"], "broken.jpg")
    assert main(["build", run, "--images", str(gallery), "--out", out, "--no-progress",
                 "--skip-bad-images"]) == 0
    assert "skipped 1 undecodable" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    fails(["build", run, "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "e"),
           "--no-progress"], "gallery is empty")
    probe = str(world["probe"] / "red" / "0.jpg")
    fails(["query", out, probe, "-k", "99"], "larger than the gallery")
    meta_file = tmp_path / "idx" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps(meta | {"fingerprint": "0123456789abcdef"}))
    fails(["query", out, probe], "another model")
    meta_file.write_text(json.dumps(meta))
    (tmp_path / "idx" / "index.faiss").write_bytes(b"garbage")
    fails(["query", out, probe], "corrupt or truncated")
    with pytest.raises(SystemExit) as e:
        main(["query", out, probe, "--index", "flat"])
    assert e.value.code == 2
