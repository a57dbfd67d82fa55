"""benchmarks/search.py: the three index kinds side by side on a small clustered gallery."""

import json

import numpy as np

from benchmarks import search


def test_clustered_unit_vectors_are_unit_and_clustered():
    x = search.clustered_unit_vectors(500, 16, clusters=5, spread=0.01, seed=0)
    assert x.dtype == np.float32 and x.shape == (500, 16)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    sims = x @ x.T
    assert (sims > 0.99).mean() > 0.15  # about a fifth of the pairs share a centre


def test_small_run_writes_every_kind(tmp_path, capsys):
    out = tmp_path / "search.json"
    assert search.main(["--n", "3000", "--dim", "32", "--clusters", "20", "--queries", "50",
                        "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = {r["kind"]: r for r in doc["indexes"]}
    assert set(rows) == {"flat", "ivfpq", "hnsw"}
    assert rows["flat"]["recall_at_10"] == 1.0
    for r in rows.values():
        assert 0.0 < r["recall_at_10"] <= 1.0 and r["queries_per_second"] > 0
        assert r["index_bytes"] > 0
    assert rows["ivfpq"]["index_bytes"] < rows["flat"]["index_bytes"]
    assert doc["gallery"]["n"] == 3000 and "environment" in doc
