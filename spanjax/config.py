"""Typed experiment configs: YAML -> frozen nested dataclasses, dotted overrides.

    cfg = load(LocalityConfig, "configs/locality_nq.yaml", ["eval.num_docs=10", "model=smollm2-135m"])
    print(dump(cfg))

Supported field types: bool, int, float, str, Literal[...], X | None,
tuple[X, ...], and nested dataclasses (sections). A section given in the data
starts from its field's default value (`engine: EngineConfig =
EngineConfig(num_pages=4096)` keeps num_pages=4096 unless the file sets it),
and its class's own checks (`__post_init__`) run at load time: their
ValueErrors become ConfigErrors naming the section. Every value is checked against its
field's type; unknown keys, wrong types and bad override syntax raise
`ConfigError` naming the dotted key and what was expected, before anything
runs. Override values are parsed as YAML scalars/flow lists (`eval.positions=[0,4,9]`,
`x=null`) and then checked like file values, so `eval.num_docs=ten` fails
instead of silently becoming a string.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A config file or override the user can fix; the message names the key."""


# ---------------------------------------------------------------------------- type checking


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp, value, key: str):
    """`value` (plain YAML data) as type `tp`, or ConfigError naming `key`."""
    origin = typing.get_origin(tp)

    def bad(extra=""):
        return ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}{extra}")

    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad(" (a mapping of fields)")
        return _build(tp, value, key)
    if origin is Literal:
        if value not in typing.get_args(tp) or isinstance(value, bool) != any(
            isinstance(a, bool) for a in typing.get_args(tp)
        ):
            raise bad()
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad()
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key)
            except ConfigError:
                pass
        raise bad()
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"{key}: only tuple[X, ...] fields are supported")
        if not isinstance(value, (list, tuple)):
            raise bad(" (a list)")
        return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)  # YAML `1` for a float field is fine
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    raise TypeError(f"{key}: unsupported config field type {tp!r}")


def _default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f" in {prefix}" if prefix else ""
        raise ConfigError(f"unknown key {_join(prefix, unknown[0])!r}{where}; expected one of {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name in data:
            value, default = data[name], _default(f)
            if isinstance(value, dict) and dataclasses.is_dataclass(hints[name]) and isinstance(default, hints[name]):
                value = {**to_dict(default), **value}  # a section's missing keys keep the field's default
            kwargs[name] = _coerce(hints[name], value, key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {key!r} ({_type_name(hints[name])})")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # the dataclass's own __post_init__ checks
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from e


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# ---------------------------------------------------------------------------- public API


def from_dict(cls, data: dict):
    """Build config class `cls` from plain data, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping, got {type(data).__name__}")
    return _build(cls, data)


def to_dict(cfg) -> dict:
    """Plain data (tuples as lists), the inverse of from_dict."""

    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def dump(cfg) -> str:
    """The resolved config as YAML (field order kept), loadable by `load`."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a YAML mapping")
    return data


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """`a.b=value` -> (("a", "b"), parsed value); the value is a YAML scalar or flow list."""
    key, eq, raw = text.partition("=")
    key = key.strip()
    if not eq or not key or any(not part.isidentifier() for part in key.split(".")):
        raise ConfigError(f"bad override {text!r}: expected KEY=VALUE with a dotted key like eval.num_docs=10")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"bad override {text!r}: value is not a YAML scalar or list ({e})") from e
    return tuple(key.split(".")), value


def apply_overrides(data: dict, overrides) -> dict:
    """Plain config data with `a.b=c` overrides set (a copy; checked later by from_dict)."""
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"bad override {text!r}: {'.'.join(path[: i + 1])!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def override(cfg, overrides):
    """A new config: `cfg` with overrides applied and every value re-checked."""
    return from_dict(type(cfg), apply_overrides(to_dict(cfg), overrides))


def load(cls, path: str | Path, overrides=()):
    """Read a YAML preset into `cls`, apply dotted overrides, check types."""
    return from_dict(cls, apply_overrides(read_yaml(path), overrides))


def diff(a, b) -> list[str]:
    """Dotted keys whose values differ between two configs of the same class."""

    def walk(x, y, prefix):
        out = []
        for k in sorted(set(x) | set(y)):
            key = _join(prefix, k)
            vx, vy = x.get(k), y.get(k)
            if isinstance(vx, dict) and isinstance(vy, dict):
                out += walk(vx, vy, key)
            elif vx != vy:
                out.append(f"{key}: {vx!r} -> {vy!r}")
        return out

    return walk(to_dict(a) if not isinstance(a, dict) else a, to_dict(b) if not isinstance(b, dict) else b, "")
