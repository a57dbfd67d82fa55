"""The run folder's rules: never overwrite a run, resume only the same config.

A run folder holds ``config.json`` (the :class:`TrainConfig` and, under ``"data"``, the
:class:`~jaxmetric.data.DataConfig`), ``metrics.jsonl`` (one record per epoch) and
``checkpoints/``. :func:`prepare_run_dir` refuses a folder that already holds a run
unless resuming, refuses to resume with a different config (except
:data:`RESUMABLE_CHANGES`) or with different data (any data setting but its ``path``),
and writes ``config.json``.

*A run* is a folder with a complete checkpoint or an epoch record in ``metrics.jsonl``.
A start that stopped before that (a bad setting that failed at the first step, a kill
in the first epoch) left only ``config.json``, perhaps an empty ``checkpoints/`` and a
torn or empty ``metrics.jsonl``: nothing to protect, so the same command may run there
again, with or without ``resume`` (the run starts from the beginning); a different
config is refused (``FileExistsError`` without resume, ``ValueError`` with it), saying
what differs. Resuming a folder without ``config.json`` or checkpoint (a wrong path)
raises ``FileNotFoundError``.

On resume, :func:`truncate_metrics` drops the records of epochs trained after the last
checkpoint restored, and a torn last line (a crash mid-write) with a WARNING naming
the file. With several processes every process checks, so they all agree on the
verdict (:func:`jaxmetric.distributed.agree`); process 0 alone writes.
"""

from __future__ import annotations

import json
import logging
import pathlib
from collections.abc import Mapping
from typing import Any

import jax

from jaxmetric import distributed
from jaxmetric.data.config import DataConfig
from jaxmetric.train.checkpoints import finalized_epochs
from jaxmetric.train.config import TrainConfig
from jaxmetric.utils import read_jsonl, write_atomic

__all__ = ["RESUMABLE_CHANGES", "append_record", "check_run_dir", "holds_a_run",
           "prepare_run_dir", "run_config_dict", "truncate_metrics"]

log = logging.getLogger("jaxmetric.train")

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
    metrics_file = out_dir / "metrics.jsonl"
    if not resume:
        existing = [p.name for p in (config_file, metrics_file, ckpt_dir) if p.exists()]
        if not existing:
            return
        if holds_a_run(out_dir) or not config_file.exists():
            raise FileExistsError(
                f"{out_dir} already holds a run ({', '.join(existing)}); pass resume=True "
                "(--resume) to continue it, or choose another output folder")
        # A start that stopped before its first checkpoint: the same run may start again.
        changes = _differences(out_dir, config, data)
        if changes:
            raise FileExistsError(
                f"{out_dir} holds the start of another run (config.json, no checkpoint "
                f"yet) with {'; '.join(changes)}: choose another output folder, or "
                "delete that one")
        return
    if not config_file.exists():
        if not finalized_epochs(ckpt_dir):
            raise FileNotFoundError(
                f"resume=True but {out_dir} holds no run (no config.json, no complete "
                "checkpoint); start a fresh run without resume (into an empty folder)")
        return
    changes = _differences(out_dir, config, data)
    if changes:
        raise ValueError(f"cannot resume {out_dir} with {'; '.join(changes)}")


def holds_a_run(out_dir: pathlib.Path) -> bool:
    """Whether ``out_dir`` holds a complete checkpoint or an epoch record (a run)."""
    if finalized_epochs(out_dir / "checkpoints"):
        return True
    try:
        records, _ = read_jsonl(out_dir / "metrics.jsonl")
    except ValueError:
        return True  # unreadable records: not ours to decide
    return any("epoch" in r for r in records)


def _differences(out_dir: pathlib.Path, config: TrainConfig,
                 data: DataConfig | None) -> list[str]:
    """How ``config`` and ``data`` differ from the saved ones (outside
    :data:`RESUMABLE_CHANGES` and the data's path): ``["a different config (...)",
    "different data (...)"]`` or ``[]``."""
    # Through from_dict, so a config written by an earlier version compares by meaning.
    raw = json.loads((out_dir / "config.json").read_text())
    saved = TrainConfig.from_dict(raw).to_dict()
    now = config.to_dict()
    out = []
    changed = sorted(k for k in set(saved) | set(now)
                     if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
    if changed:
        out.append("a different config (" + "; ".join(
            f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in changed) + ")")
    if data is not None:
        changed = DataConfig.of_run(raw).differences(data)
        if changed:
            out.append(f"different data ({'; '.join(changed)})")
    return out


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
    """Drop records of epochs after ``epoch`` (trained but never checkpointed) and a torn
    last line (with a WARNING naming the file); ``epoch=0`` drops every record."""
    if not path.exists():
        return
    records, torn = read_jsonl(path)
    if torn is not None:
        log.warning("%s: dropped a torn last line (a write cut short by a crash): %.60r",
                    path, torn)
    kept = [r for r in records if r.get("epoch", 0) <= epoch]
    if torn is not None or len(kept) != len(records):
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def append_record(path: pathlib.Path, record: Mapping[str, Any]) -> None:
    """Append one JSON record as a line of ``metrics.jsonl``."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
