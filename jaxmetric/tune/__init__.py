"""Tuning a loss's hyper-parameters the same honest way for every loss.

"A Metric Learning Reality Check" (Musgrave et al. 2020) asks that each loss be tuned
the same way, on a validation set, never on the test set. ``python -m jaxmetric.tune``
does that with Optuna:

* :mod:`~jaxmetric.tune.space` -- the search space a loss declares in the registry
  (:attr:`jaxmetric.losses.registry.LossEntry.tuning_space`) turned into Optuna's
  ``suggest_*`` calls and back into training settings and flags;
* :mod:`~jaxmetric.tune.study` -- the resumable study: SQL storage, seeded TPE sampler,
  median pruner on the per-epoch validation score, heartbeats that fail and re-queue
  the trials of a killed process, the best result;
* :mod:`~jaxmetric.tune.cli` -- the command line, with every flag of the training
  command, and the validation split (:func:`jaxmetric.data.splits.validation_split`,
  :func:`jaxmetric.data.splits.validation_classes`).

It sits on the top floor of the package (it uses the data, the training loop and the
report's per-epoch score) and needs ``pip install 'jaxmetric[tune]'`` (Optuna).

References:
  Musgrave, Belongie, Lim. "A Metric Learning Reality Check". ECCV 2020.
    https://arxiv.org/abs/2003.08505
  Akiba, Sano, Yanase, Ohta, Koyama. "Optuna: A Next-generation Hyperparameter
    Optimization Framework". KDD 2019. https://arxiv.org/abs/1907.10902
"""
