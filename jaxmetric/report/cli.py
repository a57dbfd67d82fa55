"""``python -m jaxmetric.report RUN_DIR``: re-evaluate a saved run without training.

Restores the run's checkpoint (the latest, or ``--epoch``), loads the data it was trained
on (or ``--data-dir``), and writes ``metrics.json``, ``report.md`` and the pictures again
(see :func:`jaxmetric.report.evaluate_state`); a run with ``unseen_classes`` is evaluated
on its held-out classes again. Runs of ``python -m experiments.cifar10`` only: the data
of ``experiments.retrieval`` runs is chosen by flags that config.json does not hold.
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
    p.add_argument("run_dir", help="a run folder written by python -m experiments.cifar10")
    p.add_argument("--epoch", type=int, help="checkpoint epoch (default: the latest)")
    p.add_argument("--data-dir", help="override the data source saved in config.json")
    p.add_argument("--tsne-points", type=int, default=5000, help="0 = no t-SNE")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    from jaxmetric import data, train
    from jaxmetric.data import splits
    split = None
    try:
        config = train.load_config(args.run_dir)
        data_dir = args.data_dir if args.data_dir is not None else config.data_dir
        dataset = data.load_cifar10(data_dir, max_train=config.max_train,
                                    max_test=config.max_test)
        if config.unseen_classes is not None:  # evaluated on the held-out classes only
            held_out = splits.hold_out_last(dataset, config.unseen_classes)
            dataset, split = held_out.eval, held_out.describe()
        # The data set only stands in for the image shape and normalisation of
        # checkpoints that do not record them (written by an earlier version).
        config, state, epoch = train.restore_state(args.run_dir, epoch=args.epoch,
                                                   inputs=dataset)
    except (FileNotFoundError, ValueError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    cfg = config.to_dict() | {"data_dir": data_dir}
    metrics = evaluate_state(state, dataset, args.run_dir, config=cfg, epoch=epoch,
                             tsne_points=args.tsne_points, progress=not args.no_progress,
                             split=split)
    print(f"{args.run_dir} epoch {epoch}: {summary_line(metrics)}")
    return 0
