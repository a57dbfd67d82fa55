"""jaxmetric.tune: search spaces, validation splits, the command line, and a tiny study
that is killed mid-trial and resumed from its SQLite storage."""

import json
import os
import pathlib
import pickle
import signal
import sqlite3
import subprocess
import sys
import time

import jax
import numpy as np
import optuna
import pytest

from jaxmetric import train
from jaxmetric.data import CIFAR10_CLASSES, Dataset, Split, splits
from jaxmetric.losses import registry
from jaxmetric.losses.registry import Choice, Range
from jaxmetric.train.config import TrainConfig
from jaxmetric.tune import cli, space

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------- search spaces


def _sampled(loss, seed):
    """The trial values of one random draw from ``loss``'s space, and the lowest corner."""
    free, _ = space.free_space({"loss": loss})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    drawn = space.suggest(study.ask(), free)
    lowest = {k: p.options[-1] if isinstance(p, Choice) else p.low for k, p in free.items()}
    highest = {k: p.options[0] if isinstance(p, Choice) else p.high for k, p in free.items()}
    return drawn, lowest, highest


@pytest.mark.parametrize("loss", registry.NAMES)
def test_every_loss_space_gives_values_the_loss_accepts(loss):
    """Each declared name is a setting or a keyword of the loss, and a random draw and both
    corners of the space make configs whose loss accepts its values and has a gradient
    (traced with ``jax.eval_shape``, as the training command checks a run's settings)."""
    space.check_space(loss)
    entry = registry.get(loss)
    assert {"optimizer", "lr_factor"} <= set(entry.tuning_space)
    assert ("loss_lr_multiplier" in entry.tuning_space) == (entry.learned is not None)
    emb = jax.ShapeDtypeStruct((8, 6), np.float32)
    labels = jax.ShapeDtypeStruct((8,), np.int32)
    for params in _sampled(loss, seed=1):
        config = TrainConfig(loss=loss, embed_dim=6,
                             **space.trial_values({"loss": loss}, params))
        train.check_loss_values(config)  # the loss's own checks of its values
        assert config.peak_lr > 0
        loss_fn = train.make_loss_fn(config)
        learned = jax.eval_shape(lambda c=config: train.init_loss_params(
            c, jax.random.key(0), 4, 6))

        def scalar(e, y, p, fn=loss_fn):
            return fn(e, y, params=p, key=jax.random.key(0))[0]

        # Called with the sampled values (traced: shapes, no computation), gradient too.
        value, grads = jax.eval_shape(jax.value_and_grad(scalar, argnums=(0, 2)), emb,
                                      labels, learned)
        assert value.shape == () and grads[0].shape == (8, 6), (loss, params)


def test_a_space_with_a_name_the_loss_lacks_is_refused(monkeypatch):
    entry = registry.get("arcface")
    bad = registry.LossEntry(entry.fn, "margin", learned="weights", pairs=False,
                             search_space={"no_such_option": Range(0.1, 1.0)})
    monkeypatch.setattr(registry, "get", lambda name: bad)
    with pytest.raises(ValueError, match="no_such_option"):
        space.check_space("arcface")
    with pytest.raises(ValueError, match="low < high"):
        Range(1.0, 1.0)
    with pytest.raises(ValueError, match="log Range"):
        Range(0.0, 1.0, log=True)
    with pytest.raises(TypeError, match="Range or Choice"):
        registry.LossEntry(entry.fn, search_space={"margin": (0.1, 0.5)})


def test_flags_fix_what_they_set_and_lr_factor_scales_the_default():
    free, left = space.free_space({"loss": "arcface", "optimizer": "sgd", "lr": 0.1,
                                   "loss_options": "scale=30"})
    assert set(free) == {"margin", "loss_lr_multiplier"}
    assert set(left) == {"optimizer", "lr_factor", "scale"}
    free, left = space.free_space({"loss": "triplet", "soft_margin": True})
    assert "margin" not in free and "soft_margin" in left["margin"]
    base = {"loss": "arcface", "batch_size": 256}
    assert space.trial_values(base, {"optimizer": "sgd", "lr_factor": 2.0})["lr"] == \
        pytest.approx(0.2)
    values = space.trial_values(base | {"loss_options": "large_angle=plain"},
                                {"optimizer": "adamw", "lr_factor": 0.5, "scale": 16.25})
    assert values["lr"] == pytest.approx(5e-4)
    assert values["loss_options"] == "large_angle=plain,scale=16.25"
    assert TrainConfig(**base, **values).loss_kwargs["scale"] == 16.25


def test_default_values_are_what_a_run_without_tuned_values_trains_with():
    base = {"loss": "arcface", "batch_size": 256}
    free, _ = space.free_space(base)
    values = space.default_values(base, free)
    entry = registry.get("arcface")
    config = TrainConfig(**base)
    assert values["optimizer"] == config.run_optimizer == entry.optimizer
    assert values["lr_factor"] == pytest.approx(entry.lr_factor)
    assert values["loss_lr_multiplier"] == entry.lr_multiplier
    assert values["margin"] == entry.margin and values["scale"] == entry.options["scale"]
    # The values become the same run again; a flag's setting shows; function defaults.
    assert TrainConfig(**base, **space.trial_values(base, values)).peak_lr == \
        pytest.approx(config.peak_lr)
    base = {"loss": "cosface", "optimizer": "adamw"}  # SGD by default: AdamW's usual rate
    free, _ = space.free_space(base)
    values = space.default_values(base, free)
    assert "optimizer" not in values and values["lr_factor"] == 1.0
    assert (values["margin"], values["scale"], values["loss_lr_multiplier"]) == (0.35, 64.0, 1.0)
    assert space.default_values({"loss": "supcon"}, {"temperature": None}) == \
        {"temperature": 0.1}


# ----------------------------------------------------------------------- validation splits


def _numbered(n_train=60, n_test=20, classes=6):
    """Every image carries its own index (train: 0..n_train-1, test: 1000+) in its pixels."""
    def part(n, offset):
        ids = np.arange(n) + offset
        images = np.zeros((n, 4, 4, 3), np.uint8)
        images[:, 0, 0, 0], images[:, 0, 0, 1] = ids // 256, ids % 256
        return Split(images, (np.arange(n) % classes).astype(np.int32))

    return Dataset(part(n_train, 0), part(n_test, 1000), tuple(f"c{i}" for i in range(classes)),
                   description="numbered")


def _ids(split):
    return set((split.images[:, 0, 0, 0].astype(int) * 256 + split.images[:, 0, 0, 1]).tolist())


def test_validation_split_is_balanced_random_and_never_the_test_set():
    data = _numbered()
    val = splits.validation_split(data, 0.2, seed=3)
    assert _ids(val.train) | _ids(val.test) == _ids(data.train)
    assert not _ids(val.train) & _ids(val.test)
    assert not (_ids(val.train) | _ids(val.test)) & _ids(data.test)
    assert np.bincount(val.test.labels).tolist() == [2] * 6
    assert val.class_names == data.class_names
    again = splits.validation_split(data, 0.2, seed=3)
    other = splits.validation_split(data, 0.2, seed=4)
    assert _ids(again.test) == _ids(val.test) != _ids(other.test)
    assert _ids(val.test) != set(range(12))  # random, not the first images
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        splits.validation_split(data, 1.0)


def test_validation_classes_are_training_classes_held_out_whole():
    data = _numbered(n_train=80, n_test=40, classes=8)
    split = splits.hold_out_last(data, 2)  # the test protocol's unseen classes
    val = splits.validation_classes(split.train, 2, seed=0)
    unseen = set(split.eval.class_names)
    assert set(val.eval.class_names).isdisjoint(val.train.class_names)
    assert set(val.eval.class_names).isdisjoint(unseen)
    assert set(val.train.class_names) | set(val.eval.class_names) == set(split.train.class_names)
    assert len(val.eval.train) == 0 and len(val.train.test) == 0  # leave-one-out, no gallery
    used = _ids(val.train.train) | _ids(val.eval.test)
    assert used == _ids(split.train.train)
    assert not used & (_ids(data.test) | _ids(split.eval.train))
    assert len(val.eval.test) == 20
    with pytest.raises(ValueError, match=r"\[2, 4\]"):
        splits.validation_classes(split.train, 5)


# ----------------------------------------------------------------------- the command line


def _exit_code(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--trials", "0"], "--trials must be >= 1"),
    (["--trials", "2", "--val-fraction", "1.5"], "must lie in (0, 1)"),
    (["--trials", "2", "--val-classes", "3"], "--val-classes is for the class-disjoint"),
    (["--trials", "2", "--unseen-classes", "5", "--val-fraction", "0.2"],
     "with held-out classes validate on whole classes"),
    (["--trials", "2", "--objective", "accuracy"], "invalid choice: 'accuracy'"),
    (["--trials", "2", "--storage", "study.db"], "must be a database URL"),
    (["--trials", "2", "--margin", "-1"], "margin must be a finite number >= 0.0"),
    (["--trials", "2", "--optimizer", "sgd", "--lr", "0.1", "--margin", "0.2",
      "--loss-options", "scale=8", "--loss-lr-multiplier", "1"], "nothing left to tune"),
    (["--trials", "2", "--loss-options", "scale=-1"], "refuses its settings"),
])
def test_bad_flags_exit_2_with_a_clear_message(extra, message, capsys, tmp_path):
    code, err = _exit_code(["--loss", "arcface", "--out", str(tmp_path), *extra], capsys)
    assert code == 2 and message in err, err
    assert "Traceback" not in err


def test_an_unknown_loss_and_a_missing_trial_count_exit_2(capsys):
    assert _exit_code(["--loss", "nope", "--trials", "1"], capsys)[0] == 2
    assert _exit_code(["--loss", "triplet"], capsys)[0] == 2


def test_missing_data_exits_1(tmp_path, capsys):
    code = cli.main(["--loss", "triplet", "--trials", "1", "--out", str(tmp_path / "s"),
                     "--data-dir", str(tmp_path / "nowhere"), "--no-progress"])
    assert code == 1 and "error:" in capsys.readouterr().err


# ----------------------------------------------------------------------- a killed study


def write_batches(folder, per_batch=24, seed=0):
    """A cifar-10-batches-py folder of 5 x ``per_batch`` training and ``per_batch`` test
    images; class c is a flat colour plus noise (learnable, not trivial)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    colours = rng.integers(30, 226, (10, 3))
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.permutation(np.arange(per_batch) % 10)
        hwc = colours[labels][:, None, None, :] + rng.normal(0, 40, (per_batch, 32, 32, 3))
        hwc = np.clip(hwc, 0, 255).astype(np.uint8)
        batch = {b"labels": [int(x) for x in labels],
                 b"data": hwc.transpose(0, 3, 1, 2).reshape(per_batch, 3072)}
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {b"label_names": [c.encode() for c in CIFAR10_CLASSES]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))


TINY = ["--loss", "arcface", "--optimizer", "sgd", "--model", "homebrew", "--embed-dim",
        "8", "--batch-size", "16", "--epochs", "2", "--log-every", "2",
        "--conv-chunk-elements", "0", "--no-augment"]


def _command(data, out, trials):
    return [*TINY, "--trials", str(trials), "--data-dir", str(data), "--out", str(out),
            "--heartbeat", "1", "--no-progress"]


def _states(db):
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT number, state FROM trials ORDER BY number").fetchall()
    return dict(rows)


@pytest.mark.slow
def test_a_killed_study_resumes_and_retries_the_killed_trial(tmp_path, capsys):
    """SIGKILL in the middle of a trial (the model built, training about to start), then
    the same command: the dead trial is marked failed and its values trained again, the
    study ends with the trials asked for, and the printed command reproduces the best."""
    data, out = tmp_path / "cifar-10-batches-py", tmp_path / "study"
    write_batches(data)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env |= {"JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "jaxmetric.tune", *_command(data, out, 1), "--cpu-devices",
            "1", "--enqueue-defaults"]
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("training homebrew"):  # inside trial 0
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    db = out / "study.db"
    assert _states(db) == {0: "RUNNING"}
    time.sleep(2.5)  # its heartbeat is now older than the grace period (2 s)

    done = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    study = optuna.load_study(study_name="arcface", storage=f"sqlite:///{db}")
    killed, retry = study.get_trials()
    assert killed.state.name == "FAIL"
    assert retry.state.name == "COMPLETE" and retry.system_attrs["failed_trial"] == 0
    assert retry.params == killed.params
    # --enqueue-defaults: the first trial was the loss's training defaults (SGD: its
    # usual rate; the rest from the registry).
    entry = registry.get("arcface")
    assert killed.params == pytest.approx({"lr_factor": 1.0, "margin": entry.margin,
                                           "loss_lr_multiplier": entry.lr_multiplier,
                                           "scale": entry.options["scale"]})
    assert set(retry.intermediate_values) == {1, 2}  # a score per epoch, for the pruner

    result = json.loads((out / "best-arcface.json").read_text())
    assert (result["best_trial"], result["best_value"]) == (1, retry.value)
    assert result["trials"] == {"COMPLETE": 1, "FAIL": 1}
    assert result["command"] in done.stdout and "best: trial 1" in done.stdout
    # The printed command trains with exactly the best trial's settings.
    from experiments import cifar10

    parser = cifar10.build_parser()
    assert result["argv"][:3] == ["python", "-m", "experiments.cifar10"]
    args = parser.parse_args(result["argv"][3:])
    command_config = cifar10.config_from_args(args, parser)
    saved = json.loads((out / "arcface" / "trial-0001" / "config.json").read_text())
    differ = {k for k, v in command_config.to_dict().items() if v != saved[k]}
    assert differ == {"out", "eval_every", "checkpoint_every", "keep_checkpoints"}, differ
    assert cifar10.data_config_from_args(args, parser, command_config).path == str(data)

    # The same command once more: nothing to run, the same answer. Other settings: refused.
    assert cli.main(_command(data, out, 1)) == 0
    assert len(optuna.load_study(study_name="arcface",
                                 storage=f"sqlite:///{db}").get_trials()) == 2
    code, err = _exit_code([*_command(data, out, 1), "--epochs", "3"], capsys)
    assert code == 2 and "was started with other settings" in err and "epochs" in err


def test_the_tuning_page_lists_every_loss_space():
    """docs/tuning.md's table has a row per registered loss naming each of its ranges
    (a new entry or range shows up there or this fails)."""
    page = (REPO_ROOT / "docs" / "tuning.md").read_text()
    section = page.split("## What it tunes")[1].split("\n## ")[0]
    rows = {line.split("|")[1].strip().strip("`"): line for line in section.splitlines()
            if line.startswith("| `")}
    assert set(rows) == set(registry.NAMES)
    for name in registry.NAMES:
        own = registry.get(name).search_space or {}
        for key, param in own.items():
            assert f"`{key}`" in rows[name], (name, key)
            if isinstance(param, Range):
                assert f"{param.low:g}–{param.high:g}" in rows[name], (name, key)
