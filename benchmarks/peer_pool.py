"""Pool the seeds of several ``benchmarks.peer_training`` result files into one comparison.

    python -m benchmarks.peer_pool benchmarks/results/peer-training-cpu.json \\
        benchmarks/results/peer-training-cpu-2dev.json \\
        benchmarks/results/peer-training-cpu-2dev-chunked.json

Per loss and side, :func:`benchmarks.common.summarise_peer_runs` over the pooled runs (the
seeds, mean ± sample sd of P@1 and R-precision, ...), and per loss the standard error of
the P@1 difference (jaxmetric − PyTorch, in points), ``sqrt(sd_j² / n_j + sd_p² / n_p)``:
the two sides' seeds are independent draws (the same seed number drives different
random streams in the two frameworks). A seed run twice (in two files) is counted once,
from the last file. The table shows quality only: the files may come from different
settings (devices, convolution chunking) and machine states, so compare speeds within
one file. With ``--cpu`` a second table gives each side's CPU use in epochs 2..N
(:func:`benchmarks.common.steady_cpu_use`): the work per epoch in CPU seconds,
which other work on the machine changes little, and the cores kept busy.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from benchmarks.common import LOSSES, PEER_SIDE_NAMES, PEER_SIDES, summarise_peer_runs


def pooled_runs(docs: list[dict]) -> list[dict]:
    """The runs of all files, one per (loss, side, seed), later files winning."""
    runs = {}
    for doc in docs:
        for run in doc.get("runs", []):
            runs[run["loss"], run["side"], run["seed"]] = run
    return list(runs.values())


def pool(docs: list[dict]) -> dict:
    """:func:`benchmarks.common.summarise_peer_runs` over the pooled runs, with the standard
    error of the P@1 difference (in points) added to each loss's comparison."""
    summary = summarise_peer_runs(pooled_runs(docs), LOSSES, PEER_SIDES)
    for per in summary.values():
        if "jaxmetric_vs_pml" in per:
            j, p = per["jaxmetric"], per["pml"]
            sd_j, sd_p = j["precision_at_1_sd"], p["precision_at_1_sd"]
            # one seed on a side has no sample sd, so no standard error either
            se = (None if sd_j is None or sd_p is None
                  else 100 * math.sqrt(sd_j ** 2 / j["n"] + sd_p ** 2 / p["n"]))
            per["jaxmetric_vs_pml"]["precision_at_1_diff_se_points"] = se
    return summary


def markdown(summary: dict) -> str:
    lines = ["| loss | side | seeds | P@1 test→train | R-precision |", "|---|---|---|---|---|"]
    for loss, per in summary.items():
        for side in PEER_SIDES:
            if side in per:
                s = per[side]
                seeds = ", ".join(map(str, sorted(s["seeds"])))
                p1, rp = (f"{100 * s[k + '_mean']:.1f}"
                          + (f" ± {100 * s[k + '_sd']:.1f}" if s[k + "_sd"] is not None else "")
                          + " %" for k in ("precision_at_1", "r_precision"))
                lines.append(f"| {loss} | {PEER_SIDE_NAMES[side]} | {seeds} | {p1} | {rp} |")
        if "jaxmetric_vs_pml" in per:
            d = per["jaxmetric_vs_pml"]
            se = d["precision_at_1_diff_se_points"]
            se = "–" if se is None else f"{se:.1f}"
            lines.append(f"| {loss} | jaxmetric − PyTorch | | "
                         f"{d['precision_at_1_diff_points']:+.2f} pts (s.e. {se}) | "
                         f"{d['r_precision_diff_points']:+.2f} pts |")
    return "\n".join(lines)


def cpu_markdown(summary: dict) -> str:
    """Epochs 2..N: CPU seconds per epoch and cores kept busy, per loss and side."""
    def num(x, fmt):
        return "–" if x is None else format(x, fmt)

    lines = ["| loss | side | CPU s per epoch | cores busy |", "|---|---|---|---|"]
    for loss, per in summary.items():
        for side in PEER_SIDES:
            if side in per:
                s = per[side]
                lines.append(f"| {loss} | {PEER_SIDE_NAMES[side]} | "
                             f"{num(s['steady_cpu_seconds_per_epoch_mean'], '.1f')} | "
                             f"{num(s['steady_cores_busy_mean'], '.2f')} |")
        if "jaxmetric_vs_pml" in per:
            d = per["jaxmetric_vs_pml"]
            lines.append(f"| {loss} | jaxmetric ÷ PyTorch | "
                         f"{num(d['steady_cpu_seconds_per_epoch_ratio'], '.2f')} | "
                         f"{num(d['steady_cores_busy_ratio'], '.2f')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help="peer_training JSON results")
    p.add_argument("--json", help="also write the pooled summary here")
    p.add_argument("--cpu", action="store_true",
                   help="also print the CPU use of epochs 2..N: CPU seconds per epoch (all "
                        "threads) and cores kept busy (CPU / wall seconds); pool files of "
                        "one setting (devices, chunking) for it")
    args = p.parse_args(argv)
    docs = []
    for path in args.files:
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            p.error(f"cannot read {path}: {e}")
        if doc.get("benchmark") != "peer_training":
            p.error(f"{path} is not a benchmarks.peer_training result")
        docs.append(doc)
    summary = pool(docs)
    print(markdown(summary))
    if args.cpu:
        print()
        print(cpu_markdown(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"files": args.files, "summary": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
