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
import math
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


def nested(cls: type, overrides: dict[str, Any] | None = None, owned: tuple[str, ...] = ()):
    """A field holding a ``cls`` config inside another command's config (composition).

    ``overrides`` are the command's visible default changes; ``owned`` names the fields the
    command sets itself (they get no flag and may not be given in a config file). The nested
    fields appear as the same flat flags as in their own command.
    """
    overrides = dict(overrides or {})
    return dataclasses.field(
        default_factory=lambda: cls(**overrides),
        metadata={"nested": cls, "overrides": overrides, "owned": tuple(owned)},
    )


def _nested_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if "nested" in f.metadata}


def flag_fields(cls: type) -> dict[str, tuple[dataclasses.Field, type, Any]]:
    """Every flat flag of ``cls``: name -> (field, owning class, default shown).

    Nested configs contribute their fields (minus the owned ones) with the parent's overrides
    as defaults. A name declared both in the parent and in a nested config is a bug.
    """
    out: dict[str, tuple[dataclasses.Field, type, Any]] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if "nested" in f.metadata:
            sub, base = f.metadata["nested"], f.default_factory()
            for g in dataclasses.fields(sub):
                if g.init and g.name not in f.metadata["owned"]:
                    if g.name in out:
                        raise TypeError(f"{cls.__name__}: field {g.name!r} declared twice")
                    out[g.name] = (g, sub, getattr(base, g.name))
            continue
        if f.name in out:
            raise TypeError(f"{cls.__name__}: field {f.name!r} declared twice")
        default = f.default if f.default is not dataclasses.MISSING else None
        out[f.name] = (f, cls, default)
    return out


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per (flattened) field of ``cls``; defaults stay ``None`` so explicit flags
    can be told apart from the config file and the dataclass defaults."""
    for name, (f, owner, default) in flag_fields(cls).items():
        tp, _ = _base_type(typing.get_type_hints(owner)[name])
        help_text = f.metadata.get("help", "")
        if default is not None and default != "" and default != []:
            help_text = f"{help_text} (default: {default})"
        choices = f.metadata.get("choices")
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": help_text}
        if tp is bool:
            parser.add_argument(flag(name), action=argparse.BooleanOptionalAction, **kwargs)
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
        parser.add_argument(flag(name), **kwargs)


def dataclass_from_dict(cls: type[T], values: dict[str, Any], where: str = "config") -> T:
    """Build ``cls`` from a plain dict, refusing unknown keys with the list of known ones.

    Keys of a nested config may be given flat (``lr: 1e-3``) or as a section named after the
    field (``train: {lr: 1e-3}``); flat keys win over the section's.
    """
    norm = {k.replace("-", "_"): v for k, v in values.items()}
    nested_fields = _nested_fields(cls)
    own = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {n: {} for n in nested_fields}
    flat: dict[str, dict[str, Any]] = {n: {} for n in nested_fields}
    unknown = []
    for key, value in norm.items():
        if key in nested_fields:
            if isinstance(value, dict):
                sections[key].update({k.replace("-", "_"): v for k, v in value.items()})
            elif isinstance(value, nested_fields[key].metadata["nested"]):
                kwargs[key] = value
            else:
                raise ConfigError(f"{where}: '{key}' must be a mapping of settings")
        elif key in own:
            kwargs[key] = value
        else:
            owner = next(
                (n for n, f in nested_fields.items() if key in _init_names(f.metadata["nested"])),
                None,
            )
            if owner is None:
                unknown.append(key)
            else:
                flat[owner][key] = value
    if unknown:
        known = sorted((own - set(nested_fields)) | set(flag_fields(cls)))
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in {where}; known keys: {known}")
    for name, f in nested_fields.items():
        given = {**sections[name], **flat[name]}
        owned = sorted(set(given) & set(f.metadata["owned"]))
        if owned:
            raise ConfigError(f"{where}: {owned} may not be set here: the command sets them itself")
        if given or name not in kwargs:
            base = kwargs.get(name) or f.default_factory()
            kwargs[name] = _replace(base, given, where)
    return cls(**kwargs)


def _init_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def _replace(obj: Any, changes: dict[str, Any], where: str) -> Any:
    unknown = sorted(set(changes) - _init_names(type(obj)))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}")
    return dataclasses.replace(obj, **changes) if changes else obj


def dataclass_from_args(
    cls: type[T], ns: argparse.Namespace, base: dict[str, Any] | None = None
) -> T:
    """Instance of ``cls`` from parsed flags layered over ``base`` (e.g. a YAML file)."""
    values = dict(base or {})
    for name in flag_fields(cls):
        v = getattr(ns, name, None)
        if v is not None:
            values[name] = v
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
    """JSON/YAML-safe dict of a dataclass (paths become strings; nested configs are sections
    without the fields the command sets itself), loadable again as ``--config``."""
    out = json.loads(json.dumps(dataclasses.asdict(obj), default=str))
    for name, f in _nested_fields(type(obj)).items():
        for owned in f.metadata["owned"]:
            out[name].pop(owned, None)
    return out


def flat_dict(obj: Any) -> dict[str, Any]:
    """:func:`to_dict` with nested configs' fields lifted to the top level (as the flags are)."""
    out = to_dict(obj)
    for name in _nested_fields(type(obj)):
        out.update(out.pop(name))
    return out


def save_resolved(obj: Any, path: str | Path) -> None:
    """Write the resolved config next to an output so any artifact can be reproduced."""
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))


def check_unit_interval(name: str, value: float) -> None:
    """Raise unless 0 < value <= 1."""
    if not (0.0 < float(value) <= 1.0):
        raise ConfigError(f"{flag(name)} must be in (0, 1], got {value}")


MAX_INT = 2**53  # larger integers lose exactness as floats and overflow numpy/torch indices


def validate_numbers(obj: Any) -> None:
    """The one numeric check every config runs first in ``__post_init__``.

    Every int/float field must hold a number of its declared type (YAML can hold anything),
    finite, at most ``MAX_INT`` in size, and within the field's bounds: ``metadata["min"]``
    (default 0: no setting of ours is negative unless it says so) and ``metadata["max"]``.
    The message names the flag. Range rules that involve two fields stay in the config.
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        tp, optional = _base_type(hints[f.name])
        if tp not in (int, float):
            continue
        value = getattr(obj, f.name)
        if value is None and optional:
            continue
        if not isinstance(value, int | float) or isinstance(value, bool):
            kind = "an integer" if tp is int else "a number"
            raise ConfigError(f"{flag(f.name)} must be {kind}, got {value!r}")
        if (isinstance(value, float) and not math.isfinite(value)) or abs(value) > MAX_INT:
            raise ConfigError(f"{flag(f.name)} must be a finite number of sane size, got {value}")
        if tp is int:
            if not float(value).is_integer():
                raise ConfigError(f"{flag(f.name)} must be an integer, got {value!r}")
            setattr(obj, f.name, int(value))
        low, high = f.metadata.get("min", 0), f.metadata.get("max")
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise ConfigError(f"{flag(f.name)} must be {bound}, got {value}")


def check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{flag(name)} must be {bound}, got {value}")


def build(cls: type[T], **values: Any) -> T:
    """``cls`` from keyword values given as the flags are (nested configs' fields flat)."""
    return dataclass_from_dict(cls, values, where=cls.__name__)
