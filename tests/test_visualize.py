"""Tests of jaxmetric.report.visualize: files are valid PNGs with the expected content."""

import numpy as np
import pytest

from jaxmetric.report import visualize as vz

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _read_png(path, min_bytes=5_000):
    import matplotlib.image as mpimg

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > min_bytes
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    return img


def _has_colour(img, rgb, tol=2 / 255):
    return bool(np.any(np.all(np.abs(img[..., :3] - np.asarray(rgb) / 255) <= tol, axis=-1)))


def _clusters(n=300, d=16, c=5, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    return (rng.normal(size=(c, d))[y] * 3 + rng.normal(size=(n, d))).astype(np.float32), y


# --------------------------------------------------------------------------------------
# t-SNE
# --------------------------------------------------------------------------------------


def test_plot_tsne_writes_png(tmp_path):
    x, y = _clusters()
    path = vz.plot_tsne(x, y, tmp_path / "sub" / "tsne.png", class_names=list("abcde"),
                        n_iter=100, early_exaggeration_iter=50, progress=False)
    assert path == tmp_path / "sub" / "tsne.png"
    img = _read_png(path, min_bytes=10_000)
    assert img.shape[0] > 300 and img.shape[1] > 300


def test_tsne_embed_separates_clusters_and_is_deterministic():
    x, y = _clusters(n=200, c=4)
    a = vz.tsne_embed(x, n_iter=100, early_exaggeration_iter=50, progress=False, seed=1)
    b = vz.tsne_embed(x, n_iter=100, early_exaggeration_iter=50, progress=False, seed=1)
    assert a.shape == (200, 2)
    np.testing.assert_allclose(a, b)
    # Well-separated clusters stay separated: every point's 2-D nearest neighbour
    # shares its class.
    d = np.sum((a[:, None] - a[None]) ** 2, axis=2)
    np.fill_diagonal(d, np.inf)
    assert np.mean(y[d.argmin(1)] == y) > 0.95


def test_tsne_progress_bar_spans_both_phases(capsys):
    x, _ = _clusters(n=60)
    vz.tsne_embed(x, n_iter=50, early_exaggeration_iter=25, progress=True)
    err = capsys.readouterr().err
    assert "t-SNE" in err and "75/75" in err


def test_tqdm_callback_offsets_phases():
    class Bar:
        n = 0

        def set_postfix(self, **kw):
            pass

        def refresh(self):
            pass

    bar = Bar()
    cb = vz._TqdmCallback(bar)
    cb.optimization_about_to_start()
    cb(25, 1.0, None)
    cb(50, 1.0, None)
    assert bar.n == 50
    cb.optimization_about_to_start()
    cb(25, 1.0, None)
    assert bar.n == 75


def test_plot_tsne_subsamples(tmp_path, monkeypatch):
    seen = {}

    def fake_tsne(x, **kwargs):
        seen["n"] = x.shape[0]
        return np.random.default_rng(0).normal(size=(x.shape[0], 2))

    monkeypatch.setattr(vz, "tsne_embed", fake_tsne)
    x, y = _clusters(n=300)
    _read_png(vz.plot_tsne(x, y, tmp_path / "t.png", max_points=120, progress=False))
    assert seen["n"] == 120


def test_plot_tsne_bad_inputs(tmp_path):
    x, y = _clusters(n=50)
    with pytest.raises(ValueError, match="labels has 49 entries but embeddings has 50"):
        vz.plot_tsne(x, y[:-1], tmp_path / "t.png")
    with pytest.raises(ValueError, match="class_names has only 2 entries"):
        vz.plot_tsne(x, y, tmp_path / "t.png", class_names=["a", "b"])
    with pytest.raises(ValueError, match="embeddings must be a 2-D array"):
        vz.plot_tsne(x[0], y, tmp_path / "t.png")
    with pytest.raises(ValueError, match="perplexity must be positive"):
        vz.tsne_embed(x, perplexity=0)
    with pytest.raises(ValueError, match="at least 4 points"):
        vz.tsne_embed(x[:3])


# --------------------------------------------------------------------------------------
# Curves
# --------------------------------------------------------------------------------------


def test_plot_curves(tmp_path):
    records = [
        {"epoch": e, "step": s, "loss": 1 / (s + 1), "active_fraction": 0.5 - s / 100}
        for e in range(3) for s in range(10 * e, 10 * e + 10)
    ]
    records += [{"epoch": e, "precision_at_1": 0.5 + e / 10, "eval": {"map_at_r": 0.2}}
                for e in (0, 2)]
    records.append({"note": "text values are skipped", "flag": True})
    img = _read_png(vz.plot_curves(records, tmp_path / "curves.png"))
    # 4 numeric keys (loss, active_fraction, precision_at_1, eval/map_at_r) in 2 rows.
    assert img.shape[0] > 400


def test_plot_curves_errors(tmp_path):
    with pytest.raises(ValueError, match="no numeric metric"):
        vz.plot_curves([{"epoch": 1, "step": 2}], tmp_path / "c.png")
    with pytest.raises(TypeError, match="list of dicts"):
        vz.plot_curves({"loss": 1.0}, tmp_path / "c.png")
    with pytest.raises(TypeError, match="metrics_records\\[1\\] must be a dict"):
        vz.plot_curves([{"loss": 1.0}, 3], tmp_path / "c.png")


# --------------------------------------------------------------------------------------
# Retrieval grid
# --------------------------------------------------------------------------------------


def _images(n, h=32, w=32, c=3, seed=0):
    return np.random.default_rng(seed).integers(60, 200, (n, h, w, c), dtype=np.uint8)


def test_plot_neighbours_frames(tmp_path):
    q = _images(2)
    nb = _images(8, seed=1).reshape(2, 4, 32, 32, 3)
    # Row 0 all correct; row 1 has two wrong neighbours.
    img = _read_png(vz.plot_neighbours(q, np.array([0, 1]), nb,
                                       np.array([[0, 0, 0, 0], [1, 2, 1, 2]]),
                                       tmp_path / "nb.png", class_names=["cat", "dog", "car"]))
    assert _has_colour(img, vz.MATCH_COLOUR)
    assert _has_colour(img, vz.MISMATCH_COLOUR)

    # All neighbours correct: no red frame anywhere.
    img = _read_png(vz.plot_neighbours(q, np.array([0, 1]), nb,
                                       np.array([[0, 0, 0, 0], [1, 1, 1, 1]]),
                                       tmp_path / "nb2.png"))
    assert _has_colour(img, vz.MATCH_COLOUR)
    assert not _has_colour(img, vz.MISMATCH_COLOUR)


def test_plot_neighbours_greyscale(tmp_path):
    q = _images(1, c=1)[..., 0]
    nb = _images(3, c=1, seed=2)[None, ..., 0]
    _read_png(vz.plot_neighbours(q, [5], nb, [[5, 6, 5]], tmp_path / "g.png"), min_bytes=1_000)


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(query_images=_images(2).astype(np.float32)), TypeError, "query_images must be uint8"),
        (dict(query_labels=np.array([0])), ValueError,
         "query_labels must have shape \\(Q,\\) = \\(2,\\)"),
        (dict(neighbour_images=_images(6).reshape(3, 2, 32, 32, 3)), ValueError,
         "neighbour_images has 3 queries but query_images has 2"),
        (dict(neighbour_images=_images(4, h=16).reshape(2, 2, 16, 32, 3)), ValueError,
         "neighbour images are \\(16, 32, 3\\)"),
        (dict(neighbour_labels=np.zeros((2, 3), int)), ValueError,
         "neighbour_labels must have shape \\(Q, k\\) = \\(2, 2\\)"),
        (dict(query_images=_images(2, c=2)), ValueError, "1, 3 or 4 channels"),
    ],
)
def test_plot_neighbours_bad_inputs(tmp_path, kwargs, err, match):
    args = dict(query_images=_images(2), query_labels=np.array([0, 1]),
                neighbour_images=_images(4).reshape(2, 2, 32, 32, 3),
                neighbour_labels=np.zeros((2, 2), int))
    args.update(kwargs)
    with pytest.raises(err, match=match):
        vz.plot_neighbours(path=tmp_path / "x.png", **args)


def test_find_neighbours_and_retrieval_examples(tmp_path):
    x, y = _clusters(n=40, c=4)
    idx = vz.find_neighbours(x, x, 3, exclude_self=True)
    assert idx.shape == (40, 3)
    assert not np.any(idx == np.arange(40)[:, None])
    imgs = _images(40)
    img = _read_png(vz.plot_retrieval_examples(imgs, y, x, imgs, y, x, tmp_path / "r.png",
                                               k=4, n_queries=3, exclude_self=True))
    assert _has_colour(img, vz.MATCH_COLOUR)
    # Test queries against a separate reference set.
    xr, yr = _clusters(n=60, c=4, seed=0)
    _read_png(vz.plot_retrieval_examples(imgs[:10], y[:10], x[:10], _images(60), yr, xr,
                                         tmp_path / "r2.png", k=2, n_queries=20))
    with pytest.raises(ValueError,
                       match="reference_images has 40 images but reference_embeddings has 60"):
        vz.plot_retrieval_examples(imgs, y, x, imgs, yr, xr, tmp_path / "r3.png")
