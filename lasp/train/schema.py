"""Strict mapping of nested dicts (parsed YAML) onto typed dataclasses.

Every problem is collected, never just the first: an unknown key (with a close match suggested), a
wrong type, a number that is not finite (nan, inf: no field of any config takes one), a section that is
not a mapping. Each problem names its YAML path (`optim.lr`) and the value.
"""

import dataclasses
import difflib
import math
import types
import typing
from typing import Any

import yaml

from lasp.model.config import matches_type, type_name


def _finite_as_float(value: int) -> bool:
    """An int a float field can hold: 10**400 is past a float's range."""
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _float_field(tp) -> bool:
    """A field of type float or float | None."""
    return tp is float or float in typing.get_args(tp)


def _yaml11_float(value, tp):
    """YAML 1.1 (PyYAML) reads `3e-4` as a string (it wants `3.0e-4`); for a float field, take it as
    the number everyone means."""
    if isinstance(value, str) and _float_field(tp):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _optional_dataclass(tp):
    """D for a field typed `D | None` with D a dataclass (an optional section, absent = None), else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            return inner[0]
    return None


def build(cls, data: Any, path: str, problems: list[str]):
    """An instance of dataclass `cls` from `data` (a dict), defaults for missing keys. Problems are
    appended to `problems` (the returned object then holds defaults where values were wrong). A ValueError
    from the class's own checks (`__post_init__`) is recorded line by line and None is returned; so is None
    when a nested section failed (the class's own checks still ran, on that section's default)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{path}: expected a mapping of keys, got {type(data).__name__} {data!r}")
        data = {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs, failed = {}, set()
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(fields)})"
            problems.append(f"{where}: unknown key{hint}")
            continue
        tp = hints[key]
        value = _yaml11_float(value, tp)
        inner = _optional_dataclass(tp)
        if dataclasses.is_dataclass(tp) or (inner is not None and isinstance(value, dict)):
            kwargs[key] = built = build(inner or tp, value, where, problems)
            if built is None:
                failed.add(key)
        elif isinstance(value, float) and not math.isfinite(value) and matches_type(value, tp):
            problems.append(f"{where}: {value} is not a finite number")
        elif matches_type(value, tp) and _float_field(tp) and isinstance(value, int) and not _finite_as_float(value):
            problems.append(f"{where}: {value} is not a finite number (beyond a float's range)")
        elif matches_type(value, tp):
            kwargs[key] = float(value) if tp is float else value
        else:
            problems.append(f"{where}: expected {type_name(tp)}, got {type(value).__name__} {value!r}")
    for name, f in fields.items():
        if name not in kwargs and dataclasses.is_dataclass(hints[name]):
            kwargs[name] = build(hints[name], {}, f"{path}.{name}" if path else name, problems)
            if kwargs[name] is None:
                failed.add(name)
    try:  # a failed section at its default: the class's own checks of the rest still report
        built = cls(**{k: v for k, v in kwargs.items() if k not in failed})
    except ValueError as e:
        lines = str(e).splitlines()
        problems.extend(line.strip() for line in (lines[1:] if len(lines) > 1 else lines) if line.strip())
        return None
    return None if failed else built


def apply_overrides(data: dict, overrides: list[str], problems: list[str]) -> dict:
    """`a.b=value` strings set into the nested dict; values are parsed as YAML scalars (`3e-4`, `true`)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"--set {item!r}: expected KEY=VALUE, e.g. --set optim.lr=3e-4")
            continue
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            problems.append(f"--set {item!r}: the value is not a YAML scalar ({e})")
            continue
        node, parts = data, key.strip().split(".")
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                problems.append(f"--set {item!r}: {part} is not a section")
                break
            node = node[part]
        else:
            node[parts[-1]] = value
    return data
