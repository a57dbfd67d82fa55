"""Pool the seeds of several ``benchmarks.peer_training`` result files into one comparison.

    python -m benchmarks.peer_pool benchmarks/results/peer-training-cpu.json \\
        benchmarks/results/peer-training-cpu-2dev.json \\
        benchmarks/results/peer-training-cpu-2dev-chunked.json

Per loss and side, :func:`benchmarks.peer_training.summarise` over the pooled runs (the
seeds, mean ± sample sd of P@1 and R-precision, ...), and per loss the standard error of
the P@1 difference (jaxmetric − PyTorch, in points), ``sqrt(sd_j² / n_j + sd_p² / n_p)``:
the two sides' seeds are independent draws (the same seed number drives different
random streams in the two frameworks). A seed run twice (in two files) is counted once,
from the last file. The table shows quality only: the files may come from different
settings (devices, convolution chunking) and machine states, so compare speeds within
one file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from benchmarks.peer_training import LOSSES, SIDE_NAMES, SIDES, summarise


def pooled_runs(docs: list[dict]) -> list[dict]:
    """The runs of all files, one per (loss, side, seed), later files winning."""
    runs = {}
    for doc in docs:
        for run in doc.get("runs", []):
            runs[run["loss"], run["side"], run["seed"]] = run
    return list(runs.values())


def pool(docs: list[dict]) -> dict:
    """:func:`benchmarks.peer_training.summarise` over the pooled runs, with the standard
    error of the P@1 difference (in points) added to each loss's comparison."""
    summary = summarise(pooled_runs(docs), LOSSES, SIDES)
    for per in summary.values():
        if "jaxmetric_vs_pml" in per:
            j, p = per["jaxmetric"], per["pml"]
            se = math.sqrt(j["precision_at_1_sd"] ** 2 / j["n"]
                           + p["precision_at_1_sd"] ** 2 / p["n"])
            per["jaxmetric_vs_pml"]["precision_at_1_diff_se_points"] = 100 * se
    return summary


def markdown(summary: dict) -> str:
    lines = ["| loss | side | seeds | P@1 test→train | R-precision |", "|---|---|---|---|---|"]
    for loss, per in summary.items():
        for side in SIDES:
            if side in per:
                s = per[side]
                seeds = ", ".join(map(str, sorted(s["seeds"])))
                p1, rp = (f"{100 * s[k + '_mean']:.1f} ± {100 * s[k + '_sd']:.1f} %"
                          for k in ("precision_at_1", "r_precision"))
                lines.append(f"| {loss} | {SIDE_NAMES[side]} | {seeds} | {p1} | {rp} |")
        if "jaxmetric_vs_pml" in per:
            d = per["jaxmetric_vs_pml"]
            lines.append(f"| {loss} | jaxmetric − PyTorch | | "
                         f"{d['precision_at_1_diff_points']:+.2f} pts (s.e. "
                         f"{d['precision_at_1_diff_se_points']:.1f}) | "
                         f"{d['r_precision_diff_points']:+.2f} pts |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help="peer_training JSON results")
    p.add_argument("--json", help="also write the pooled summary here")
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"files": args.files, "summary": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
