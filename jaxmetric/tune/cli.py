"""``python -m jaxmetric.tune``: tune a loss's hyper-parameters on a validation split.

    python -m jaxmetric.tune --loss arcface --trials 8 --epochs 4 --model homebrew \\
        --batch-size 256 --max-train 10000 --data-dir ../shared/data/cifar10-jpeg.tar.xz
    python -m jaxmetric.tune --loss triplet --trials 20 --epochs 10 --unseen-classes 5 \\
        --data-dir ../shared/data/cifar10-jpeg.tar.xz --objective map_at_r

Every flag of the training command (``python -m experiments.cifar10`` /
``experiments.retrieval``) is accepted and fixes that setting for every trial; what the
loss's search space declares (:attr:`jaxmetric.losses.registry.LossEntry.tuning_space`)
and no flag fixes is tuned. The test images are never used: the trials train and are
scored on a validation split carved from the training images (``--val-fraction`` of each
class, or for the class-disjoint protocol ``--val-classes`` whole training classes).

The study lives in an SQL storage (``--storage``, default
``sqlite:///OUT/study.db``): run the same command again after a kill and it continues
where it stopped, until it holds ``--trials`` finished trials. At the end the best
settings are printed with the training command that uses them, and written to
``OUT/best-<study>.json``.

Exit status: 0 done, 1 missing or unreadable data (or a trial folder of another
study in ``--out``), 2 a bad flag or a study started with other settings, 130
interrupted (rerun the command to continue).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pathlib
import sys

from jaxmetric.data.config import DataConfig
from jaxmetric.data.splits import MIN_CLASSES
from jaxmetric.report.run import RETRIEVAL_SCORES
from jaxmetric.train import flags
from jaxmetric.train.config import TrainConfig
from jaxmetric.tune import space as space_lib
from jaxmetric.tune import study as study_lib

__all__ = ["DEFAULT_VAL_FRACTION", "build_parser", "main"]

PROG = "python -m jaxmetric.tune"
DEFAULT_VAL_FRACTION = 0.2
"""The share of each class's training images that validates (same-class protocol)."""
DEFAULT_VAL_CLASS_SHARE = 0.2
"""The share of the training classes that validates (class-disjoint protocol), at least
:data:`~jaxmetric.data.splits.MIN_CLASSES`."""
NOT_FLAGS = ("out", "eval_every")
"""Training fields a study sets itself: each trial's folder, an evaluation every epoch."""

log = logging.getLogger("jaxmetric.tune")


def build_parser() -> argparse.ArgumentParser:
    """The command line: the study's flags, then one flag per training and data setting
    (:mod:`jaxmetric.train.flags`)."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    s = p.add_argument_group("the study")
    s.add_argument("--trials", type=int, required=True, metavar="N",
                   help="finished trials (complete or pruned) the study ends with, counting "
                        "those of earlier starts")
    s.add_argument("--out", dest="study_out", metavar="DIR",
                   help="the study's folder: the storage, one run folder per trial, the best "
                        "settings (default: runs/tune-<loss>)")
    s.add_argument("--storage", metavar="URL", help="an SQLAlchemy database URL (default: "
                   "sqlite:///DIR/study.db)")
    s.add_argument("--study-name", metavar="NAME", help="default: the loss's name")
    s.add_argument("--objective", choices=RETRIEVAL_SCORES,
                   help="the validation score maximised (default: precision_at_1; map_at_r "
                        "for the class-disjoint protocol)")
    s.add_argument("--val-fraction", type=float, metavar="F",
                   help=f"the share of each class's training images held out to validate "
                        f"(default {DEFAULT_VAL_FRACTION}); not with held-out classes")
    s.add_argument("--val-classes", type=int, metavar="N",
                   help="class-disjoint protocol (--unseen-classes, image folders, tfds): "
                        "the training classes held out to validate, chosen at random "
                        f"(default: a fifth, at least {MIN_CLASSES})")
    s.add_argument("--study-seed", type=int, default=0, metavar="S",
                   help="chooses the validation images or classes and seeds the sampler "
                        "(default 0; --seed is the trials' training seed)")
    s.add_argument("--pruner", choices=("median", "none"), default="median",
                   help="stop a trial whose validation score after an epoch is below the "
                        "median of the earlier trials' at that epoch (default: median)")
    s.add_argument("--enqueue-defaults", action="store_true",
                   help="a new study's first trial trains at the loss's training defaults "
                        "(what --loss NAME uses), so the tuned settings are compared with "
                        "them on the same validation split")
    s.add_argument("--heartbeat", type=int, default=30, metavar="SECONDS",
                   help="a running trial records that it is alive this often; one silent "
                        "for twice as long is taken as dead, marked failed and queued "
                        "again (default 30)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.add_argument("--verbose", action="store_true",
                   help="also show other libraries' INFO logs (orbax, faiss, ...)")
    s.add_argument("--cpu-devices", type=int, metavar="N",
                   help="without GPU/TPU: split the CPU into N XLA devices (default: one "
                        "per core, or the largest divisor of the batch below that)")
    fields = [f for f in TrainConfig.__dataclass_fields__ if f not in NOT_FLAGS]
    flags.add_config_arguments(p.add_argument_group(
        "training settings fixed for every trial (jaxmetric.train.config.TrainConfig)"),
        fields=fields, required=("loss",))
    flags.add_config_arguments(p.add_argument_group("data (jaxmetric.data.DataConfig)"),
                               DataConfig)
    return p


def _fail(parser: argparse.ArgumentParser, message: str):
    """Exit 2 with one line: the flags parsed, a setting is wrong."""
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def _settings(args, parser):
    """``(fixed TrainConfig values, DataConfig, the data flags typed)``; exits 2."""
    fixed = flags.given_values(args)
    if "loss" not in fixed:
        parser.error("--loss is required")
    try:
        TrainConfig(**fixed)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    data_flags = flags.given_values(args, DataConfig)
    values = dict(data_flags)
    if "source" not in values and values.get("tfds") is not None:
        values["source"] = "tfds"
    try:
        data = DataConfig(**values)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    data_flags.pop("source", None)  # the training command implies it
    return fixed, data, data_flags


def _validation(args, parser, data: DataConfig) -> tuple[bool, str]:
    """``(class-disjoint?, objective)``; exits 2 on a flag that does not fit the data."""
    disjoint = data.source != "cifar10" or data.unseen_classes is not None
    if disjoint and args.val_fraction is not None:
        parser.error("--val-fraction is for the protocol that trains and evaluates on the "
                     "same classes; with held-out classes validate on whole classes "
                     "(--val-classes N)")
    if not disjoint and args.val_classes is not None:
        parser.error("--val-classes is for the class-disjoint protocol (--unseen-classes, "
                     "image folders, tfds); here hold images out with --val-fraction F")
    if args.val_fraction is not None and not (0 < args.val_fraction < 1
                                              and math.isfinite(args.val_fraction)):
        parser.error(f"--val-fraction must lie in (0, 1); got {args.val_fraction}")
    if args.val_classes is not None and args.val_classes < MIN_CLASSES:
        parser.error(f"--val-classes must be >= {MIN_CLASSES}; got {args.val_classes}")
    if args.trials < 1:
        parser.error(f"--trials must be >= 1; got {args.trials}")
    if args.heartbeat < 1:
        parser.error(f"--heartbeat must be >= 1 second; got {args.heartbeat}")
    objective = args.objective or ("map_at_r" if disjoint else "precision_at_1")
    return disjoint, objective


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("jaxmetric").setLevel(logging.INFO)
    if not verbose:
        try:  # orbax logs through absl
            from absl import logging as absl_logging

            absl_logging.set_verbosity(absl_logging.WARNING)
        except ImportError:
            pass


def _cpu_devices(args, parser, batch_size: int) -> None:
    from jaxmetric.train import use_cpu_devices
    from jaxmetric.train.mesh import default_cpu_devices

    if args.cpu_devices is not None:
        count = args.cpu_devices
    elif "--xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    else:
        count = default_cpu_devices(batch_size)
    try:
        use_cpu_devices(count)
    except (ValueError, RuntimeError) as e:
        if args.cpu_devices is not None:
            parser.error(f"--cpu-devices: {e}")


def _split(loaded, disjoint: bool, args, parser):
    """``(train_data, eval_data, note)``: the validation split of the loaded data."""
    from jaxmetric.data import splits

    try:
        if disjoint:
            classes = loaded.train
            count = args.val_classes
            if count is None:
                count = max(MIN_CLASSES, round(DEFAULT_VAL_CLASS_SHARE * classes.num_classes))
            val = splits.validation_classes(classes, count, seed=args.study_seed)
            note = (f"{count} of the {classes.num_classes} training classes held out "
                    f"(seed {args.study_seed}): {', '.join(val.eval.class_names)}; their "
                    "training images scored leave-one-out")
            return val.train, val.eval, note
        fraction = DEFAULT_VAL_FRACTION if args.val_fraction is None else args.val_fraction
        val = splits.validation_split(loaded, fraction, seed=args.study_seed)
        note = (f"{len(val.test)} of the {len(loaded.train)} training images "
                f"({fraction:g} of each class, seed {args.study_seed}) query the other "
                f"{len(val.train)}")
        return val, val, note
    except ValueError as e:
        _fail(parser, str(e))


def main(argv=None) -> int:
    """The command line; returns the exit status (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    fixed, data_config, data_flags = _settings(args, parser)
    disjoint, objective = _validation(args, parser, data_config)
    loss = fixed["loss"]
    space, left_out = space_lib.free_space(fixed)
    if not space:
        parser.error(f"nothing left to tune for {loss}: the flags fix every setting of its "
                     f"search space ({', '.join(sorted(left_out))})")
    out = pathlib.Path(args.study_out or f"runs/tune-{loss}")
    storage = args.storage or f"sqlite:///{out / 'study.db'}"
    if "://" not in storage:
        parser.error(f"--storage must be a database URL such as sqlite:///study.db; got "
                     f"{storage!r}")
    name = args.study_name or loss
    validation = ({"classes": args.val_classes} if disjoint
                  else {"fraction": args.val_fraction or DEFAULT_VAL_FRACTION})
    setup = study_lib.StudySetup(loss=loss, objective=objective, fixed=fixed,
                                 data=data_config.to_dict(), validation=validation,
                                 seed=args.study_seed, pruner=args.pruner)
    _cpu_devices(args, parser, TrainConfig(**fixed).batch_size)
    _setup_logging(args.verbose)

    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        try:
            return _run(args, parser, setup, space, left_out, out, storage, name, disjoint,
                        data_flags, data_config)
        except KeyboardInterrupt:
            print(f"\ninterrupted: run the same command again to continue the study {name!r}",
                  file=sys.stderr)
            return 130


def _run(args, parser, setup, space, left_out, out, storage, name, disjoint, data_flags,
         data_config) -> int:
    import jax

    from jaxmetric import data, train

    config = TrainConfig(**setup.fixed)
    try:
        train.check_loss_values(config)
    except ValueError as e:
        _fail(parser, str(e))
    out.mkdir(parents=True, exist_ok=True)
    try:
        study = study_lib.open_study(storage, name, setup, trials=args.trials,
                                     heartbeat=args.heartbeat)
    except ValueError as e:
        _fail(parser, str(e))
    if args.enqueue_defaults and not study.get_trials(deepcopy=False):
        defaults = space_lib.default_values(setup.fixed, space)
        study.enqueue_trial(defaults, skip_if_exists=True)
        log.info("trial 0: the loss's training defaults (%s)", ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in defaults.items()))
    log.info("tuning %s over %s; objective: the validation %s", setup.loss, ", ".join(
        f"{k} {_describe(p)}" for k, p in space.items()), setup.objective)
    for key, why in left_out.items():
        log.info("not tuned: %s (%s)", key, why)
    try:
        loaded = data.load(data_config)
    except data.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        _fail(parser, str(e))
    train_data, eval_data, note = _split(loaded, disjoint, args, parser)
    log.info("validation: %s", note)
    if len(train_data.train) < config.batch_size:
        _fail(parser, f"the validation split leaves {len(train_data.train)} training images, "
                      f"fewer than batch_size {config.batch_size}: lower --batch-size")
    mesh = train.make_mesh(jax.devices())
    try:
        config.check_devices(mesh.size)
    except ValueError as e:
        _fail(parser, str(e))
    trial_fields = {"eval_every": 1}
    if "checkpoint_every" not in setup.fixed:
        trial_fields["checkpoint_every"] = config.epochs  # only the last: the trial is short
    if "keep_checkpoints" not in setup.fixed:
        trial_fields["keep_checkpoints"] = 1
    what = "validation classes" if disjoint else "validation"
    objective = study_lib.make_objective(setup, space, train_data, eval_data, out / name,
                                         mesh=mesh, progress=not args.no_progress,
                                         what=what, trial_fields=trial_fields)
    try:
        study_lib.run_study(study, objective, args.trials, progress=not args.no_progress)
    except FileExistsError as e:
        print(f"error: {e} (a trial folder of another study: use another --out)",
              file=sys.stderr)
        return 1
    try:
        result = study_lib.best_result(study, setup, storage_url=storage, study_name=name,
                                       data_flags=data_flags, validation_note=note)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    path = out / f"best-{name}.json"
    from jaxmetric.utils import write_atomic

    write_atomic(path, json.dumps(result, indent=2) + "\n")
    print(_summary(result, path))
    return 0


def _describe(param) -> str:
    if hasattr(param, "options"):
        return "{" + ", ".join(map(str, param.options)) + "}"
    return f"[{param.low:g}, {param.high:g}]" + (" (log)" if param.log else "")


def _summary(result, path) -> str:
    counts = ", ".join(f"{n} {s.lower()}" for s, n in result["trials"].items())
    epochs = ", ".join(f"{e}: {v:.4f}" for e, v in result["epoch_values"].items())
    lines = [f"study {result['study']} ({result['storage']}): {counts}",
             f"best: trial {result['best_trial']}, validation {result['objective']} "
             f"{result['best_value']:.4f} (by epoch: {epochs})",
             "settings, and where each would become the training default:"]
    lines += [f"  {k} = {result['params'][k]!r}: {where}"
              for k, where in result["defaults"].items()]
    lines += ["train with them (on the whole training set, evaluated on the test set):",
              f"  {result['command']}", f"written to {path}"]
    return "\n".join(lines)
