"""Pool the seeds of several ``benchmarks.peer_training`` result files into one comparison.

    python -m benchmarks.peer_pool benchmarks/results/peer-training-cpu.json \\
        benchmarks/results/peer-training-cpu-2dev.json \\
        benchmarks/results/peer-training-cpu-2dev-chunked.json

Per loss and side: the seeds found, mean ± sample sd of P@1 and R-precision; per loss the
difference of the means (jaxmetric − PyTorch, in points) with its standard error
``sqrt(sd_j² / n_j + sd_p² / n_p)`` (the two sides' seeds are independent draws: the
same seed number drives different random streams in the two frameworks). A seed run
twice (in two files) is counted once, from the last file. Speed is not pooled: the
files may come from different settings (devices, convolution chunking) and machine
states; compare speeds within one file.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

SIDES = (("jaxmetric", "jaxmetric"), ("pml", "PyTorch + PML"))


def pool(docs: list[dict]) -> dict:
    """``{loss: {side: {seed: run}}}`` over the files, later files winning."""
    out: dict[str, dict[str, dict[int, dict]]] = {}
    for doc in docs:
        for run in doc.get("runs", []):
            out.setdefault(run["loss"], {}).setdefault(run["side"], {})[run["seed"]] = run
    return out


def stats(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else float("nan")


def summarise(pooled: dict) -> dict:
    summary = {}
    for loss, sides in pooled.items():
        row = {}
        for side, _ in SIDES:
            runs = sides.get(side, {})
            if not runs:
                continue
            p1 = [100 * runs[s]["precision_at_1"] for s in sorted(runs)]
            rp = [100 * runs[s]["r_precision"] for s in sorted(runs)]
            row[side] = {"seeds": sorted(runs), "p_at_1": stats(p1), "r_precision": stats(rp)}
        if len(row) == 2:
            j, p = row["jaxmetric"], row["pml"]
            se = math.sqrt(j["p_at_1"][1] ** 2 / len(j["seeds"])
                           + p["p_at_1"][1] ** 2 / len(p["seeds"]))
            row["difference"] = {"p_at_1": j["p_at_1"][0] - p["p_at_1"][0], "p_at_1_se": se,
                                 "r_precision": j["r_precision"][0] - p["r_precision"][0]}
        summary[loss] = row
    return summary


def markdown(summary: dict) -> str:
    lines = ["| loss | side | seeds | P@1 test→train | R-precision |", "|---|---|---|---|---|"]
    for loss, row in summary.items():
        for side, name in SIDES:
            if side in row:
                r = row[side]
                seeds = ", ".join(map(str, r["seeds"]))
                lines.append(f"| {loss} | {name} | {seeds} | {r['p_at_1'][0]:.1f} ± "
                             f"{r['p_at_1'][1]:.1f} % | {r['r_precision'][0]:.1f} ± "
                             f"{r['r_precision'][1]:.1f} % |")
        if "difference" in row:
            d = row["difference"]
            lines.append(f"| {loss} | jaxmetric − PyTorch | | {d['p_at_1']:+.2f} pts "
                         f"(s.e. {d['p_at_1_se']:.1f}) | {d['r_precision']:+.2f} pts |")
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
    summary = summarise(pool(docs))
    print(markdown(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"files": args.files, "summary": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
