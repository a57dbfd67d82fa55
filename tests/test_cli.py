"""End-to-end: the CIFAR-10 CLI on a few hundred real images, and its error paths."""

import json
import pathlib
import subprocess
import sys

import pytest

from experiments import cifar10
from jaxmetric import report

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

FILES = ("config.json", "metrics.jsonl", "metrics.json", "report.md",
         "tsne.png", "curves.png", "neighbours.png")


@pytest.fixture()
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _smoke_args(tarball, out, *extra):
    return ["--loss", "triplet", "--model", "homebrew", "--data-dir", str(tarball),
            "--max-train", "480", "--max-test", "160", "--batch-size", "96",
            "--epochs", "3", "--warmup-epochs", "0.5", "--lr", "0.05", "--eval-every", "1",
            "--tsne-points", "160", "--no-progress", "--out", str(out), *extra]


def test_cli_smoke_run_and_reevaluate(cifar_tarball, tmp_path, isolated_cache, capsys):
    out = tmp_path / "run"
    assert cifar10.main(_smoke_args(cifar_tarball, out)) == 0
    for name in FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == "3"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[-1]["loss"] < records[0]["loss"]
    assert all(0.0 <= r["precision_at_1"] <= 1.0 for r in records)
    metrics = json.loads((out / "metrics.json").read_text())
    p1 = metrics["test_vs_train"]["precision_at_1"]
    assert p1 > 0.15  # 10 classes: chance is 0.1
    assert "JPEG q75" in (out / "report.md").read_text()

    # A second run into the same folder without --resume must not touch it.
    before = (out / "metrics.json").read_bytes()
    assert cifar10.main(_smoke_args(cifar_tarball, out)) == 1
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "metrics.json").read_bytes() == before

    # Re-evaluation of the saved run gives the same numbers.
    (out / "metrics.json").unlink()
    assert report.main([str(out), "--tsne-points", "0", "--no-progress"]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["test_vs_train"]["precision_at_1"] == pytest.approx(p1, abs=1e-6)


def test_cli_bad_flags_exit_2():
    for argv in (["--loss", "quadruplet"], ["--loss", "triplet", "--mining", "nope"],
                 ["--loss", "triplet", "--epochs", "0"], ["--loss", "triplet", "--resume"],
                 ["--loss", "triplet", "--batch-size", "100", "--classes-per-batch", "3"]):
        with pytest.raises(SystemExit) as e:
            cifar10.main(argv)
        assert e.value.code == 2, argv


def test_cli_missing_and_corrupt_data(tmp_path, isolated_cache, capsys):
    out = tmp_path / "run"
    assert cifar10.main(["--loss", "contrastive", "--data-dir", str(tmp_path / "nowhere"),
                         "--out", str(out)]) == 1
    assert "nowhere" in capsys.readouterr().err
    assert not out.exists()
    bad = tmp_path / "broken.tar.xz"
    bad.write_bytes(b"\xfd7zXZ\x00 this is not really xz")
    assert cifar10.main(["--loss", "contrastive", "--data-dir", str(bad), "--out", str(out)]) == 1
    assert "broken.tar.xz" in capsys.readouterr().err
    assert not out.exists()


def test_module_entry_points_show_help():
    for module in ("experiments.cifar10", "jaxmetric.evaluate"):
        done = subprocess.run([sys.executable, "-m", module, "--help"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "usage" in done.stdout


# ------------------------------------------------------------- documented commands

def _documented_commands():
    """Every ``python -m experiments.cifar10 ...`` command in README.md and ``--help``,
    as argument lists (line continuations joined, environment prefixes dropped)."""
    import re
    import shlex

    readme = (REPO_ROOT / "README.md").read_text()
    blocks, inside = [], False
    for line in readme.splitlines():
        if line.startswith("```"):
            inside = not inside
            blocks.append("")
        elif inside:
            blocks[-1] += line + "\n"
    texts = [*blocks, cifar10.__doc__]
    commands = []
    for text in texts:
        text = re.sub(r"\\+\n", " ", text)  # shell line continuations
        for line in text.splitlines():
            if "python -m experiments.cifar10" not in line:
                continue
            line = line.split(" #")[0]
            words = shlex.split(line.split("python -m experiments.cifar10", 1)[1])
            commands.append([w for w in words if not re.fullmatch(r"\w+=.*", w)])
    return commands


def test_every_documented_command_builds_a_valid_config():
    commands = _documented_commands()
    assert len(commands) >= 6
    for argv in commands:
        parser = cifar10.build_parser()
        args = parser.parse_args(argv)
        config = cifar10.config_from_args(args, parser)  # exits 2 on a bad combination
        assert config.warmup < config.epochs, argv


def _small_budget(argv, tarball, out):
    """The command as written, shrunk to a few steps on a few hundred real images."""
    args = cifar10.build_parser().parse_args(argv)
    epochs = args.epochs if args.epochs <= 3 else 1
    return [*argv, "--model", "homebrew", "--embed-dim", "16", "--epochs", str(epochs),
            "--max-train", "128", "--max-test", "64", "--batch-size", "64",
            "--tsne-points", "0", "--no-progress", "--data-dir", str(tarball), "--out", str(out)]


def test_help_examples_run_at_a_small_budget(cifar_tarball, tmp_path, isolated_cache):
    examples = [argv for argv in _documented_commands()
                if "--coordinator" not in argv and "--resume" not in argv]
    # One run per loss (its shortest documented command, where short runs used to fail)
    # keeps this quick; every command's configuration is checked by the test above.
    chosen = {}
    for argv in examples:
        args = cifar10.build_parser().parse_args(argv)
        if args.loss not in chosen or args.epochs < chosen[args.loss][0]:
            chosen[args.loss] = (args.epochs, argv)
    assert sorted(chosen) == ["contrastive", "triplet"]
    for i, (_, argv) in enumerate(chosen.values()):
        out = tmp_path / f"run{i}"
        assert cifar10.main(_small_budget(argv, cifar_tarball, out)) == 0, argv
        assert (out / "metrics.json").is_file(), argv
