"""Summarise a finished run folder as one results JSON (for ``benchmarks/results/``).

    python -m benchmarks.collect_run RUN_DIR --command "python -m experiments.cifar10 ..." \\
        --out benchmarks/results/cifar10-triplet-cpu.json

Keys: ``loss``, ``precision_at_1`` (test queries against the training set, FAISS
IndexFlatL2), ``r_precision`` and ``map_at_r`` (test against test, leave-one-out),
``train_seconds`` (sum of the epochs' wall time: first-epoch compilation included,
evaluation excluded), ``images_per_second`` (median over epochs after the first),
``device``, ``date``, ``command``, plus the run's config and full metrics.
"""

from __future__ import annotations

import argparse
import json
import pathlib

from benchmarks.common import collect


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--command", required=True, help="the command that produced the run")
    p.add_argument("--device", help="default: described from jax.devices()")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    result = collect(args.run_dir, command=args.command, device=args.device)
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("loss", "precision_at_1", "r_precision", "map_at_r",
                                             "train_seconds", "images_per_second")}))


if __name__ == "__main__":
    main()
