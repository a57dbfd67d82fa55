"""Named training recipes: each is a dict of :class:`jaxmetric.train.config.TrainConfig` fields.

``python -m experiments.cifar10 --preset NAME`` starts from the defaults, puts the
preset's values on top and then the flags typed on the command line, so an explicit
flag always wins (``--preset cpu --epochs 3``). ``benchmarks/gpu.sh`` runs the ``h200``
recipes rather than spelling their settings out again.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS"]

CPU = {"model": "homebrew", "batch_size": 256, "epochs": 10, "max_train": 10_000,
       "max_test": 2_000}
"""The small CPU run (a few minutes on two cores): the homebrew network on the first
10,000 training and 2,000 test images. Give the loss with ``--loss``."""

H200 = {"model": "resnet18", "dtype": "bfloat16", "batch_size": 1024, "epochs": 40,
        "warmup_epochs": 5.0, "eval_every": 10, "checkpoint_every": 10, "loss": "triplet",
        "mining": "semihard"}
"""One H100/H200-class GPU: ResNet-18 in bfloat16, batch 1024 (peak lr 0.4 by the
linear scaling rule), 40 epochs with 5 of warm-up, evaluation and checkpoints every 10
epochs; the triplet loss with semi-hard mining (the best of the CPU tuning runs)."""

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": CPU,
    "h200": H200,
    "h200-contrastive": H200 | {"loss": "contrastive", "mining": None},
}
"""Every preset by name."""
