"""Typed, nested dataclasses from YAML mappings: every problem (unknown key, wrong type, bad value) is collected,
not the first one raised, and an unknown key is reported with the valid ones."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

import yaml


def apply_overrides(raw: dict, overrides: list[str], problems: list[str]) -> None:
    """Set ``section.key=value`` items (values parsed as YAML) in the mapping `raw`."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override {item!r} must look like section.key=value")
            continue
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            parsed = value
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = parsed


def build(cls: type, raw: Any, prefix: str, problems: list[str]):
    """Instantiate dataclass `cls` from `raw`, appending every problem found to `problems`."""
    where = prefix.rstrip(".") or "the top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{where} must be a mapping, got {type(raw).__name__} {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    for key in unknown:
        problems.append(f"unknown key {prefix}{key}; valid keys in {where}: {', '.join(fields)}")
    kwargs = {}
    for name, value in raw.items():
        if name not in fields:
            continue
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            kwargs[name] = build(typ, value, f"{prefix}{name}.", problems)
            continue
        item = (typing.get_args(typ) or [None])[0]
        if typing.get_origin(typ) is list and dataclasses.is_dataclass(item):
            if not isinstance(value, list):
                keys = ", ".join(f.name for f in dataclasses.fields(item))
                problems.append(f"{prefix}{name} must be a list of mappings ({keys}), got {value!r}")
                continue
            kwargs[name] = [build(item, v, f"{prefix}{name}[{i}].", problems) for i, v in enumerate(value)]
            continue
        ok, converted = check(typ, value)
        if ok:
            kwargs[name] = converted
        else:
            problems.append(f"{prefix}{name} must be {describe(typ)}, got {value!r}")
    return cls(**kwargs)


def check(typ: Any, value: Any) -> tuple[bool, Any]:
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            ok, v = check(arg, value)
            if ok:
                return True, v
        return False, None
    if typ is type(None):
        return value is None, None
    if origin is Literal:
        return value in args, value
    if origin is list:
        if isinstance(value, (str, int, float)) and args and args[0] is str:
            value = [str(value)]  # a single path is a list of one
        if not isinstance(value, list):
            return False, None
        out = []
        for v in value:
            ok, c = check(args[0], v)
            if not ok:
                return False, None
            out.append(c)
        return True, out
    if origin is dict:
        return isinstance(value, dict), value
    if typ is bool:
        return isinstance(value, bool), value
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):  # YAML reads 3e-4 as a string
            try:
                return True, float(value)
            except ValueError:
                return False, None
        return False, None
    if typ is str:
        return isinstance(value, str), value
    if typ is Any:
        return True, value
    raise TypeError(f"config type {typ} is not supported")


def describe(typ: Any) -> str:
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if typ is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return f"a list of {describe(args[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(typ, str(typ))
