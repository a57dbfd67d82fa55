"""Tests for benchmarks.cpu.device_sync: the synchronised step against independent ones."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks.cpu import device_sync

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(mode, ms, cores=1.9, batch=256):
    return {"mode": mode, "ms_per_batch": ms, "images_per_second": 1e3 * batch / ms,
            "cores_busy": cores}


def test_summarise_best_run_per_mode_and_ratio():
    runs = [run("synchronised", 230.0, 1.85), run("independent", 210.0, 1.93),
            run("synchronised", 225.0, 1.86), run("independent", 215.0, 1.94),
            run("synchronised", 240.0)]
    s = device_sync.summarise(runs)
    assert s["synchronised"]["ms_per_batch"] == 225.0
    assert s["synchronised"]["cores_busy"] == 1.86
    assert s["synchronised"]["ms_per_batch_median"] == 230.0
    assert s["synchronised"]["n"] == 3 and s["independent"]["n"] == 2
    assert s["independent"]["images_per_second"] == pytest.approx(256e3 / 210.0)
    assert s["synchronised_over_independent"] == pytest.approx(225.0 / 210.0)
    table = device_sync.markdown(s, "h")
    assert "| synchronised | 225.0 | 230.0 | 1138 | 1.86 |" in table
    assert "synchronised ÷ independent: 1.071" in table


def test_summarise_one_mode_has_no_ratio():
    s = device_sync.summarise([run("independent", 100.0)])
    assert "synchronised_over_independent" not in s and "synchronised" not in s
    assert "÷" not in device_sync.markdown(s, "h")


@pytest.mark.parametrize("argv,match", [
    (["--devices", "1"], "must be >= 2"),
    (["--devices", "3", "--batch-size", "256"], "must divide over"),
    (["--images", "16"], "at least one batch"),
    (["--repeat", "0"], ">= 1")])
def test_bad_arguments_get_a_clear_error(argv, match, capsys):
    with pytest.raises(SystemExit):
        device_sync.main(argv)
    assert match in capsys.readouterr().err


@pytest.mark.slow
def test_end_to_end(tmp_path):
    out = tmp_path / "sync.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.cpu.device_sync", "--batch-size", "16", "--images", "32",
         "--steps", "2", "--repeat", "1", "--devices", "2", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    by_mode = {r["mode"]: r for r in doc["runs"]}
    assert set(by_mode) == set(device_sync.MODES)
    assert by_mode["synchronised"]["trainings"] == 1
    assert by_mode["synchronised"]["batch_per_training"] == 16
    assert by_mode["independent"]["trainings"] == 2
    assert by_mode["independent"]["batch_per_training"] == 8
    assert all(len(r["devices"]) == 2 and len(r["losses"]) == r["trainings"]
               for r in doc["runs"])
    assert doc["summary"]["synchronised_over_independent"] > 0
    assert by_mode["synchronised"]["collectives_per_step"].get("all-reduce", 0) >= 4
    # the same program on a mesh of one: its collectives span one device each
    assert (by_mode["independent"]["collectives_per_step"]
            == by_mode["synchronised"]["collectives_per_step"])
    assert "synchronised ÷ independent" in proc.stdout


def test_collectives_counts_hlo_opcodes():
    hlo = "\n".join([
        "  %a = f32[2,32]{1,0} all-reduce(%x), channel_id=1",
        "  %b = (f32[], f32[]) all-reduce(%y, %z), channel_id=2",
        "  %c = f32[256,128]{1,0} all-gather(%w), dimensions={0}",
        "  %d = f32[4]{0} all-reduce-start(%v)", "  %e = f32[4]{0} all-reduce-done(%d)",
        "  ROOT %f = f32[8]{0} reduce-scatter(%u)", "  %g = f32[4]{0} add(%p, %q)"])
    assert device_sync.collectives(hlo) == {"all-gather": 1, "all-reduce": 3,
                                            "reduce-scatter": 1}
