"""The markdown report of a run: metrics tables, pictures and configuration.

:func:`write_report` turns a nested metrics dict (e.g. the output of
:func:`jaxmetric.evaluate.evaluate_embeddings`) into ``report.md``: one two-column table
per section, the run's pictures that exist, and the configuration as JSON.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxmetric.utils import flatten, write_atomic

__all__ = ["write_report"]


def _fmt(value) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "nan" if math.isnan(value) else f"{float(value):.4f}"
    return str(value)


def write_report(
    run_dir,
    metrics: Mapping[str, Any],
    *,
    config: Mapping[str, Any] | None = None,
    pictures: Sequence[str] = ("tsne.png", "curves.png", "neighbours.png"),
    dataset_note: str | None = None,
    title: str = "jaxmetric evaluation report",
) -> pathlib.Path:
    """Write ``run_dir/report.md``: metrics tables, existing pictures, configuration.

    Each top-level section of ``metrics`` whose value is a dict (e.g. the output of
    :func:`jaxmetric.evaluate.evaluate_embeddings`) becomes a two-column table (nested
    dicts are flattened with dots); top-level scalars go in a "summary" table. Pictures
    are embedded as markdown images, in the given order, only if the file exists in
    ``run_dir``. The file is replaced atomically.

    Args:
      run_dir: run directory (created if missing).
      metrics: nested dict of numbers.
      config: optional run configuration, dumped as JSON at the end. Its
        ``"dataset_note"`` entry is used when ``dataset_note`` is not given.
      pictures: file names, relative to ``run_dir``.
      dataset_note: e.g. ``"CIFAR-10 (JPEG q75 copy)"``; printed as "Accuracy is measured
        on ...".
      title: top heading.

    Returns:
      The path of the written report.
    """
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a dict; got {type(metrics).__name__}")
    if isinstance(pictures, str):
        raise TypeError("pictures must be a sequence of file names, not a single string")
    run_dir = pathlib.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if dataset_note is None and config is not None:
        dataset_note = config.get("dataset_note")

    lines = [f"# {title}", ""]
    if dataset_note:
        lines += [f"Accuracy is measured on {dataset_note}.", ""]

    scalars = {k: v for k, v in metrics.items() if not isinstance(v, Mapping)}
    sections = [(k, v) for k, v in metrics.items() if isinstance(v, Mapping)]
    if scalars:
        sections.insert(0, ("summary", scalars))
    if sections:
        lines += ["## Metrics", ""]
    for name, section in sections:
        flat = flatten(section)
        if not flat:
            continue
        lines += [f"### {name}", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {key} | {_fmt(value)} |" for key, value in flat.items()]
        lines.append("")

    present = [p for p in pictures if (run_dir / p).is_file()]
    if present:
        lines += ["## Pictures", ""]
        for p in present:
            lines += [f"![{pathlib.Path(p).stem}]({p})", ""]

    if config is not None:
        lines += ["## Configuration", "", "```json",
                  json.dumps(dict(config), indent=2, sort_keys=True, default=str), "```", ""]

    path = run_dir / "report.md"
    write_atomic(path, "\n".join(lines))
    return path

