"""Typed configuration plumbing shared by every subcommand.

Each concern (analysis, training, recipe, ...) owns one dataclass whose fields carry their help
text in ``field(metadata={"help": ...})``. This module turns such a dataclass into argparse
flags, back into an instance, and to and from YAML, so the CLI, the presets and the resolved
config written beside every output are the same object. Validation lives in each dataclass's
``__post_init__`` and raises :class:`ConfigError` naming the offending flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A user-facing configuration error; the message names the offending flag."""


def flag(name: str) -> str:
    """The CLI spelling of a dataclass field name."""
    return "--" + name.replace("_", "-")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """Unwrap ``X | None`` into (X, optional)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def add_dataclass_args(
    parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()
) -> None:
    """Add one flag per field of ``cls``; defaults stay ``None`` so explicit flags can be told apart."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        tp, _ = _base_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if default is not None and default != "":
            help_text = f"{help_text} (default: {default})"
        choices = f.metadata.get("choices")
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
        if tp is bool:
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if typing.get_origin(tp) in (list, tuple):
            (inner,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
            kwargs["type"] = lambda s, inner=inner: [inner(x) for x in s.split(",") if x]
        elif tp in (int, float, str):
            kwargs["type"] = tp
        else:
            kwargs["type"] = str
        if choices:
            kwargs["choices"] = choices
        parser.add_argument(flag(f.name), **kwargs)


def dataclass_from_dict(cls: type[T], values: dict[str, Any], where: str = "config") -> T:
    """Build ``cls`` from a plain dict, refusing unknown keys with the list of known ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    norm = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(norm) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; known keys: {sorted(names)}")
    return cls(**norm)


def dataclass_from_args(
    cls: type[T], ns: argparse.Namespace, base: dict[str, Any] | None = None
) -> T:
    """Instance of ``cls`` from parsed flags layered over ``base`` (e.g. a YAML file)."""
    values = dict(base or {})
    for f in dataclasses.fields(cls):
        v = getattr(ns, f.name, None)
        if v is not None:
            values[f.name] = v
    return dataclass_from_dict(cls, values)


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: no such file: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config: {p} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {p} must hold a mapping of keys to values")
    return data


def to_dict(obj: Any) -> dict[str, Any]:
    """JSON/YAML-safe dict of a dataclass (paths become strings)."""
    return json.loads(json.dumps(dataclasses.asdict(obj), default=str))


def save_resolved(obj: Any, path: str | Path) -> None:
    """Write the resolved config next to an output so any artifact can be reproduced."""
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))


def check_unit_interval(name: str, value: float) -> None:
    """Raise unless 0 < value <= 1."""
    if not (0.0 < float(value) <= 1.0):
        raise ConfigError(f"{flag(name)} must be in (0, 1], got {value}")


def check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{flag(name)} must be {bound}, got {value}")
