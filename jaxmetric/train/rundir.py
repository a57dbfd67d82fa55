"""The run folder's rules: never overwrite a run, resume only the same config.

A run folder holds ``config.json`` (the :class:`TrainConfig` and, under ``"data"``, the
:class:`~jaxmetric.data.DataConfig`), ``metrics.jsonl`` (one record per epoch) and
``checkpoints/``. :func:`prepare_run_dir` refuses a folder that already holds a run
unless resuming, refuses to resume without a complete checkpoint, with a different
config (except :data:`RESUMABLE_CHANGES`) or with different data (any data setting but
its ``path``), and writes ``config.json``.
On resume, :func:`truncate_metrics` drops the records of epochs trained after the last
checkpoint. With several processes every process checks, so they all agree on the
verdict (:func:`jaxmetric.distributed.agree`); process 0 alone writes.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax

from jaxmetric import distributed
from jaxmetric.data.config import DataConfig
from jaxmetric.train.checkpoints import finalized_epochs
from jaxmetric.train.config import TrainConfig
from jaxmetric.utils import write_atomic

__all__ = ["RESUMABLE_CHANGES", "append_record", "check_run_dir", "prepare_run_dir",
           "run_config_dict", "truncate_metrics"]

RESUMABLE_CHANGES = frozenset({"out", "eval_every", "log_every", "keep_checkpoints",
                               "checkpoint_every"})
"""Config fields that may change between a run and its resumption."""


def run_config_dict(config: TrainConfig, data: DataConfig | None) -> dict:
    """What ``config.json`` holds: the training settings, then the data's."""
    d = config.to_dict()
    if data is not None:
        d["data"] = data.to_dict()
    return d


def check_run_dir(out_dir: pathlib.Path, config: TrainConfig, resume: bool,
                  data: DataConfig | None = None) -> None:
    """Raise ``FileExistsError``, ``FileNotFoundError`` or ``ValueError`` when ``out_dir``
    cannot take this run (see the module docstring); no side effects."""
    ckpt_dir = out_dir / "checkpoints"
    config_file = out_dir / "config.json"
    if not resume:
        existing = [p.name for p in (config_file, out_dir / "metrics.jsonl", ckpt_dir)
                    if p.exists()]
        if existing:
            raise FileExistsError(
                f"{out_dir} already holds a run ({', '.join(existing)}); pass resume=True "
                "(--resume) to continue it, or choose another output folder")
        return
    if not finalized_epochs(ckpt_dir):
        raise FileNotFoundError(
            f"resume=True but {ckpt_dir} holds no complete checkpoint; start a fresh run "
            "without resume (into an empty folder)")
    if config_file.exists():
        # Through from_dict, so a config written by an earlier version compares by meaning.
        raw = json.loads(config_file.read_text())
        saved = TrainConfig.from_dict(raw).to_dict()
        now = config.to_dict()
        changed = sorted(k for k in set(saved) | set(now)
                         if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
        if changed:
            diffs = "; ".join(f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in changed)
            raise ValueError(f"cannot resume {out_dir} with a different config ({diffs})")
        if data is not None:
            changed = DataConfig.of_run(raw).differences(data)
            if changed:
                raise ValueError(f"cannot resume {out_dir} with different data "
                                 f"({'; '.join(changed)})")


def prepare_run_dir(out_dir: pathlib.Path, config: TrainConfig, resume: bool,
                    data: DataConfig | None = None) -> None:
    """Refuse to overwrite a run; on resume, check the config matches the saved one.

    Every process checks (the same verdict everywhere, see
    :func:`jaxmetric.distributed.agree`); process 0 alone writes ``config.json``, after
    all have checked, and the others then check that they see it: the run folder must be
    on a file system shared by all processes.
    """
    error = None
    try:
        check_run_dir(out_dir, config, resume, data)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        error = e
    distributed.agree(error)
    if resume:
        return
    config_file = out_dir / "config.json"
    if jax.process_index() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(config_file, json.dumps(run_config_dict(config, data), indent=2) + "\n")
    if jax.process_count() > 1:
        distributed.agree(None)  # a barrier: config.json is written
        distributed.agree(None if config_file.is_file() else FileNotFoundError(
            f"process {jax.process_index()} does not see {config_file} written by process "
            "0: the run folder must be on a file system shared by every process"))


def truncate_metrics(path: pathlib.Path, epoch: int) -> None:
    """Drop records of epochs after ``epoch`` (trained but never checkpointed)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("epoch", 0) <= epoch]
    if len(kept) != len(lines):
        write_atomic(path, "".join(line + "\n" for line in kept))


def append_record(path: pathlib.Path, record: Mapping[str, Any]) -> None:
    """Append one JSON record as a line of ``metrics.jsonl``."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
