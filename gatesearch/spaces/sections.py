"""A YAML mapping read into a frozen dataclass: the one place a config section's keys and value types are checked.

Every section of a search YAML (``data``, ``evaluation``, ``model.train``, ``early_stopping``, ...) is a typed
frozen dataclass; its field annotations are the schema, so an unknown key or a value of the wrong type gets the
same one-line error wherever it is written.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

from .params import SpaceError

_NAMES = {bool: "true or false", int: "int", float: "float", str: "str", dict: "a mapping", list: "a list"}


def typed(value: Any, hint: Any, where: str) -> Any:
    """``value`` as a field annotated ``hint`` holds it (an int where a float is expected is widened)."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    kinds = [typing.get_origin(k) or k for k in (typing.get_args(hint) if union else (hint,))]
    if value is None and type(None) in kinds:
        return None
    for kind in kinds:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, kind) and (kind is bool) == isinstance(value, bool):
            return value
    expected = " or ".join(_NAMES.get(k, k.__name__) for k in kinds if k is not type(None))
    raise SpaceError(f"{where}: expected {expected}, got {value!r}")


def at_least(value: Any, minimum: float, where: str) -> Any:
    if value < minimum:
        raise SpaceError(f"{where}: must be >= {minimum}, got {value!r}")
    return value


def section(cls: type, raw: Any, where: str, *, minimum: Mapping[str, float] | None = None) -> Any:
    """``cls`` from the mapping ``raw`` (None: the defaults); ``minimum`` bounds numeric fields from below."""
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise SpaceError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        if key not in names:
            raise SpaceError(f"{where}.{key}: unknown key; known: {', '.join(names)}")
        values[key] = typed(value, hints[key], f"{where}.{key}")
        if minimum and key in minimum and values[key] is not None:
            at_least(values[key], minimum[key], f"{where}.{key}")
    return cls(**values)


__all__ = ["at_least", "section", "typed"]
