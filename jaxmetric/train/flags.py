"""Command-line flags generated from :class:`jaxmetric.train.config.TrainConfig`.

Each config field becomes one flag, so a setting is written once (in the dataclass,
with its help text in the field's metadata) and the command line cannot drift from it:

* ``embed_dim`` -> ``--embed-dim``, typed as the field (``int``, ``float``, ``str``);
* ``X | None`` fields also take the word ``none`` (``--max-train none`` undoes a
  preset's value);
* bool fields -> ``--x`` / ``--no-x`` (``argparse.BooleanOptionalAction``), plus the
  field's ``false_flag`` where it has one;
* fields with ``choices`` (the tuples :class:`TrainConfig` validates against) get them;
* flags of settings that were renamed (:data:`RENAMED`) exit with status 2 and say what
  to type instead (``--euclidean`` is now ``--distance l2``).

Flags left off the command line are absent from the parsed namespace
(``argparse.SUPPRESS``), so :func:`given_values` returns exactly what was typed and a
program can put it on top of a preset (a dict of field values) and the defaults::

    parser = argparse.ArgumentParser()
    flags.add_config_arguments(parser)
    args = parser.parse_args(argv)
    config = TrainConfig(**(PRESETS[name] | flags.given_values(args)))
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Collection
from typing import Any

from jaxmetric.train.config import TrainConfig

__all__ = ["add_config_arguments", "flag_name", "given_values", "parse_optional"]

NONE_WORD = "none"


def flag_name(field: str) -> str:
    """``"embed_dim"`` -> ``"--embed-dim"``."""
    return "--" + field.replace("_", "-")


def parse_optional(convert):
    """An argparse ``type`` that reads :data:`NONE_WORD` as None, else ``convert(text)``."""

    def parse(text: str):
        return None if text.strip().lower() == NONE_WORD else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names it in errors
    return parse


def _base_type(annotation) -> tuple[type, bool]:
    """``int | None`` -> ``(int, True)``; ``float`` -> ``(float, False)``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported config field type {annotation}")
        return args[0], True
    return annotation, False


def _help(field: dataclasses.Field, required: bool) -> str:
    text = field.metadata.get("help", "")
    default = field.default
    if required:
        shown = "required, unless a preset sets it"
    elif default is None:
        shown = f"default: {NONE_WORD}"
    elif isinstance(default, bool):
        shown = "default: " + ("yes" if default else "no")
    else:
        shown = f"default: {default}"
    text = f"{text} ({shown})" if text else shown
    return text.replace("%", "%%")  # argparse %-formats help strings


def add_config_arguments(parser, config_cls: type = TrainConfig, *,
                         required: Collection[str] = (),
                         fields: Collection[str] | None = None) -> None:
    """Add one flag per field of the dataclass ``config_cls`` (or of the ``fields``
    named) to ``parser`` (a parser or an argument group). The flags store into
    ``dest=<field name>`` and have no default: see :func:`given_values`. ``required``
    names fields the program insists on (from the command line or a preset; it checks
    that itself): their help says so instead of showing the default. A field's metadata
    may spell its flag (``flag="--data-dir"``) and say how the text becomes its value
    (``convert``, a function raising ``ValueError``)."""
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        if fields is not None and field.name not in fields:
            continue
        if "convert" in field.metadata:  # the field says how its text becomes a value
            kind, optional = None, type(None) in typing.get_args(hints[field.name])
        else:
            kind, optional = _base_type(hints[field.name])
        flag = field.metadata.get("flag", flag_name(field.name))
        common = dict(dest=field.name, default=argparse.SUPPRESS,
                      help=_help(field, field.name in required))
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
            false_flag = field.metadata.get("false_flag")
            if false_flag:
                parser.add_argument(false_flag, action="store_false", dest=field.name,
                                    default=argparse.SUPPRESS,
                                    help=f"the same as --no-{flag[2:]}")
            continue
        convert = field.metadata.get("convert", kind)
        if convert not in (int, float, str) and "convert" not in field.metadata:
            raise TypeError(f"{config_cls.__name__}.{field.name}: no flag for type {kind}")
        convert = parse_optional(convert) if optional else convert
        choices = field.metadata.get("choices")
        extra: dict[str, Any] = {}
        if choices is not None:
            extra["choices"] = (*choices, None) if optional else tuple(choices)
            shown = ",".join(map(str, choices)) + (f",{NONE_WORD}" if optional else "")
            extra["metavar"] = "{" + shown + "}"
        else:
            extra["metavar"] = field.metadata.get("metavar", field.name.upper())
            if optional:
                extra["metavar"] += f"|{NONE_WORD}"
        parser.add_argument(flag, type=convert, **extra, **common)
    taken = set(getattr(parser, "_option_string_actions", {}))
    for old in RENAMED:
        if old not in taken:
            parser.add_argument(old, action=_Renamed, dest="renamed_flag")


RENAMED = {
    "--euclidean": "--distance l2",
    "--no-squared": "--distance l2",
    "--squared": "--distance squared_l2",
}
"""Flags of earlier versions and what to type instead."""


class _Renamed(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is now {RENAMED[option_string]}")


def given_values(args: argparse.Namespace, config_cls: type = TrainConfig) -> dict[str, Any]:
    """The config fields set on the command line (flags that were not typed are absent)."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    return {k: v for k, v in vars(args).items() if k in names}
