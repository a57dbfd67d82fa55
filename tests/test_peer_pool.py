"""Tests for benchmarks.peer_pool: seeds pooled over files, later files winning."""

import json
import math

import pytest

from benchmarks import peer_pool, peer_training


def run(side, loss, seed, p1, rp=0.4):
    timings = dict.fromkeys(peer_training.SUMMARY_KEYS, 1.0)
    return {"side": side, "loss": loss, "seed": seed, "precision_at_1": p1, "r_precision": rp,
            "map_at_r": 0.2, "test_vs_test_precision_at_1": p1} | timings


def doc(*runs):
    return {"benchmark": "peer_training", "runs": list(runs)}


def test_pooled_means_sds_and_standard_error(tmp_path, capsys):
    a = doc(run("jaxmetric", "triplet", 0, 0.50), run("pml", "triplet", 0, 0.52),
            run("jaxmetric", "triplet", 1, 0.99))          # replaced by the second file
    b = doc(run("jaxmetric", "triplet", 1, 0.54), run("pml", "triplet", 1, 0.56),
            run("jaxmetric", "triplet", 2, 0.52), run("pml", "triplet", 2, 0.54))
    paths = []
    for i, d in enumerate((a, b)):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(d))
    out = tmp_path / "pooled.json"
    assert peer_pool.main([str(p) for p in paths] + ["--json", str(out)]) == 0
    s = json.loads(out.read_text())["summary"]["triplet"]
    assert sorted(s["jaxmetric"]["seeds"]) == [0, 1, 2] == sorted(s["pml"]["seeds"])
    assert s["jaxmetric"]["precision_at_1_mean"] == pytest.approx(0.52)
    assert s["jaxmetric"]["precision_at_1_sd"] == pytest.approx(0.02)
    assert s["pml"]["precision_at_1_mean"] == pytest.approx(0.54)
    d = s["jaxmetric_vs_pml"]
    assert d["precision_at_1_diff_points"] == pytest.approx(-2.0)
    assert d["precision_at_1_diff_se_points"] == pytest.approx(math.sqrt(4 / 3 + 4 / 3))
    assert "-2.00 pts" in capsys.readouterr().out


def test_refuses_other_files(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"benchmark": "step_parts"}))
    with pytest.raises(SystemExit):
        peer_pool.main([str(path)])
