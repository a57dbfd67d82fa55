"""Runs written by jaxmetric 0.1.0 (before the losses / models / data packages) still load.

``tests/fixtures/run-0.1.0`` is a real run folder written by that version: ``python -m
experiments.cifar10 --loss contrastive --model homebrew --embed-dim 16 --max-train 200
--max-test 100 --batch-size 50 --epochs 1 --warmup-epochs 0.5 --lr 0.05 --keep-checkpoints 1``
on the JPEG copy of CIFAR-10 (its config.json, metrics and one orbax checkpoint; the
pictures dropped). Its config still spells the triplet distance ``squared``.
"""

import json
import pathlib
import shutil

import pytest

from jaxmetric import report
from jaxmetric.train import load_config, restore_state
from jaxmetric.train.config import TrainConfig

RUN = pathlib.Path(__file__).resolve().parent / "fixtures" / "run-0.1.0"


def test_the_old_config_loads_with_the_distance_setting():
    config = load_config(RUN)
    assert config.loss == "contrastive" and config.distance is None
    assert config.loss_kwargs["distance"] == "l2"
    saved = json.loads((RUN / "config.json").read_text())
    assert saved["squared"] is True and "distance" not in saved
    euclidean = TrainConfig.from_dict(saved | {"loss": "triplet", "squared": False})
    assert euclidean.distance == "l2" and euclidean.loss_kwargs["distance"] == "l2"
    squared = TrainConfig.from_dict(saved | {"loss": "triplet"})
    assert squared.loss_kwargs["distance"] == "squared_l2"


def test_the_old_checkpoint_restores():
    config, state, epoch = restore_state(RUN)
    assert epoch == 1 and config.model == "homebrew"
    assert int(state.step) == 4  # 200 images / batch 50, one epoch
    assert state.params["head"]["Dense_0"]["kernel"].shape[-1] == 16


@pytest.mark.slow
def test_the_old_run_reevaluates_to_its_own_numbers(cifar_tarball, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    run = tmp_path / "run"
    shutil.copytree(RUN, run)
    before = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").unlink()
    assert report.main([str(run), "--data-dir", str(cifar_tarball), "--tsne-points", "0",
                        "--no-progress"]) == 0
    after = json.loads((run / "metrics.json").read_text())
    for protocol in ("test_vs_train", "test_vs_test"):
        for key in ("precision_at_1", "map_at_r", "r_precision"):
            assert after[protocol][key] == pytest.approx(before[protocol][key], abs=1e-6)
