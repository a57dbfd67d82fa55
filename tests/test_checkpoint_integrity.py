"""Checkpoint integrity and resume after any failure: damaged checkpoints, kills before
the first checkpoint, failed starts, torn records, a full disk, the CLI's messages.

Every damage case damages a real checkpoint written by a tiny run (the ``homebrew``
net, 64 synthetic images, batch 16, 2 epochs on 2 of the 8 simulated CPU devices). The
numbers in the test names are the items of the bug report they cover.
"""

import errno
import json
import logging
import pathlib
import shutil

import numpy as np
import pytest
from test_train import assert_trees_close, mesh_of, read_records, tiny_config, tiny_dataset

from experiments import cifar10
from jaxmetric import train
from jaxmetric.report import run as report_run
from jaxmetric.train import checkpoints
from jaxmetric.train.checkpoints import DamagedCheckpointError, DiskFullError
from jaxmetric.train.config import TrainConfig

LEGACY_RUN = pathlib.Path(__file__).resolve().parent / "fixtures" / "run-0.1.0"


class _EpochLines(logging.Handler):
    """Records, at the moment each epoch line is logged, what is on disk."""

    def __init__(self, out_dir):
        super().__init__(logging.INFO)
        self.out_dir, self.seen = out_dir, []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("epoch "):
            epoch = int(message.split()[1].split("/")[0])
            self.seen.append((epoch, message, train.finalized_epochs(
                self.out_dir / "checkpoints"), [r["epoch"] for r in read_records(self.out_dir)]))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-epoch run: (config, out_dir, final state, epoch lines seen)."""
    tmp = tmp_path_factory.mktemp("reference")
    config = tiny_config(tmp)
    lines = _EpochLines(tmp / "run")
    logger = logging.getLogger("jaxmetric.train")
    logger.addHandler(lines)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        state = train.fit(config, tiny_dataset(), tmp / "run", mesh=mesh_of(2), progress=False)
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
    return config, tmp / "run", state, lines.seen


@pytest.fixture()
def root_logging():
    """Put back the root logger that the command line's ``setup_logging`` replaces (its
    handler writes to this test's captured stderr, closed after it)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def copy_run(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference[1], out)
    return out


def array_files(checkpoint: pathlib.Path) -> list[pathlib.Path]:
    """The files of the state's arrays (orbax's OCDBT data files)."""
    return sorted(p for p in (checkpoint / "state").rglob("*") if p.is_file()
                  and p.parent.name == "d")


def assert_same_run(state, out_dir, reference):
    _, ref_dir, ref_state, _ = reference
    assert int(state.step) == int(ref_state.step)
    for part in ("params", "batch_stats", "opt_state"):
        assert_trees_close(getattr(state, part), getattr(ref_state, part), rtol=0, atol=1e-6)
    records, ref_records = read_records(out_dir), read_records(ref_dir)
    assert [r["epoch"] for r in records] == [r["epoch"] for r in ref_records]
    np.testing.assert_allclose([r["loss"] for r in records],
                               [r["loss"] for r in ref_records], rtol=1e-6)


# ---------------------------------------------------------------- 1: checksums


def test_1_flipped_bytes_never_restore_silently(reference, tmp_path):
    """A flipped byte anywhere in an array file either restores the very same arrays
    (bytes orbax does not read) or is a damaged checkpoint: never different arrays."""
    config, _, state, _ = reference
    out = copy_run(reference, tmp_path)
    ckpt = out / "checkpoints"
    meta = json.loads((ckpt / "2" / "meta" / "metadata").read_text())
    tree = {"state": state, "train_key": np.zeros(2, np.uint32)}
    assert set(meta["checksums"]) == set(checkpoints.array_checksums(tree))
    template, key = train.initial_state(config, 4, mesh_of(1), state.inputs,
                                        num_classes=len(tiny_dataset().class_names))

    def restore():
        manager = checkpoints.checkpoint_manager(ckpt, 3)
        try:
            return checkpoints.restore_checkpoint(manager, 2, template, key)
        finally:
            manager.close()

    intact = checkpoints.array_checksums(restore())
    detected = 0
    for path in array_files(ckpt / "2"):
        good = path.read_bytes()
        for at in sorted({len(good) // 3, len(good) - 9}):
            bad = bytearray(good)
            bad[at] ^= 0x04
            path.write_bytes(bytes(bad))
            try:
                assert checkpoints.array_checksums(restore()) == intact, (path.name, at)
            except DamagedCheckpointError as e:
                assert "checkpoint 2" in str(e)
                detected += 1
            path.write_bytes(good)
    assert detected >= 2  # the large weight files are read whole


def test_1_a_checkpoint_without_checksums_restores_unverified(caplog):
    with caplog.at_level("INFO", logger="jaxmetric.train"):
        _, _, epoch = train.restore_state(LEGACY_RUN, mesh=mesh_of(1))
    assert epoch == 1
    assert "records no checksums" in caplog.text and "without verification" in caplog.text


# ------------------------------------------------- 2: damaged latest checkpoint


def _truncate_array_file(ckpt):
    big = max(array_files(ckpt), key=lambda p: p.stat().st_size)
    big.write_bytes(big.read_bytes()[:1000])


def _empty_meta(ckpt):
    (ckpt / "meta" / "metadata").write_text("")


def _empty_state_metadata(ckpt):
    (ckpt / "state" / "_METADATA").write_text("")


@pytest.mark.parametrize("damage", [_truncate_array_file, _empty_meta, _empty_state_metadata])
def test_2_damaged_latest_checkpoint_is_skipped(reference, tmp_path, caplog, damage):
    config = reference[0]
    out = copy_run(reference, tmp_path)
    damage(out / "checkpoints" / "2")
    with caplog.at_level("WARNING", logger="jaxmetric.train"):
        _, _, epoch = train.restore_state(out, mesh=mesh_of(1))
    assert epoch == 1
    assert "skipped damaged checkpoint 2" in caplog.text and "trying epoch 1" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="jaxmetric.train"):
        state = train.fit(config, tiny_dataset(), out, resume=True, mesh=mesh_of(2),
                          progress=False)
    assert "skipped damaged checkpoint 2" in caplog.text
    assert "deleted the damaged checkpoint 2" in caplog.text
    assert "resumed" in caplog.text and "at epoch 1" in caplog.text
    assert train.finalized_epochs(out / "checkpoints") == [1, 2]
    assert_same_run(state, out, reference)
    _, _, epoch = train.restore_state(out, mesh=mesh_of(1))  # epoch 2 is whole again
    assert epoch == 2


def test_2_no_intact_checkpoint_is_one_clear_error(reference, tmp_path):
    config = reference[0]
    out = copy_run(reference, tmp_path)
    _truncate_array_file(out / "checkpoints" / "2")
    _empty_meta(out / "checkpoints" / "1")
    with pytest.raises(DamagedCheckpointError, match=r"no intact checkpoint in .*checkpoint 2"
                       r".*arrays cannot be read.*checkpoint 1.*metadata cannot be read"):
        train.fit(config, tiny_dataset(), out, resume=True, mesh=mesh_of(2), progress=False)
    with pytest.raises(DamagedCheckpointError, match="no intact checkpoint"):
        train.restore_state(out, mesh=mesh_of(1))
    with pytest.raises(DamagedCheckpointError, match="checkpoint 2 in"):
        train.restore_state(out, epoch=2, mesh=mesh_of(1))  # asked for: no fallback


# ------------------------------ 3, 4: resume before the first checkpoint; failed starts


def _crash_in_epoch_1(state, epoch):
    raise RuntimeError("killed in epoch 1")


def test_3_resume_before_the_first_checkpoint_starts_over(reference, tmp_path, caplog):
    config, out = reference[0], tmp_path / "run"
    with pytest.raises(RuntimeError, match="killed"):
        train.fit(config, tiny_dataset(), out, mesh=mesh_of(2), progress=False,
                  eval_hook=_crash_in_epoch_1)
    assert (out / "config.json").is_file() and train.finalized_epochs(out / "checkpoints") == []
    changed = TrainConfig(**(config.to_dict() | {"lr": 0.2}))
    with pytest.raises(ValueError, match="lr: saved 0.05, now 0.2"):
        train.fit(changed, tiny_dataset(), out, resume=True, mesh=mesh_of(2), progress=False)
    with caplog.at_level("INFO", logger="jaxmetric.train"):
        state = train.fit(config, tiny_dataset(), out, resume=True, mesh=mesh_of(2),
                          progress=False)
    assert "holds no complete checkpoint yet" in caplog.text
    assert "starting it from the beginning" in caplog.text
    assert_same_run(state, out, reference)
    # A folder without a run at all is still a wrong path, not a fresh start.
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train.fit(config, tiny_dataset(), tmp_path / "nothing", resume=True,
                  mesh=mesh_of(2), progress=False)


def test_4_bad_loss_values_fail_before_anything_is_written(tmp_path, capsys,
                                                          root_logging):
    for loss, options, message in [("proxy_anchor", "alpha=-1", "alpha must be > 0"),
                                   ("circle", "gamma=0", "gamma must be > 0"),
                                   ("multi_similarity", "alpha=-1", "alpha must be > 0")]:
        config = tiny_config(tmp_path, loss=loss, loss_options=options)  # keys are fine
        with pytest.raises(ValueError, match=message):
            train.fit(config, tiny_dataset(), tmp_path / loss, mesh=mesh_of(2), progress=False)
        assert not (tmp_path / loss).exists()
    out = tmp_path / "cli"
    with pytest.raises(SystemExit) as e:  # no data needed: checked before it loads
        cifar10.main(["--loss", "proxy_anchor", "--loss-options", "alpha=-1", "--model",
                      "homebrew", "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "python -m experiments.cifar10: error: the proxy_anchor loss refuses its settings "
        "(loss_options 'alpha=-1'): alpha must be > 0; got -1"]
    assert not out.exists()


def test_4_a_failed_start_does_not_block_its_folder(reference, tmp_path, caplog):
    config, out = reference[0], tmp_path / "run"
    with pytest.raises(RuntimeError, match="killed"):
        train.fit(config, tiny_dataset(), out, mesh=mesh_of(2), progress=False,
                  eval_hook=_crash_in_epoch_1)
    (out / "metrics.jsonl").write_text('{"epoch": 1, "lo')  # torn: no complete record
    changed = TrainConfig(**(config.to_dict() | {"lr": 0.2}))
    with pytest.raises(FileExistsError, match=r"holds the start of another run .*lr: saved "
                       r"0.05, now 0.2"):
        train.fit(changed, tiny_dataset(), out, mesh=mesh_of(2), progress=False)
    with caplog.at_level("INFO", logger="jaxmetric.train"):  # the same command again
        state = train.fit(config, tiny_dataset(), out, mesh=mesh_of(2), progress=False)
    assert "starting it from the beginning" in caplog.text
    assert_same_run(state, out, reference)
    with pytest.raises(FileExistsError, match="already holds a run"):  # now it is a run
        train.fit(config, tiny_dataset(), out, mesh=mesh_of(2), progress=False)


# --------------------------------------------------------- 6: a torn metrics.jsonl


def test_6_a_torn_last_record_is_dropped_with_a_warning(reference, tmp_path, caplog):
    config = reference[0]
    out = copy_run(reference, tmp_path)
    whole = (out / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text(whole + '{"epoch": 3, "loss": 0.4')
    with caplog.at_level("WARNING"):
        assert [r["epoch"] for r in report_run._read_records(out / "metrics.jsonl")] == [1, 2]
    assert "metrics.jsonl: left out a torn last line" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="jaxmetric.train"):
        train.fit(config, tiny_dataset(), out, resume=True, mesh=mesh_of(2), progress=False)
    assert f"{out / 'metrics.jsonl'}: dropped a torn last line" in caplog.text
    assert (out / "metrics.jsonl").read_text() == whole
    lines = whole.splitlines()
    (out / "metrics.jsonl").write_text(lines[0][:20] + "\n" + lines[1] + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 1: not a JSON record"):
        train.fit(config, tiny_dataset(), out, resume=True, mesh=mesh_of(2), progress=False)


# ------------------------------------------------------------ 7: a full disk


def _disk_full_at(monkeypatch, epoch):
    """The checkpoint write of ``epoch`` fails with ENOSPC (in orbax's write of the JSON
    item, while the arrays are being written)."""
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as handler

    save = handler.JsonCheckpointHandler._save_fn

    async def full(self, item, directory):
        if isinstance(item, dict) and item.get("epoch") == epoch:
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        return await save(self, item, directory)

    monkeypatch.setattr(handler.JsonCheckpointHandler, "_save_fn", full)


def test_7_disk_full_while_saving_names_the_last_checkpoint(reference, tmp_path, monkeypatch,
                                                            capfd):
    config, out = reference[0], tmp_path / "run"
    _disk_full_at(monkeypatch, 2)
    with pytest.raises(DiskFullError) as e:
        train.fit(config, tiny_dataset(), out, mesh=mesh_of(2), progress=False)
    assert e.value.errno == errno.ENOSPC
    assert str(e.value).endswith(
        f"disk full while saving epoch 2; the last complete checkpoint is epoch 1 (in "
        f"{out / 'checkpoints'}); free space and run with --resume")
    assert "Traceback" not in capfd.readouterr().err  # orbax's own reports held back
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["1"]
    monkeypatch.undo()
    state = train.fit(config, tiny_dataset(), out, resume=True, mesh=mesh_of(2),
                      progress=False)
    assert_same_run(state, out, reference)


# ---------------------------------------------- 9: the epoch line announces what is durable


def test_9_the_epoch_line_comes_once_its_checkpoint_is_final(reference):
    seen = reference[3]
    assert [epoch for epoch, *_ in seen] == [1, 2]
    for epoch, line, final, records in seen:
        assert line.endswith("| checkpoint saved")
        assert epoch in final  # a kill right after the line loses nothing it announced
        assert records[-1] == epoch


# ------------------------------------------------------ 2, 7, 8: the command line


@pytest.mark.slow
def test_cli_failures_on_resume_say_one_line(cifar_tarball, tmp_path, monkeypatch, capsys,
                                             root_logging):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "run"
    argv = ["--loss", "contrastive", "--model", "homebrew", "--embed-dim", "16",
            "--data-dir", str(cifar_tarball), "--max-train", "256", "--max-test", "64",
            "--batch-size", "64", "--epochs", "2", "--warmup-epochs", "0.5", "--lr", "0.05",
            "--tsne-points", "0", "--no-progress", "--out", str(out)]

    with monkeypatch.context() as m:  # 7: the disk fills up while epoch 2 is saved
        _disk_full_at(m, 2)
        assert cifar10.main(argv) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        f"error: [Errno 28] disk full while saving epoch 2; the last complete checkpoint "
        f"is epoch 1 (in {out / 'checkpoints'}); free space and run with --resume")
    assert "Traceback" not in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["1"]
    assert cifar10.main(argv + ["--resume"]) == 0
    assert train.finalized_epochs(out / "checkpoints") == [1, 2]
    capsys.readouterr()

    for change, message in [(["--lr", "0.2"], "lr: saved 0.05, now 0.2"),  # 8
                            (["--epochs", "3"], "epochs: saved 2, now 3"),
                            (["--loss", "triplet"], "loss: saved 'contrastive', now 'triplet'")]:
        with pytest.raises(SystemExit) as e:
            cifar10.main(argv + ["--resume"] + change)
        assert e.value.code == 2, change
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        assert f"cannot resume {out} with a different config ({message})" in err

    _truncate_array_file(out / "checkpoints" / "2")  # 2: nothing intact is exit 1
    _empty_meta(out / "checkpoints" / "1")
    assert cifar10.main(argv + ["--resume"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(
        f"error: no intact checkpoint in {out / 'checkpoints'}: checkpoint 2")
