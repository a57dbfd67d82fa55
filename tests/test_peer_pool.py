"""Tests for benchmarks.peer_pool: seeds pooled over files, later files winning."""

import json
import math

import pytest

from benchmarks import common, peer_pool


def run(side, loss, seed, p1, rp=0.4):
    timings = dict.fromkeys(common.SUMMARY_KEYS, 1.0)
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


def test_steady_cpu_use_skips_the_first_epoch():
    r = {"epoch_seconds": [20.0, 10.0, 5.0], "epoch_cpu_seconds": [50.0, 18.0, 10.0]}
    use = common.steady_cpu_use(r)
    assert use["cpu_seconds_per_epoch"] == pytest.approx(14.0)
    assert use["cores_busy"] == pytest.approx(28.0 / 15.0)
    none = {"cpu_seconds_per_epoch": None, "cores_busy": None}
    assert common.steady_cpu_use({"epoch_seconds": [1.0, 2.0]}) == none
    assert common.steady_cpu_use({"epoch_seconds": [1.0],
                                  "epoch_cpu_seconds": [2.0]}) == none
    assert common.steady_cpu_use({"epoch_seconds": [1.0, 2.0, 3.0],
                                  "epoch_cpu_seconds": [2.0, 4.0]}) == none


def test_cpu_table(tmp_path, capsys):
    def timed(side, seed, cpu, wall):
        return run(side, "contrastive", seed, 0.5) | {"epoch_seconds": [9.0, wall, wall],
                                                      "epoch_cpu_seconds": [30.0, cpu, cpu]}
    path = tmp_path / "a.json"
    path.write_text(json.dumps(doc(timed("jaxmetric", 0, 18.0, 10.0),
                                   timed("jaxmetric", 1, 17.0, 9.0),
                                   timed("pml", 0, 18.0, 9.0), timed("pml", 1, 16.0, 8.0))))
    out = tmp_path / "pooled.json"
    assert peer_pool.main([str(path), "--cpu", "--json", str(out)]) == 0
    s = json.loads(out.read_text())["summary"]["contrastive"]
    assert s["jaxmetric"]["steady_cpu_seconds_per_epoch_mean"] == pytest.approx(17.5)
    assert s["jaxmetric"]["steady_cores_busy_mean"] == pytest.approx((1.8 + 17 / 9) / 2)
    assert s["pml"]["steady_cores_busy_mean"] == pytest.approx(2.0)
    assert s["jaxmetric_vs_pml"]["steady_cpu_seconds_per_epoch_ratio"] == pytest.approx(
        17.5 / 17.0)
    text = capsys.readouterr().out
    assert "| contrastive | jaxmetric | 17.5 | 1.84 |" in text
    assert "| contrastive | PyTorch + PML | 17.0 | 2.00 |" in text
    assert "| contrastive | jaxmetric ÷ PyTorch | 1.03 | 0.92 |" in text


def test_one_seed_per_side_has_no_standard_error(tmp_path, capsys):
    path = tmp_path / "a.json"
    path.write_text(json.dumps(doc(run("jaxmetric", "triplet", 3, 0.50),
                                   run("pml", "triplet", 3, 0.52))))
    out = tmp_path / "pooled.json"
    assert peer_pool.main([str(path), "--json", str(out)]) == 0
    d = json.loads(out.read_text())["summary"]["triplet"]["jaxmetric_vs_pml"]
    assert d["precision_at_1_diff_se_points"] is None
    text = capsys.readouterr().out
    assert "| triplet | jaxmetric | 3 | 50.0 % | 40.0 % |" in text
    assert "-2.00 pts (s.e. –)" in text
