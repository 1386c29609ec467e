"""Config values as text and JSON: parse a `--set` string against a field's type, check a JSON
value, `to_dict` / `from_dict`, every settable key, and `apply_overrides`."""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from typing import Any, Literal

from plad_jax.config.schema import Config
from plad_jax.errors import ConfigError

# ----------------------------------------------------------------------------------------------
# Types: describe, parse a `--set` string, check a JSON value


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _optional_inner(hint):
    """X for Optional[X] / X | None, else None."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0]
    return None


def _sequence_item(hint):
    """The item type of tuple[X, ...] / list[X], else None."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return args[0]
    if origin is list and len(args) == 1:
        return args[0]
    return None


def describe(hint) -> str:
    """The type as a user reads it in an error message."""
    if (inner := _optional_inner(hint)) is not None:
        return f"{describe(inner)} or none"
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(str(c) for c in typing.get_args(hint))
    if (item := _sequence_item(hint)) is not None:
        return (
            "a comma-separated list (or JSON list) of "
            f"{describe(item).removeprefix('a ').removeprefix('an ')}s"
        )
    if dataclasses.is_dataclass(hint):
        return f"a {hint.__name__} (JSON object)"
    if hint is dict or typing.get_origin(hint) is dict:
        return "a JSON object"
    return {
        int: "an integer",
        float: "a number",
        bool: "a boolean (true/false/1/0)",
        str: "a string",
    }.get(hint, str(hint))


class _BadValue(Exception):
    """Internal: the value does not fit the type; turned into a ConfigError naming the key."""


_TRUE, _FALSE = ("true", "1"), ("false", "0")


def parse_value(raw: str, hint, key: str):
    """A `--set` string as a value of type `hint`; ConfigError naming key, type and value if not."""
    try:
        return _parse(raw, hint, key)
    except _BadValue:
        raise ConfigError(f"{key} expects {describe(hint)}, got {raw!r}") from None


def _parse(raw: str, hint, key: str):
    text = raw.strip()
    if (inner := _optional_inner(hint)) is not None:
        return None if text.lower() in ("none", "null") else _parse(raw, inner, key)
    if typing.get_origin(hint) is Literal:
        for choice in typing.get_args(hint):
            if text == str(choice):
                return choice
        raise _BadValue
    if (item := _sequence_item(hint)) is not None:
        if text.startswith("["):
            return _check(_json(text), hint, key)
        values = [_parse(part.strip(), item, key) for part in text.split(",") if part.strip()]
        return tuple(values) if typing.get_origin(hint) is tuple else values
    if dataclasses.is_dataclass(hint) or hint is dict or typing.get_origin(hint) is dict:
        return _check(_json(text), hint, key)
    if hint is bool:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise _BadValue
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise _BadValue from None
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise _BadValue from None
    if hint is str:
        return raw
    raise TypeError(f"{key}: unsupported field type {hint}")  # a bug in the tree, not user input


def _json(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise _BadValue from None


def check_value(value, hint, key: str):
    """A JSON-decoded (or Python) value checked against `hint`, normalised (lists -> tuples,
    ints -> floats, dicts -> dataclasses); ConfigError naming key, type and value if it does not
    fit."""
    try:
        return _check(value, hint, key)
    except _BadValue:
        raise ConfigError(f"{key} expects {describe(hint)}, got {value!r}") from None


def _check(value, hint, key: str):
    if (inner := _optional_inner(hint)) is not None:
        return None if value is None else _check(value, inner, key)
    if typing.get_origin(hint) is Literal:
        if value in typing.get_args(hint) and not isinstance(value, bool):
            return value
        raise _BadValue
    if (item := _sequence_item(hint)) is not None:
        if not isinstance(value, (list, tuple)):
            raise _BadValue
        values = [_check(v, item, key) for v in value]
        return tuple(values) if typing.get_origin(hint) is tuple else values
    if dataclasses.is_dataclass(hint):
        if dataclasses.is_dataclass(value) and isinstance(value, hint):
            value = to_dict(value)
        if not isinstance(value, dict):
            raise _BadValue
        return _from_dict(hint, value, f"{key}." if key else "")
    if hint is dict or typing.get_origin(hint) is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise _BadValue
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _BadValue
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _BadValue
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _BadValue
    if hint is str:
        if isinstance(value, str):
            return value
        raise _BadValue
    raise TypeError(f"{key}: unsupported field type {hint}")


# ----------------------------------------------------------------------------------------------
# Dicts (JSON) <-> Config


def to_dict(obj) -> Any:
    """The tree as plain JSON-able values: dataclasses -> dicts, tuples -> lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def from_dict(data: dict, cls=Config):
    """A `cls` from `to_dict` output; missing keys take their defaults, unknown keys are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a JSON object, got {type(data).__name__}")
    return _from_dict(cls, data, "")


def _from_dict(cls, data: dict, prefix: str):
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise ConfigError(_unknown_key_message(key))
        values[name] = check_value(value, hints[name], key)
    return cls(**values)


def leaf_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every dotted key `--set` accepts (sections included), e.g. 'distill.method',
    'student.lora'."""
    keys = []
    for f in dataclasses.fields(cls):
        key, hint = f"{prefix}{f.name}", _hints(cls)[f.name]
        keys.append(key)
        inner = _optional_inner(hint) or hint
        if dataclasses.is_dataclass(inner):
            keys.extend(leaf_keys(inner, key + "."))
    return keys


def _unknown_key_message(key: str) -> str:
    """'unknown config key ...' with the closest valid keys (difflib), or the section's keys."""
    valid = leaf_keys()
    section, _, leaf = key.rpartition(".")
    if section and section not in valid:  # the section itself is misspelt: match whole keys
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.75)
        section, siblings = "", [k for k in valid if "." not in k]
    else:
        siblings = [k.rpartition(".")[2] for k in valid if k.rpartition(".")[0] == section]
        close = [
            f"{section}.{c}" if section else c
            for c in difflib.get_close_matches(leaf, siblings, n=2, cutoff=0.6)
        ]
    if close:
        return f"unknown config key '{key}'; did you mean {' or '.join(close)}?"
    where = f"under '{section}'" if section else "at the top level"
    return f"unknown config key '{key}'; valid keys {where}: {', '.join(siblings)}"


# ----------------------------------------------------------------------------------------------
# Overrides


def apply_overrides(config: Config, overrides) -> Config:
    """`config` with each `a.b=value` applied in order, values parsed against the field types.

    Lists: `a,b` or JSON `["a", "b"]`; Optional: `none`/`null`; a whole section: JSON object.
    A dict field (`teacher.init`) takes a JSON object, or `teacher.init.key=value` sets one key
    (value read as JSON when it parses, else as a string). An Optional section that is None
    (`student.lora`) starts from its defaults when one of its fields is set.
    """
    for item in overrides:
        key, sep, raw = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value, e.g. distill.beta=0.5")
        config = _set(config, key.split("."), raw, key, "")
    return config


def _set(obj, parts: list[str], raw: str, full_key: str, prefix: str):
    name, rest = parts[0], parts[1:]
    key = prefix + name
    fields = {f.name for f in dataclasses.fields(obj)}
    if name not in fields:
        raise ConfigError(_unknown_key_message(full_key))
    hint = _hints(type(obj))[name]
    if not rest:
        return dataclasses.replace(obj, **{name: parse_value(raw, hint, key)})
    inner = _optional_inner(hint) or hint
    child = getattr(obj, name)
    if dataclasses.is_dataclass(inner):
        child = inner() if child is None else child
        return dataclasses.replace(obj, **{name: _set(child, rest, raw, full_key, key + ".")})
    if inner is dict or typing.get_origin(inner) is dict:
        return dataclasses.replace(obj, **{name: _set_in_dict(dict(child or {}), rest, raw)})
    raise ConfigError(f"unknown config key '{full_key}': {key} is {describe(hint)}, not a section")


def _set_in_dict(d: dict, parts: list[str], raw: str) -> dict:
    head, rest = parts[0], parts[1:]
    if rest:
        sub = d.get(head)
        d[head] = _set_in_dict(dict(sub) if isinstance(sub, dict) else {}, rest, raw)
    else:
        try:
            d[head] = json.loads(raw)
        except json.JSONDecodeError:
            d[head] = raw
    return d
