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


@pytest.mark.slow
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
                 ["--loss", "triplet", "--batch-size", "100", "--classes-per-batch", "3"],
                 ["--loss", "triplet", "--cpu-devices", "0"]):
        with pytest.raises(SystemExit) as e:
            cifar10.main(argv)
        assert e.value.code == 2, argv


def test_cli_cpu_devices_after_jax_started_is_refused_clearly(capsys):
    """JAX has its devices here already: another count is a clear exit 2, not a crash."""
    import jax

    other = len(jax.local_devices(backend="cpu")) + 1
    with pytest.raises(SystemExit) as e:
        cifar10.main(["--loss", "triplet", "--cpu-devices", str(other)])
    assert e.value.code == 2
    assert "--cpu-devices: cannot make" in capsys.readouterr().err


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
    for module in ("experiments.cifar10", "experiments.retrieval", "jaxmetric.report"):
        done = subprocess.run([sys.executable, "-m", module, "--help"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "usage" in done.stdout


# ------------------------------------------------------------- documented commands

def _doc_texts():
    """The code blocks of README.md and of every page under docs/."""
    paths = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").rglob("*.md"))]
    blocks = []
    for path in paths:
        inside = False
        for line in path.read_text().splitlines():
            if line.lstrip().startswith("```"):
                inside = not inside
                blocks.append("")
            elif inside:
                blocks[-1] += line + "\n"
    return blocks


def _documented_commands(module="experiments.cifar10", docstring=None):
    """Every ``python -m <module> ...`` command in README.md, docs/**/*.md and the
    module's docstring (``--help``), as argument lists (line continuations joined,
    environment prefixes dropped)."""
    import re
    import shlex

    command = f"python -m {module}"
    texts = [*_doc_texts(), cifar10.__doc__ if docstring is None else docstring]
    commands = []
    for text in texts:
        text = re.sub(r"\\+\n", " ", text)  # shell line continuations
        for line in text.splitlines():
            if command not in line:
                continue
            line = line.split(" #")[0]
            words = shlex.split(line.split(command, 1)[1])
            commands.append([w for w in words if not re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", w)])
    return commands


def test_every_documented_command_builds_a_valid_config():
    commands = _documented_commands()
    assert len(commands) >= 6
    for argv in commands:
        parser = cifar10.build_parser()
        args = parser.parse_args(argv)
        config = cifar10.config_from_args(args, parser)  # exits 2 on a bad combination
        assert config.warmup < config.epochs, argv


def test_every_documented_retrieval_command_builds_a_valid_config():
    from experiments import driver, retrieval

    commands = _documented_commands("experiments.retrieval", retrieval.__doc__)
    assert len(commands) >= 3
    for argv in commands:
        parser = retrieval.build_parser()
        args = parser.parse_args(argv)
        config = driver.config_from_args(args, parser)
        data = retrieval.data_config_from_args(args, parser, config)  # exits 2 if invalid
        assert (data.tfds is None) != (data.path is None), argv
        assert config.warmup < config.epochs, argv


def test_the_command_check_reads_the_docs_and_fails_on_a_bad_flag():
    """The docs pages are read (the ImageNet-weights command lives only there), and a
    command with a flag that does not exist would stop the test above."""
    assert any("--pretrained" in argv for argv in _documented_commands())
    (bad,) = _documented_commands(docstring="python -m experiments.cifar10 --no-such-flag 1\n")[-1:]
    with pytest.raises(SystemExit) as exit_info:
        cifar10.build_parser().parse_args(bad)
    assert exit_info.value.code == 2


def _config(argv):
    parser = cifar10.build_parser()
    return cifar10.config_from_args(parser.parse_args(argv), parser)


def _data(argv):
    """The :class:`~jaxmetric.data.DataConfig` the command builds."""
    parser = cifar10.build_parser()
    args = parser.parse_args(argv)
    return cifar10.data_config_from_args(args, parser, cifar10.config_from_args(args, parser))


def _small_budget(argv, tarball, out):
    """The command as written, shrunk to a few steps on a few hundred real images."""
    epochs = _config(argv).epochs if _config(argv).epochs <= 3 else 1
    return [*argv, "--model", "homebrew", "--embed-dim", "16", "--epochs", str(epochs),
            "--max-train", "128", "--max-test", "64", "--batch-size", "64",
            "--tsne-points", "0", "--no-progress", "--data-dir", str(tarball), "--out", str(out)]


@pytest.mark.slow
def test_help_examples_run_at_a_small_budget(cifar_tarball, tmp_path, isolated_cache):
    examples = [argv for argv in _documented_commands()
                if not {"--coordinator", "--resume", "--pretrained"} & set(argv)]
    # One run per way the train step drives a loss (pairs or learned class vectors, which
    # learned argument, the optimizer): the shortest documented command of each, where
    # short runs used to fail. Every command's configuration is checked by the test above.
    from jaxmetric.losses import registry

    chosen = {}
    for argv in examples:
        config = _config(argv)
        entry = registry.get(config.loss)
        kind = (entry.pairs, entry.learned, config.run_optimizer)
        if kind not in chosen or config.epochs < chosen[kind][0]:
            chosen[kind] = (config.epochs, argv)
    assert {(True, None, "sgd"), (False, "proxies", "sgd"), (False, "weights", "adamw"),
            (True, None, "adamw")} <= set(chosen), sorted(chosen)
    for i, (_, argv) in enumerate(chosen.values()):
        out = tmp_path / f"run{i}"
        assert cifar10.main(_small_budget(argv, cifar_tarball, out)) == 0, argv
        assert (out / "metrics.json").is_file(), argv


# ------------------------------------------------------- flags from the config, presets

def _fields():
    import dataclasses

    from jaxmetric.train.config import TrainConfig

    return dataclasses.fields(TrainConfig)


def test_every_config_field_has_a_flag_with_help():
    parser = cifar10.build_parser()
    by_dest = {}
    for action in parser._actions:
        by_dest.setdefault(action.dest, []).extend(action.option_strings)
    for field in _fields():
        assert field.metadata.get("help"), field.name
        assert "--" + field.name.replace("_", "-") in by_dest[field.name], field.name
    import dataclasses

    from experiments import retrieval
    from jaxmetric.data import DataConfig

    for module in (cifar10, retrieval):
        actions = {a.dest: a.option_strings for a in module.build_parser()._actions}
        for field in dataclasses.fields(DataConfig):
            if field.name in module.DATA_FLAGS:
                flag = field.metadata.get("flag", "--" + field.name.replace("_", "-"))
                assert field.metadata.get("help") and flag in actions[field.name], field.name
    # the settings that had no flag before, and a value per type
    config = _config(["--loss", "triplet", "--stem", "imagenet", "--momentum", "0.8",
                      "--log-every", "7", "--keep-checkpoints", "2", "--lr", "0.3"])
    assert (config.stem, config.momentum, config.log_every, config.keep_checkpoints,
            config.lr) == ("imagenet", 0.8, 7, 2, 0.3)


def test_flags_left_out_take_the_config_defaults():
    from jaxmetric.train.config import TrainConfig

    config = _config(["--loss", "triplet", "--out", "x"])
    assert config == TrainConfig(loss="triplet", out="x")
    assert _config(["--loss", "triplet"]).out.startswith("runs/cifar10-triplet-")


def test_bool_flags_and_the_distance_flag(capsys):
    base = ["--loss", "triplet"]
    assert _config(base).distance is None and _config(base).augment
    assert _config(base).loss_kwargs["distance"] == "squared_l2"
    assert _config([*base, "--distance", "cosine"]).loss_kwargs["distance"] == "cosine"
    assert _config(["--loss", "contrastive"]).loss_kwargs["distance"] == "l2"
    for old, new in [("--euclidean", "--distance l2"), ("--no-squared", "--distance l2"),
                     ("--squared", "--distance squared_l2")]:
        with pytest.raises(SystemExit) as exit_info:
            _config([*base, old])
        assert exit_info.value.code == 2
        assert f"{old} is now {new}" in capsys.readouterr().err
    assert not _config([*base, "--no-augment"]).augment
    assert _config([*base, "--no-augment", "--augment"]).augment


def test_optional_fields_take_none_and_choices_are_checked():
    argv = ["--preset", "cpu", "--loss", "triplet", "--max-train", "none", "--mining",
            "semihard", "--margin", "NONE"]
    config = _config(argv)
    assert _data(argv).max_train is None and config.margin is None
    assert config.mining == "semihard"
    with pytest.raises(SystemExit) as e:
        _data(["--loss", "triplet", "--max-train", "100", "--batch-size", "128"])
    assert e.value.code == 2
    for argv in (["--loss", "triplet", "--max-train", "many"],
                 ["--loss", "triplet", "--mining", "none-at-all"],
                 ["--loss", "triplet", "--epochs", "2.5"],
                 ["--epochs", "3"],  # no loss from the flags or a preset
                 ["--loss", "triplet", "--preset", "gpu"]):
        with pytest.raises(SystemExit) as e:
            _config(argv)
        assert e.value.code == 2, argv


def test_preset_cpu_and_explicit_flags_override_it():
    config = _config(["--preset", "cpu", "--loss", "contrastive"])
    data = _data(["--preset", "cpu", "--loss", "contrastive"])
    assert (config.model, config.batch_size, config.epochs, data.max_train,
            data.max_test) == ("homebrew", 256, 10, 10_000, 2_000)
    assert config.loss == "contrastive" and config.warmup == 1.0
    config = _config(["--preset", "cpu", "--loss", "triplet", "--epochs", "3",
                      "--batch-size", "128"])
    assert (config.epochs, config.batch_size, config.model) == (3, 128, "homebrew")
    # The order on the command line does not matter: flags beat the preset.
    assert _config(["--epochs", "3", "--preset", "cpu", "--loss", "triplet"]).epochs == 3


def test_presets_are_valid_configs():
    import dataclasses

    from experiments.presets import PRESETS
    from jaxmetric.data import DataConfig
    from jaxmetric.train.config import TrainConfig

    names = {f.name for f in _fields()}
    data_names = {f.name for f in dataclasses.fields(DataConfig)}
    for name, values in PRESETS.items():
        assert set(values) <= names | data_names, name
        TrainConfig(**({"loss": "triplet"} | {k: v for k, v in values.items() if k in names}))
        DataConfig(**{k: v for k, v in values.items() if k in data_names})
    h200 = _config(["--preset", "h200"])
    assert (h200.model, h200.dtype, h200.batch_size, h200.epochs, h200.warmup,
            h200.eval_every, h200.checkpoint_every, h200.loss, h200.mining) == (
        "resnet18", "bfloat16", 1024, 40, 5.0, 10, 10, "triplet", "semihard")
    assert _config(["--preset", "h200-contrastive"]).loss == "contrastive"


def test_gpu_script_runs_the_h200_presets_instead_of_spelling_them_out():
    import re

    script = (REPO_ROOT / "benchmarks" / "gpu.sh").read_text()
    runs = [line for line in script.splitlines() if "experiments.cifar10" in line]
    assert runs and all("--preset $PRESET" in line for line in runs), runs
    assert re.search(r"PRESET=h200\b", script) and "PRESET=h200-contrastive" in script
    assert "--preset h200" in script  # the throughput benchmark uses the recipe too
    for spelled in ("--epochs", "--batch-size", "--dtype", "--warmup-epochs", "--mining",
                    "--eval-every", "--checkpoint-every", "EPOCHS=", "BATCH=", "DTYPE="):
        assert spelled not in script, spelled


def test_cpu_hint_is_a_valid_command():
    argv = cifar10.CPU_COMMAND.replace("LOSS", "triplet").split()[3:]
    config = _config(argv)
    assert (config.model, config.epochs, _data(argv).max_train) == ("homebrew", 10, 10_000)


# ------------------------------------------------------------ classes never trained on

@pytest.mark.slow
def test_unseen_classes_run_never_trains_on_a_held_out_image(cifar_tarball, tmp_path,
                                                            isolated_cache, monkeypatch):
    import numpy as np

    from jaxmetric import data, train

    trained = []
    fit = train.fit

    def recording_fit(config, dataset, *args, **kwargs):
        trained.append(dataset)
        return fit(config, dataset, *args, **kwargs)

    monkeypatch.setattr(train, "fit", recording_fit)
    out = tmp_path / "run"
    argv = ["--loss", "contrastive", "--model", "homebrew", "--embed-dim", "16",
            "--unseen-classes", "5", "--data-dir", str(cifar_tarball), "--max-train", "320",
            "--max-test", "100", "--batch-size", "64", "--epochs", "1", "--tsne-points", "0",
            "--no-progress", "--out", str(out)]
    assert cifar10.main(argv) == 0
    (dataset,) = trained
    assert dataset.class_names == data.CIFAR10_CLASSES[:5]
    assert set(np.unique(dataset.train.labels)) == set(range(5))
    assert len(dataset.train) == 160  # 32 of each of the 5 training classes
    # No training image is an image of a held-out class (compared pixel for pixel).
    whole = data.load_cifar10(cifar_tarball, max_train=320, max_test=100)
    held = np.concatenate([whole.train.images[whole.train.labels >= 5],
                           whole.test.images[whole.test.labels >= 5]])
    seen = {img.tobytes() for img in dataset.train.images}
    assert not seen & {img.tobytes() for img in held}
    assert json.loads((out / "config.json").read_text())["data"]["unseen_classes"] == 5
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"]["eval_classes"] == list(data.CIFAR10_CLASSES[5:])
    assert metrics["test_vs_train"]["n_queries"] == 50  # held-out test images
    assert metrics["test_vs_test"]["n_queries"] == 50
    for protocol in ("test_vs_train", "test_vs_test"):
        for key in ("recall_at_1", "recall_at_8", "r_precision", "map_at_r"):
            assert 0.0 <= metrics[protocol][key] <= 1.0
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["precision_at_1_of"] == "held-out classes, test vs train"
    assert "classes held out of training" in (out / "report.md").read_text()


def test_unseen_classes_out_of_range_exit_2(cifar_tarball, tmp_path, isolated_cache):
    for n in ("1", "9"):  # 1: the config; 9: the split (10 classes leave 1 to train)
        with pytest.raises(SystemExit) as e:
            cifar10.main(["--loss", "triplet", "--unseen-classes", n, "--data-dir",
                          str(cifar_tarball), "--max-train", "100", "--max-test", "20",
                          "--batch-size", "20", "--out", str(tmp_path / n)])
        assert e.value.code == 2, n
        assert not (tmp_path / n).exists()
