"""Tests for benchmarks.cpu.xla_cpu_settings: settings parsed, runs summarised against default."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks.cpu import xla_cpu_settings as xs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_pairs():
    assert xs.parse_pairs(None, "--flags") == {}
    assert xs.parse_pairs(["a=--x=1 --y=2", "b=/p/python"], "--flags") == {
        "a": "--x=1 --y=2", "b": "/p/python"}


@pytest.mark.parametrize("items,match", [
    (["noequals"], "NAME=VALUE"), (["=--x"], "NAME=VALUE"), (["a="], "NAME=VALUE"),
    (["default=--x"], "already taken"), (["a=--x", "a=--y"], "already taken")])
def test_parse_pairs_rejects(items, match):
    with pytest.raises(ValueError, match=match):
        xs.parse_pairs(items, "--flags")


def run(setting, repeat, **medians):
    return {"setting": setting, "repeat": repeat,
            "times_ms": {k: [v - 1, v, v + 5] for k, v in medians.items()}}


def test_summarise_best_over_alternations_and_ratio_to_default():
    runs = [run("default", 1, forward_backward=100, step=50, loop=60),
            run("fast", 1, forward_backward=80, step=40, loop=66),
            run("default", 2, forward_backward=90, step=55, loop=50),
            run("fast", 2, forward_backward=85, step=45),  # its loop missing
            ]
    s = xs.summarise(runs)
    assert s["default"]["best_ms"] == {"forward_backward": 90, "step": 50, "loop": 50}
    assert s["default"]["vs_default"] == {"forward_backward": 1.0, "step": 1.0, "loop": 1.0}
    assert s["fast"]["best_ms"] == {"forward_backward": 80, "step": 40, "loop": 66}
    assert s["fast"]["vs_default"] == pytest.approx(
        {"forward_backward": 80 / 90, "step": 0.8, "loop": 66 / 50})
    table = xs.markdown(s, "header")
    assert "| fast | 80.0 | 40.0 | 66.0 | 0.89 | 0.80 | 1.32 |" in table


def test_summarise_without_default_has_no_ratios():
    s = xs.summarise([run("other", 1, step=10)])
    assert s["other"]["vs_default"] == {"forward_backward": None, "step": None, "loop": None}
    assert "| other | – | 10.0 | – | – | – | – |" in xs.markdown(s, "h")


def test_step_parts_command():
    class A:
        model, batch_size, loss, images, loop_images = "homebrew", 32, "triplet", 64, 64
        steps, reps, jax_cpu_devices = 2, 3, 0

    cmd = xs.step_parts_command("py", A, ("--conv-chunk-elements", "0"), "out.json")
    assert cmd[:5] == ["py", "-m", "benchmarks.cpu.step_parts", "--side", "jaxmetric"]
    assert "--jax-cpu-devices" not in cmd and cmd[-2:] == ["--conv-chunk-elements", "0"]
    A.jax_cpu_devices = 2
    cmd = xs.step_parts_command("py", A, (), "out.json")
    assert cmd[cmd.index("--jax-cpu-devices") + 1] == "2"


@pytest.mark.parametrize("argv,match", [
    (["--settings", "nope"], "unknown settings"),
    (["--interpreter", "x=/no/such/python"], "cannot run the benchmark"),
    (["--flags", "a=--x", "--interpreter", f"a={sys.executable}"], "name the same setting"),
    (["--images", "8"], "at least one batch")])
def test_bad_arguments_get_a_clear_error(argv, match, capsys):
    with pytest.raises(SystemExit):
        xs.main(argv)
    assert match in capsys.readouterr().err


def test_interpreter_versions_of_this_python():
    v = xs.interpreter_versions(sys.executable)
    assert v["python"] == ".".join(map(str, sys.version_info[:3]))
    assert {"jax", "jaxlib", "flax"} <= set(v)


@pytest.mark.slow
def test_end_to_end_flags_reach_the_runs_and_a_failing_setting_is_reported(tmp_path):
    out = tmp_path / "settings.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.cpu.xla_cpu_settings", "--settings", "default",
         "--flags", "traced=--xla_cpu_enable_xprof_traceme=true",
         "--flags", "bogus=--xla_cpu_no_such_flag=true",
         "--batch-size", "16", "--images", "32", "--loop-images", "32", "--steps", "1",
         "--reps", "1", "--repeat", "1", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED: bogus (alternation 1)" in proc.stderr
    doc = json.loads(out.read_text())
    assert [r["setting"] for r in doc["runs"]] == ["default", "traced"]
    assert [r["xla_flags"] for r in doc["runs"]] == ["", "--xla_cpu_enable_xprof_traceme=true"]
    assert doc["settings"]["bogus"]["xla_flags"] == "--xla_cpu_no_such_flag=true"
    assert doc["summary"]["default"]["vs_default"]["step"] == 1.0
    assert set(doc["summary"]) == {"default", "traced"}
    assert "| traced |" in proc.stdout
