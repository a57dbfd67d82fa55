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
import statistics
import time


def collect(run_dir, *, command: str, device: str | None = None) -> dict:
    import jax

    run_dir = pathlib.Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    speeds = [r["images_per_second"] for r in records[1:]] or [records[0]["images_per_second"]]
    if device is None:
        d = jax.devices()[0]
        device = f"{jax.device_count()} x {d.device_kind} ({d.platform})"
    return {
        "loss": config["loss"],
        "mining": config.get("mining"),
        "model": config["model"],
        "epochs": len(records),
        "precision_at_1": metrics["test_vs_train"]["precision_at_1"],
        "r_precision": metrics["test_vs_test"]["r_precision"],
        "map_at_r": metrics["test_vs_test"]["map_at_r"],
        "train_seconds": sum(r["epoch_seconds"] for r in records),
        "images_per_second": statistics.median(speeds),
        "device": device,
        "date": time.strftime("%Y-%m-%d"),
        "command": command,
        "dataset": metrics.get("run", {}).get("dataset"),
        "config": config,
        "metrics": metrics,
    }


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
