"""Tests for benchmarks.cpu.op_profile: trace events summed by HLO instruction kind."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from benchmarks.cpu import op_profile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name,expected", [
    ("ynn_fusion.47", "ynn_fusion"), ("transpose_copy_fusion", "transpose_copy_fusion"),
    ("convolution-base-dilated.3", "convolution-base-dilated"), ("add.1.2", "add"),
    ("fusion.10", "fusion")])
def test_kind_drops_the_instruction_number(name, expected):
    assert op_profile.kind(name) == expected


def test_instructions_of_a_compiled_program():
    f = jax.jit(lambda x, y: jnp.tanh(x @ y).sum(axis=0))
    text = f.lower(jnp.ones((4, 3)), jnp.ones((3, 5))).compile().as_text()
    program = op_profile.instructions(text)
    assert program and all(line.startswith(("%", "ROOT %")) for line in program.values())
    roots = [n for n, line in program.items() if line.startswith("ROOT")]
    assert roots and all(f"%{n} = " in program[n] for n in program)


def test_summarise_events_sums_by_kind_per_call():
    program = {"ynn_fusion.1": "%ynn_fusion.1 = f32[2] fusion()",
               "ynn_fusion.2": "%ynn_fusion.2 = f32[2] fusion()",
               "transpose_copy_fusion.7": "%transpose_copy_fusion.7 = f32[2] fusion()"}
    ms = 1_000_000  # ns
    events = [("ynn_fusion.1", 30 * ms), ("ynn_fusion.1", 30 * ms), ("ynn_fusion.2", 20 * ms),
              ("transpose_copy_fusion.7", 20 * ms),
              ("ThunkExecutor::Execute", 500 * ms),       # not an instruction: ignored
              ("block_until_ready", 900 * ms)]
    out = op_profile.summarise_events(events, program, calls=2, wall_ms=40.0, top=2)
    kinds = {row["kind"]: row for row in out["kinds"]}
    assert kinds["ynn_fusion"]["ms"] == pytest.approx(40.0)          # (30+30+20) / 2 calls
    assert kinds["ynn_fusion"]["instructions"] == 2
    assert kinds["transpose_copy_fusion"]["ms"] == pytest.approx(10.0)
    assert [row["kind"] for row in out["kinds"]] == ["ynn_fusion", "transpose_copy_fusion"]
    assert sum(row["share"] for row in out["kinds"]) == pytest.approx(1.0)
    assert kinds["ynn_fusion"]["share"] == pytest.approx(0.8)
    assert out["traced_ms"] == pytest.approx(50.0)
    assert out["traced_over_wall"] == pytest.approx(1.25)
    assert [row["name"] for row in out["top"]] == ["ynn_fusion.1", "ynn_fusion.2"]
    assert out["top"][0]["ms"] == pytest.approx(30.0)
    with pytest.raises(ValueError, match="calls"):
        op_profile.summarise_events(events, program, calls=0, wall_ms=1.0)


def test_refuses_once_jax_has_started():
    with pytest.raises(SystemExit):
        op_profile.main(["--model", "homebrew", "--batch-size", "2"])


def test_profiles_a_small_network(tmp_path):
    out = tmp_path / "profile.json"
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-m", "benchmarks.cpu.op_profile", "--model", "homebrew",
                    "--batch-size", "4", "--reps", "1", "--top", "3", "--json", str(out)],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    doc = json.loads(out.read_text())
    assert op_profile.TRACE_FLAG in doc["xla_flags"]
    assert doc["traced_ms"] > 0 and doc["wall_ms"] > 0 and len(doc["top"]) == 3
    assert sum(row["share"] for row in doc["kinds"]) == pytest.approx(1.0)
    assert doc["settings"]["model"] == "homebrew"
