"""A loss's search space, from its declaration to a trial's settings and back to flags.

The ranges are declared once, as data, in the loss registry
(:attr:`jaxmetric.losses.registry.LossEntry.tuning_space`: :class:`~jaxmetric.losses.registry.Range`
and :class:`~jaxmetric.losses.registry.Choice`); this module is the only place that
turns them into Optuna calls and training settings:

* :func:`free_space` -- the declared space minus what the command line fixes (a flag
  typed is never tuned: ``--optimizer sgd`` drops the optimizer, ``--lr`` the learning
  rate, ``--loss-options scale=30`` the scale) and minus what the other settings refuse
  (``--soft-margin`` leaves the triplet no margin);
* :func:`default_values` -- the point of the space a run without tuned values trains at
  (the loss's training defaults), which a study can try first;
* :func:`suggest` -- one ``trial.suggest_float`` / ``suggest_categorical`` per name
  (log-uniform where the range says ``log``);
* :func:`trial_values` -- the sampled values as :class:`~jaxmetric.train.config.TrainConfig`
  fields: a config field as itself, ``lr_factor`` as ``lr = lr_factor * base_lr`` (the
  usual peak learning rate of the chosen optimizer and batch,
  :attr:`~jaxmetric.train.config.TrainConfig.base_lr`), any other name as a
  ``loss_options`` keyword;
* :func:`command_flags` and :func:`where_defaults_live` -- those settings as the flags of
  a training command and as the place each default is kept (the registry entry, the loss
  function's keyword, or :class:`~jaxmetric.train.config.TrainConfig`).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

from jaxmetric.losses import registry
from jaxmetric.losses.registry import Choice, Range
from jaxmetric.train.config import (
    CONFIG_ARGUMENTS,
    STEP_ARGUMENTS,
    TrainConfig,
    parse_options,
)
from jaxmetric.train.flags import flag_name

__all__ = ["LR_FACTOR", "check_space", "command_flags", "default_values", "format_options",
           "free_space", "suggest", "trial_values", "where_defaults_live"]

LR_FACTOR = "lr_factor"
"""The space's name for the peak learning rate in units of the run's default one."""

CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig))


def _is_option(name: str) -> bool:
    """Whether a space's name is a keyword of the loss function (set via loss_options)."""
    return name not in CONFIG_FIELDS and name != LR_FACTOR


def check_space(loss: str) -> None:
    """Raise ``ValueError`` if a name of ``loss``'s space is neither a
    :class:`TrainConfig` field, ``lr_factor``, nor a keyword the loss function takes
    through ``loss_options``."""
    entry = registry.get(loss)
    allowed = entry.keywords - STEP_ARGUMENTS - CONFIG_ARGUMENTS - {entry.margin_arg}
    for name in entry.tuning_space:
        if _is_option(name) and name not in allowed:
            raise ValueError(f"the search space of {loss} names {name!r}: neither a training "
                             f"setting nor a keyword of {entry.fn.__name__} "
                             f"({', '.join(sorted(allowed))})")


def format_options(options: Mapping[str, Any]) -> str | None:
    """``{"scale": 24.5, "large_angle": "plain"}`` -> ``"scale=24.5,large_angle=plain"``:
    the text :func:`jaxmetric.train.config.parse_options` reads back to the same values
    (None for no options)."""
    def text(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        return "none" if v is None else (repr(v) if isinstance(v, float) else str(v))

    return ",".join(f"{k}={text(v)}" for k, v in options.items()) or None


def _sample(param: Range | Choice):
    return param.options[0] if isinstance(param, Choice) else param.low


def free_space(base: Mapping[str, Any]) -> tuple[dict[str, Range | Choice], dict[str, str]]:
    """``(space, left_out)``: what a study of ``base["loss"]`` tunes when the command line
    sets ``base`` (:class:`TrainConfig` fields as typed), and ``{name: why}`` for the
    declared names it does not tune.

    Raises:
      ValueError: ``base`` itself is not a valid :class:`TrainConfig`.
    """
    TrainConfig(**base)  # the fixed settings must stand on their own
    loss = base["loss"]
    check_space(loss)
    given_options = parse_options(base.get("loss_options"))
    space, left_out = {}, {}
    for name, param in registry.get(loss).tuning_space.items():
        fixed_by = None
        if name == LR_FACTOR and base.get("lr") is not None:
            fixed_by = "--lr"
        elif name in CONFIG_FIELDS and name in base:
            fixed_by = flag_name(name)
        elif _is_option(name) and name in given_options:
            fixed_by = f"--loss-options {name}=..."
        if fixed_by:
            left_out[name] = f"fixed by {fixed_by}"
            continue
        try:  # a value the other settings refuse (e.g. a margin beside --soft-margin)
            TrainConfig(**(dict(base) | trial_values(base, {name: _sample(param)})))
        except (ValueError, TypeError) as e:
            left_out[name] = str(e)
            continue
        space[name] = param
    return space, left_out


def default_values(base: Mapping[str, Any], space: Mapping[str, Range | Choice]
                   ) -> dict[str, Any]:
    """The value of each name of ``space`` that a run with ``base`` (and nothing tuned)
    trains with: the loss's training defaults, else its function's defaults -- the point
    a study compares its trials with (``--enqueue-defaults``). ``lr_factor`` is the
    default peak learning rate over the optimizer's usual one."""
    config = TrainConfig(**base)
    entry = registry.get(config.loss)
    signature = inspect.signature(entry.fn).parameters
    kwargs = config.loss_kwargs
    values = {}
    for name in space:
        if name == LR_FACTOR:
            values[name] = config.peak_lr / config.base_lr
        elif name == "optimizer":
            values[name] = config.run_optimizer
        elif name == "loss_lr_multiplier":
            values[name] = config.loss_lr_scale
        else:
            keyword = entry.margin_arg if name == "margin" else name
            if keyword in kwargs:
                values[name] = kwargs[keyword]
            elif keyword in signature:
                values[name] = signature[keyword].default
            else:
                values[name] = getattr(config, name)
    return values


def suggest(trial, space: Mapping[str, Range | Choice]) -> dict[str, Any]:
    """One value per name of ``space`` from an Optuna ``trial``."""
    values = {}
    for name, param in space.items():
        if isinstance(param, Choice):
            values[name] = trial.suggest_categorical(name, param.options)
        else:
            values[name] = trial.suggest_float(name, float(param.low), float(param.high),
                                               log=param.log)
    return values


def trial_values(base: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`TrainConfig` fields that ``params`` (a trial's values) set on top of
    ``base``: config fields as they are, ``lr_factor`` as an absolute ``lr``, the rest
    merged into ``loss_options`` (after the ones ``base`` gives)."""
    fields: dict[str, Any] = {}
    options = parse_options(base.get("loss_options"))
    extra = False
    for name, value in params.items():
        if name == LR_FACTOR:
            continue
        if _is_option(name):
            options[name] = value
            extra = True
        else:
            fields[name] = value
    if LR_FACTOR in params:
        default = TrainConfig(**(dict(base) | fields | {"lr": None})).base_lr
        fields["lr"] = float(params[LR_FACTOR]) * default
    if extra:
        fields["loss_options"] = format_options(options)
    return fields


def command_flags(values: Mapping[str, Any], config_cls: type = TrainConfig) -> list[str]:
    """``values`` (fields of ``config_cls``) as the flags of :mod:`jaxmetric.train.flags`:
    ``["--margin", "0.31", "--no-augment", "--data-dir", "DATA", ...]``."""
    spelled = {f.name: f.metadata.get("flag", flag_name(f.name))
               for f in dataclasses.fields(config_cls)}
    argv = []
    for name, value in values.items():
        flag = spelled[name]
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
            continue
        if value is None:
            text = "none"
        elif isinstance(value, (tuple, list)):
            text = ",".join(map(str, value))
        else:
            text = repr(value) if isinstance(value, float) else str(value)
        argv += [flag, text]
    return argv


def where_defaults_live(loss: str, params: Mapping[str, Any],
                        values: Mapping[str, Any]) -> dict[str, str]:
    """For each tuned name, where its value would become ``loss``'s training default:
    a field of its :class:`~jaxmetric.losses.registry.LossEntry` (``margin``,
    ``lr_multiplier``, ``optimizer``, ``lr_factor``, or a keyword in ``options``), or a
    :class:`TrainConfig` field, with the flag that sets it in one run."""
    entry = registry.get(loss)
    fn = entry.fn.__name__
    out = {}
    for name, value in params.items():
        if name == "margin":
            out[name] = (f"registry LossEntry({fn}, margin={value!r}) (flag --margin; the "
                         f"function's keyword {entry.margin_arg!r})")
        elif name == "loss_lr_multiplier":
            out[name] = (f"registry LossEntry({fn}, lr_multiplier={value!r}) "
                         "(flag --loss-lr-multiplier)")
        elif name == LR_FACTOR:
            out[name] = (f"registry LossEntry({fn}, lr_factor={value!r}) (lr {values['lr']!r}; "
                         "flag --lr)")
        elif name == "optimizer":
            out[name] = f"registry LossEntry({fn}, optimizer={value!r}) (flag --optimizer)"
        elif name in CONFIG_FIELDS:
            out[name] = f"TrainConfig.{name} = {value!r} (flag {flag_name(name)})"
        else:
            out[name] = (f"registry LossEntry({fn}, options={{{name!r}: {value!r}}}) (flag "
                         f"--loss-options {name}=...)")
    return out
