"""Dataclass <-> plain dict <-> TOML, strict about unknown keys (they are named in the error)."""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import tomli_w

from .errors import ConfigError

C = TypeVar("C")


#: TOML has no null: a setting that is None where its default is not (e.g. ``refit.holdout_bic_switch``, "never")
#: is written as this text, and read back as None for any setting that may be None
NONE = "none"


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as a TOML-ready dict: tuples become lists; None values are left out, or written as ``"none"``
    where the default is not None (leaving them out would read back as the default)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            if _default(f) is not None:
                out[f.name] = NONE
            continue
        out[f.name] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return value.item()
    return value


def from_dict(cls: type[C], data: dict[str, Any], where: str = "") -> C:
    """Build dataclass ``cls`` from ``data``; unknown keys raise ValueError naming them and the valid ones."""
    if not isinstance(data, dict):
        raise ConfigError(f"[{where or cls.__name__}] must be a table, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        section = f"[{where}] " if where else ""
        raise ConfigError(
            f"{section}unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        hint = hints.get(name, Any)
        unset_by_text = type(None) in typing.get_args(hint) and _default(fields[name]) is not None
        if unset_by_text and value == NONE and not _fits(hint, value):
            kwargs[name] = None
            continue
        check_type(hint, value, key, unset_by_text)
        kwargs[name] = _coerce(hint, value, key)
    return cls(**kwargs)


def _describe(hint: Any, unset_by_text: bool = False) -> str:
    """A type hint in words, for error messages (unset_by_text: None is written "none", not left out)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        unset = f' (or "{NONE}" to unset it)' if unset_by_text else " (or leave it out)"
        return " or ".join(_describe(a) for a in args if a is not type(None)) + (unset if type(None) in args else "")
    if origin in (list, tuple):
        plural = {int: "whole numbers", float: "finite numbers", str: "texts (in quotes)"}
        return f"a list of {plural.get(args[0], _describe(args[0])) if args else 'values'}"
    if origin is dict or hint is dict:
        return "a table"
    if dataclasses.is_dataclass(hint):
        return "a table"
    return {int: "a whole number", float: "a finite number", str: "text (in quotes)", bool: "true or false"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def _fits(hint: Any, value: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(a, value) for a in args)
    if hint is type(None):
        return value is None
    if dataclasses.is_dataclass(hint):
        return isinstance(value, dict)
    if origin in (list, tuple):
        item = args[0] if args else Any
        return isinstance(value, (list, tuple)) and all(_fits(item, v) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def check_type(hint: Any, value: Any, key: str, unset_by_text: bool = False) -> None:
    """Raise ConfigError naming ``key``, the value and the type expected, when ``value`` is not a ``hint``
    (numbers must be finite; a table where a value belongs is refused)."""
    if not _fits(hint, value):
        got = "a table" if isinstance(value, dict) else f"{value!r}"
        raise ConfigError(f"{key} must be {_describe(hint, unset_by_text)}; got {got}", key=key)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is type(None):
                continue
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                return from_dict(arg, value, where)
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _coerce(non_none[0], value, where)
        return tuple(value) if isinstance(value, list) and any(typing.get_origin(a) is tuple for a in non_none) else value
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def write_toml(data: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(tomli_w.dumps(data), encoding="utf-8")


def read_toml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc}); see docs/configuration.md for the format",
                          file=path) from None
