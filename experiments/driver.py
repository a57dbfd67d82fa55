"""What the experiments' command lines share: flags, logging, train -> evaluate -> report.

* :func:`build_parser` -- one flag per :class:`~jaxmetric.train.config.TrainConfig` field
  (:mod:`jaxmetric.train.flags`), ``--preset`` and the flags that are not part of the config,
  plus the multi-process flags; an experiment adds its own data flags to the parser;
* :func:`config_from_args` -- defaults, then the preset, then the flags typed;
  :func:`data_config_from_args` likewise for the :class:`~jaxmetric.data.DataConfig`;
* :func:`main` -- parse, set up logging, run (log lines through tqdm);
* :func:`train_and_report` -- the run itself: start the processes, load the data
  (:func:`jaxmetric.data.load`), train
  with :func:`jaxmetric.train.fit` (the per-epoch P@1 on the evaluation data), evaluate
  and write the report with :func:`jaxmetric.report.evaluate_state`.

Both experiments evaluate what :func:`jaxmetric.data.load` returns for their
:class:`~jaxmetric.data.DataConfig` (saved in ``config.json`` next to the training
settings): a whole :class:`~jaxmetric.data.Dataset`
(trained on and evaluated on the same classes), or a
:class:`~jaxmetric.data.splits.ClassSplit` (trained on its training classes, every metric --
the per-epoch P@1 included -- measured on the held-out classes).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import pathlib
import sys
import time
from collections.abc import Callable, Collection

from experiments.presets import PRESETS
from jaxmetric.data.config import DataConfig
from jaxmetric.train import flags
from jaxmetric.train.config import TrainConfig

__all__ = ["build_parser", "config_from_args", "data_config_from_args", "main", "out_given",
           "setup_logging", "train_and_report"]


def build_parser(prog: str, description: str, run_name: str,
                 data_fields: Collection[str] = ()) -> argparse.ArgumentParser:
    """The shared command line (``run_name`` names the default run folder) with a flag
    for each of the :class:`~jaxmetric.data.DataConfig` fields ``data_fields``."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="start from this recipe (experiments/presets.py); flags given "
                        "here override it")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--tsne-points", type=int, default=5000)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--verbose", action="store_true",
                   help="also show other libraries' INFO logs (orbax, faiss, ...)")
    p.add_argument("--cpu-devices", type=int, metavar="N",
                   help="without GPU/TPU: split the CPU into N XLA devices, e.g. the number "
                        "of cores, so the data-parallel step runs N shards at once (same "
                        "result; the batch must divide by N)")
    flags.add_config_arguments(p.add_argument_group(
        "training configuration (jaxmetric.train.config.TrainConfig; without --out the run "
        f"folder is runs/{run_name}-<loss>-<time>)"), required=("loss",))
    if data_fields:
        flags.add_config_arguments(p.add_argument_group("data (jaxmetric.data.DataConfig)"),
                                   DataConfig, fields=data_fields)
    dist = p.add_argument_group("several processes (see docs/distributed.md)")
    dist.add_argument("--coordinator", help="HOST:PORT of process 0 (env JAXMETRIC_COORDINATOR)")
    dist.add_argument("--num-processes", type=int, help="env JAXMETRIC_NUM_PROCESSES")
    dist.add_argument("--process-id", type=int, help="env JAXMETRIC_PROCESS_ID")
    p.set_defaults(run_name=run_name)
    return p


def config_from_args(args, parser) -> TrainConfig:
    """Defaults, then the preset, then the flags given; exits 2 (``parser.error``) on a
    missing loss or an invalid combination."""
    values = _preset(args, TrainConfig) | flags.given_values(args)
    if "loss" not in values:
        parser.error("--loss is required (or a --preset that sets it)")
    if values.get("out") is None:
        values["out"] = time.strftime(f"runs/{args.run_name}-{values['loss']}-%Y%m%d-%H%M%S")
    try:
        return TrainConfig(**values)
    except (ValueError, TypeError) as e:
        parser.error(str(e))


def _preset(args, config_cls) -> dict:
    """The preset's values of ``config_cls`` fields (a preset may set both configs')."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    preset = PRESETS[args.preset] if args.preset else {}
    return {k: v for k, v in preset.items() if k in names}


def data_config_from_args(args, parser, config: TrainConfig, **fixed) -> DataConfig:
    """The :class:`DataConfig`: defaults, the preset's data values, the data flags typed,
    then ``fixed`` (what the experiment decides, e.g. ``source``); exits 2 on an invalid
    combination or a ``max_train`` below the batch size."""
    values = _preset(args, DataConfig) | flags.given_values(args, DataConfig) | fixed
    try:
        data = DataConfig(**values)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    if data.max_train is not None and data.max_train < config.batch_size:
        parser.error(f"max_train {data.max_train} is smaller than batch_size "
                     f"{config.batch_size}: an epoch would have no full batch")
    return data


def out_given(args) -> bool:
    """Whether the run folder was named (by --out or the preset), not made up."""
    preset = PRESETS[args.preset] if args.preset else {}
    return getattr(args, "out", preset.get("out")) is not None


def setup_logging(verbose: bool) -> None:
    """jaxmetric's own lines at INFO; other libraries' INFO only with ``--verbose``."""
    handler = logging.StreamHandler()  # main() routes it through tqdm.write
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    for name in ("jaxmetric", "experiments"):
        logging.getLogger(name).setLevel(logging.INFO)
    if not verbose:
        try:  # orbax logs through absl, which has a verbosity of its own
            from absl import logging as absl_logging

            absl_logging.set_verbosity(absl_logging.WARNING)
        except ImportError:
            pass


CPU_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def split_cpu_by_default(batch_size: int) -> int | None:
    """Without ``--cpu-devices``: split the CPU into one XLA device per core, or the
    largest divisor of the batch below the core count
    (:func:`jaxmetric.train.mesh.default_cpu_devices`; unused when a GPU or TPU trains).
    Leaves the devices alone when ``XLA_FLAGS`` already sets their number, or when JAX
    has already started (a program calling :func:`main` after using JAX). Returns the
    count chosen, or None."""
    import os

    from jaxmetric.train import use_cpu_devices
    from jaxmetric.train.mesh import default_cpu_devices

    if CPU_DEVICE_COUNT_FLAG in os.environ.get("XLA_FLAGS", ""):
        return None
    count = default_cpu_devices(batch_size)
    try:
        use_cpu_devices(count)
    except RuntimeError:
        return None
    return count


def main(parser: argparse.ArgumentParser, run: Callable[..., int], argv=None) -> int:
    """Parse ``argv``, build the config, set up logging, then ``run(args, parser,
    config)`` with log lines that do not tear the progress bars apart."""
    args = parser.parse_args(argv)
    if args.resume and not out_given(args):
        parser.error("--resume needs --out: the run folder to continue")
    config = config_from_args(args, parser)
    if args.cpu_devices is not None:
        from jaxmetric.train import use_cpu_devices

        try:
            use_cpu_devices(args.cpu_devices)
        except (ValueError, RuntimeError) as e:
            parser.error(f"--cpu-devices: {e}")
    else:
        split_cpu_by_default(config.batch_size)
    setup_logging(args.verbose)
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        return run(args, parser, config)


def _setting_error(parser: argparse.ArgumentParser, error: Exception):
    """Exit 2 with the one line that names a setting to fix (a resume with other
    settings, a value the loss refuses): the flags were well formed, so no usage."""
    parser.exit(2, f"{parser.prog}: error: {error}\n")


def train_and_report(args, parser, config: TrainConfig, data_config: DataConfig, *,
                     hint: str | None = None) -> int:
    """Train and evaluate the data ``data_config`` describes (a Dataset or a ClassSplit).

    Missing or bad data (:class:`jaxmetric.data.DataError`) exits 1 with nothing
    written, a bad class choice (``ValueError``) exits 2, and so do a loss setting the
    loss refuses and a resume with other settings or data (checked before the data
    loads, nothing written). Run-folder problems exit 1 with one line: a folder that
    holds another run, no intact checkpoint to resume
    (:class:`~jaxmetric.train.checkpoints.DamagedCheckpointError`), a full disk while
    saving (:class:`~jaxmetric.train.checkpoints.DiskFullError`), a diverged run.
    ``hint`` is the small CPU command suggested for long runs without an accelerator.
    """
    from jaxmetric import distributed

    try:
        multiprocess = distributed.initialize(args.coordinator, args.num_processes,
                                              args.process_id)
    except ValueError as e:
        parser.error(str(e))
    if multiprocess and not out_given(args):
        parser.error("--out is required with several processes: the same shared folder "
                     "on every host (the default name holds each host's start time)")

    import jax

    from jaxmetric import data, report, train
    from jaxmetric.data import splits
    from jaxmetric.train.checkpoints import DamagedCheckpointError, DiskFullError
    from jaxmetric.train.rundir import check_run_dir

    progress = not args.no_progress
    try:  # a value the loss refuses (loss_options are checked by key only) is a flag to fix
        train.check_loss_values(config)
    except ValueError as e:
        _setting_error(parser, e)
    try:  # before the data is loaded: a run folder that cannot take the run fails fast
        check_run_dir(pathlib.Path(config.out), config, args.resume, data_config)
    except (FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # resuming with other settings or other data: a flag to fix
        _setting_error(parser, e)
    try:
        loaded = data.load(data_config)
    except data.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        parser.error(str(e))
    if isinstance(loaded, splits.ClassSplit):
        train_data, eval_data, split_info = loaded.train, loaded.eval, loaded.describe()
        if len(train_data.train) < config.batch_size:
            parser.error(f"the {len(train_data.class_names)} training classes have "
                         f"{len(train_data.train)} training images, fewer than batch_size "
                         f"{config.batch_size}: lower --batch-size")
        what = ("held-out classes, test vs train" if loaded.has_gallery
                else "held-out classes, leave-one-out")
    else:
        train_data = eval_data = loaded
        split_info, what = None, None
        if len(train_data.train) < config.batch_size:
            parser.error(f"the data has {len(train_data.train)} training images, fewer "
                         f"than batch_size {config.batch_size}: lower --batch-size")
    mesh = train.make_mesh(jax.devices())  # every device of every process
    try:
        config.check_devices(mesh.size)
    except ValueError as e:
        parser.error(str(e))
    hook = report.precision_at_1_hook(eval_data, mesh=mesh, what=what)
    try:
        state = train.fit(config, train_data, config.out, resume=args.resume, eval_hook=hook,
                          mesh=mesh, progress=progress, slow_cpu_hint=hint,
                          data=data_config)
    except (FileExistsError, FileNotFoundError, FloatingPointError, DamagedCheckpointError,
            DiskFullError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    metrics = report.evaluate_state(
        state, eval_data, config.out,
        config=config.to_dict() | {"data": data_config.to_dict()},
        epoch=config.epochs, mesh=mesh, tsne_points=args.tsne_points, progress=progress,
        split=split_info,
    )
    if jax.process_index() == 0:
        print(f"{config.out}: {report.summary_line(metrics)}")
    # Keep every process alive until process 0 has written the report: one that exits
    # early would wait in JAX's shutdown barrier and, past its timeout, stop them all.
    distributed.barrier("report")
    return 0
