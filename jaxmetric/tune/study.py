"""A resumable Optuna study of one loss's hyper-parameters on a validation split.

* :func:`open_study` -- the study in an SQL storage (SQLite by default), created or
  loaded (``load_if_exists``): a TPE sampler seeded with the study's seed plus the
  number of trials the study already holds (so a resumed study draws new points instead
  of repeating its first start's), a median pruner, and a heartbeat: a trial whose
  process died (killed, out of memory, a machine gone) stops beating, and once its last
  beat is older than the grace period (two heartbeats) the next trial to start marks it
  failed and queues its parameters again (Optuna's
  ``RetryHeartbeatStaleTrialCallback``, at most :data:`MAX_RETRIES` times);
* :func:`make_objective` -- one trial: sample the loss's space
  (:mod:`jaxmetric.tune.space`), train with :func:`jaxmetric.train.fit` on the
  validation split's training part, score the validation queries after every epoch
  (:func:`jaxmetric.report.retrieval_hook`), report each score to Optuna and stop the
  trial when the pruner says so; a run that diverges counts as pruned;
* :func:`run_study` -- trials until the study holds ``trials`` finished ones (complete
  or pruned), counting those of earlier starts; a trial stopped by Ctrl-C is failed and
  its values queued again;
* :func:`best_result` -- the best trial as training settings, the flags that reproduce
  it and where each value would live as a default.

The objective is maximised (every retrieval score is "higher is better"). Optuna is an
optional dependency (``pip install jaxmetric[tune]``), imported here only.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import shlex
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from jaxmetric.tune import space as space_lib
from jaxmetric.utils import require

__all__ = ["MAX_RETRIES", "FINISHED", "TRAINING_COMMANDS", "StudySetup", "best_result",
           "finished_trials", "make_objective", "open_study", "run_study"]

log = logging.getLogger("jaxmetric.tune")

MAX_RETRIES = 2
"""How often a trial whose process died is queued again (then left failed)."""

TRAINING_COMMANDS = {"cifar10": "python -m experiments.cifar10",
                     "folder": "python -m experiments.retrieval",
                     "tfds": "python -m experiments.retrieval"}
"""The training command of each data source."""


def _optuna():
    return require("optuna", "hyper-parameter tuning", install="pip install 'jaxmetric[tune]'")


FINISHED = ("COMPLETE", "PRUNED")
"""The trial states that count towards a study's number of trials."""


@dataclasses.dataclass(frozen=True)
class StudySetup:
    """What defines a study; it is saved with the study and a resumed one must match.

    Attributes:
      loss: the loss tuned.
      objective: the validation score maximised (:data:`jaxmetric.report.run.RETRIEVAL_SCORES`).
      fixed: the :class:`~jaxmetric.train.config.TrainConfig` fields the command line
        sets (``loss`` included), the same for every trial.
      data: the :class:`~jaxmetric.data.DataConfig` as a dict.
      validation: how the validation split is carved (``{"fraction": f}`` or
        ``{"classes": n}``) and its seed.
      seed: the study's seed (validation split and sampler).
      pruner: ``"median"`` or ``"none"``.
    """

    loss: str
    objective: str
    fixed: Mapping[str, Any]
    data: Mapping[str, Any]
    validation: Mapping[str, Any]
    seed: int = 0
    pruner: str = "median"

    def to_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "objective": self.objective, "fixed": dict(self.fixed),
                "data": dict(self.data), "validation": dict(self.validation),
                "seed": self.seed, "pruner": self.pruner}

    def differences(self, saved: Mapping[str, Any]) -> list[str]:
        """``"key: saved X, now Y"`` for each setting that differs from a saved study's
        (where the data lives, ``data["path"]``, may differ: the same data can move)."""
        from jaxmetric.data.config import LOCATION_FIELDS

        def comparable(d):
            d = dict(d)
            if isinstance(d.get("data"), Mapping):
                d["data"] = {k: v for k, v in d["data"].items() if k not in LOCATION_FIELDS}
            return d

        now, saved = comparable(_jsonable(self.to_dict())), comparable(saved)
        return [f"{k}: saved {saved.get(k)!r}, now {now[k]!r}" for k in now
                if saved.get(k) != now[k]]


def _jsonable(value):
    """Tuples as lists, as JSON (and the study's stored attributes) give them back."""
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


SETUP_ATTR = "jaxmetric_setup"


def _storage(url: str, heartbeat: int):
    optuna = _optuna()
    storages = optuna.storages
    retry = getattr(storages, "RetryHeartbeatStaleTrialCallback", None)
    callback_arg = "heartbeat_stale_trial_callback"
    if retry is None:  # Optuna before 4.9
        retry, callback_arg = storages.RetryFailedTrialCallback, "failed_trial_callback"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return storages.RDBStorage(url, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                                   **{callback_arg: retry(max_retry=MAX_RETRIES)})


def _sampler_and_pruner(setup: StudySetup, trials: int, existing: int):
    optuna = _optuna()
    sampler = optuna.samplers.TPESampler(seed=setup.seed + existing,
                                         n_startup_trials=min(10, max(3, trials // 4)))
    if setup.pruner == "none":
        pruner = optuna.pruners.NopPruner()
    else:  # the first two trials run whole; pruning starts at the second epoch (the steps
        # are epochs 1, 2, ...; Optuna prunes from step n_warmup_steps on)
        pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2)
    return sampler, pruner


def open_study(storage_url: str, name: str, setup: StudySetup, *, trials: int,
               heartbeat: int = 30):
    """The study ``name`` in ``storage_url``, created with ``setup`` or loaded.

    Raises:
      ValueError: the stored study was started with another setup (the message lists
        the differences), or the storage URL cannot be opened.
    """
    optuna = _optuna()
    try:
        storage = _storage(storage_url, heartbeat)
    except Exception as e:  # SQLAlchemy's errors for a bad URL or an unwritable file
        raise ValueError(f"cannot open the storage {storage_url!r}: {e}") from None
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize",
                                load_if_exists=True)
    saved = study.user_attrs.get(SETUP_ATTR)
    if saved is None:
        study.set_user_attr(SETUP_ATTR, _jsonable(setup.to_dict()))
    else:
        differences = setup.differences(saved)
        if differences:
            raise ValueError(f"the study {name!r} in {storage_url} was started with other "
                             "settings (" + "; ".join(differences) + "): give the same "
                             "flags to continue it, or another --study-name")
    existing = len(study.get_trials(deepcopy=False))
    sampler, pruner = _sampler_and_pruner(setup, trials, existing)
    return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)


def finished_trials(study) -> list:
    """The trials that count towards the study's number (complete or pruned)."""
    return [t for t in study.get_trials(deepcopy=False) if t.state.name in FINISHED]


def make_objective(setup: StudySetup, space: Mapping, train_data, eval_data, out_dir, *,
                   mesh=None, progress: bool = True, what: str = "validation",
                   trial_fields: Mapping[str, Any] | None = None) -> Callable:
    """``objective(trial) -> score``: one trial (see the module docstring).

    ``train_data`` is trained on, ``eval_data`` scored after every epoch; each trial's run
    folder is ``out_dir / "trial-<number>"`` (its ``config.json`` and ``metrics.jsonl``,
    with the validation score of every epoch). ``trial_fields`` are the
    :class:`~jaxmetric.train.config.TrainConfig` fields only trials set (evaluation every
    epoch, fewer checkpoints).
    """
    optuna = _optuna()
    from jaxmetric import report, train
    from jaxmetric.train.config import TrainConfig

    out_dir = pathlib.Path(out_dir)
    metric = setup.objective
    started = []  # the trials this process ran (run_study re-queues an interrupted one)

    def objective(trial):
        params = space_lib.suggest(trial, space)
        values = space_lib.trial_values(setup.fixed, params)
        trial.set_user_attr("settings", _jsonable(values))
        run_dir = out_dir / f"trial-{trial.number:04d}"
        config = TrainConfig(**(dict(setup.fixed) | values | dict(trial_fields or {})
                                | {"out": str(run_dir)}))
        score_of = report.retrieval_hook(eval_data, metric, mesh=mesh, what=what)
        scores = {}

        def hook(state, epoch):
            record = score_of(state, epoch)
            scores[epoch] = record[metric]
            trial.report(record[metric], epoch)
            log.info("trial %d, epoch %d/%d: %s %s %.4f", trial.number, epoch,
                     config.epochs, what, metric, record[metric])
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch}: {metric} "
                                         f"{record[metric]:.4f} below the median")
            return record

        started.append(trial.number)
        log.info("trial %d: %s", trial.number, ", ".join(
            f"{k}={_short(v)}" for k, v in params.items()) or "no free setting")
        try:
            train.fit(config, train_data, run_dir, eval_hook=hook, mesh=mesh,
                      progress=progress)
        except FloatingPointError as e:  # a setting that diverges: as bad as it gets
            trial.set_user_attr("diverged", str(e))
            log.warning("trial %d diverged (counted as pruned): %s", trial.number, e)
            raise optuna.TrialPruned(f"diverged: {e}") from None
        return scores[config.epochs]

    objective.started = started
    return objective


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def run_study(study, objective: Callable, trials: int, *, progress: bool = True) -> int:
    """Run trials until ``study`` holds ``trials`` finished ones; returns how many ran now.

    A study that already holds enough returns at once (0): rerunning a finished command
    only reports its result."""
    optuna = _optuna()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # the dead trials of an earlier start
    left = trials - len(finished_trials(study))
    if left <= 0:
        return 0
    running = [t.number for t in study.get_trials(deepcopy=False) if t.state.name == "RUNNING"]
    if running:
        log.info("trial%s %s of an earlier start still count%s as running: once %s heartbeat "
                 "is older than the grace period it is marked failed and queued again",
                 "s" if len(running) > 1 else "", ", ".join(map(str, running)),
                 "" if len(running) > 1 else "s", "their" if len(running) > 1 else "its")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.optimize(objective, n_trials=left, show_progress_bar=progress,
                           gc_after_trial=True)
    except KeyboardInterrupt:  # Optuna marks the trial failed: run its values again
        mine = set(getattr(objective, "started", ()))
        for t in study.get_trials(deepcopy=False):
            if t.number in mine and t.state.name == "FAIL":
                study.enqueue_trial(t.params, user_attrs={"interrupted_trial": t.number})
        raise
    return left


def best_result(study, setup: StudySetup, *, storage_url: str, study_name: str,
                data_flags: Mapping[str, Any], validation_note: str) -> dict[str, Any]:
    """The best complete trial: its score, settings, the training command that
    reproduces them and where each value would live as a default (a JSON-ready dict).

    Raises:
      ValueError: no trial has completed yet.
    """
    from jaxmetric.data.config import DataConfig

    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if not complete:
        raise ValueError(f"the study {study_name!r} has no complete trial yet")
    best = max(complete, key=lambda t: t.value)
    params = dict(best.params)
    values = space_lib.trial_values(setup.fixed, params)
    settings = dict(setup.fixed) | values
    command = shlex.split(TRAINING_COMMANDS[setup.data["source"]])
    command += space_lib.command_flags(settings)
    command += space_lib.command_flags(data_flags, DataConfig)
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    return {
        "study": study_name,
        "storage": storage_url,
        "loss": setup.loss,
        "objective": setup.objective,
        "validation": validation_note,
        "best_trial": best.number,
        "best_value": best.value,
        "epoch_values": {str(k): v for k, v in sorted(best.intermediate_values.items())},
        "params": params,
        "settings": _jsonable(settings),
        "defaults": space_lib.where_defaults_live(setup.loss, params, values),
        "command": shlex.join(command),
        "argv": command,
        "trials": {s: states.count(s) for s in sorted(set(states))},
        "setup": _jsonable(setup.to_dict()),
    }
