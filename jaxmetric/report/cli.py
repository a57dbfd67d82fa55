"""``python -m jaxmetric.report RUN_DIR``: re-evaluate a saved run without training.

Restores the run's checkpoint (the latest, or ``--epoch``), loads the data it was trained
on -- :func:`jaxmetric.data.load` of the :class:`~jaxmetric.data.DataConfig` saved in its
``config.json``, from ``--data-dir`` when the data has moved -- and writes
``metrics.json``, ``report.md`` and the pictures again (see
:func:`jaxmetric.report.evaluate_state`). A run trained on some classes and evaluated on
others (``--unseen-classes``, ``experiments.retrieval``) is evaluated on its held-out
classes again. Runs written before ``config.json`` had a data section recorded CIFAR-10
settings only and are read as CIFAR-10 runs.
"""

from __future__ import annotations

import argparse
import sys

from jaxmetric.report.run import evaluate_state, summary_line

__all__ = ["main"]


def main(argv=None) -> int:
    """The command line; returns the exit status (1 for a missing run or data)."""
    p = argparse.ArgumentParser(prog="python -m jaxmetric.report",
                                description="Re-evaluate a saved jaxmetric run.")
    p.add_argument("run_dir", help="a run folder written by python -m experiments.cifar10 "
                   "or experiments.retrieval")
    p.add_argument("--epoch", type=int, help="checkpoint epoch (default: the latest)")
    p.add_argument("--data-dir", help="where the data saved in config.json now lives")
    p.add_argument("--tsne-points", type=int, default=5000, help="0 = no t-SNE")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    import dataclasses

    from jaxmetric import data, train
    from jaxmetric.data import splits
    split = None
    try:
        data_config = train.load_data_config(args.run_dir)
        if args.data_dir is not None:
            data_config = dataclasses.replace(data_config, path=args.data_dir)
        dataset = data.load(data_config)
        if isinstance(dataset, splits.ClassSplit):  # evaluated on the held-out classes only
            dataset, split = dataset.eval, dataset.describe()
        # The data set only stands in for the image shape and normalisation of
        # checkpoints that do not record them (written by an earlier version).
        config, state, epoch = train.restore_state(args.run_dir, epoch=args.epoch,
                                                   inputs=dataset)
    except (FileNotFoundError, ValueError, TypeError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    cfg = config.to_dict() | {"data": data_config.to_dict()}
    metrics = evaluate_state(state, dataset, args.run_dir, config=cfg, epoch=epoch,
                             tsne_points=args.tsne_points, progress=not args.no_progress,
                             split=split)
    print(f"{args.run_dir} epoch {epoch}: {summary_line(metrics)}")
    return 0
