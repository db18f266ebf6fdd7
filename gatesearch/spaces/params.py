"""Parameters of the joint space and the domains a search gives them.

A ``Param`` says what values are *legal* (type, bounds, allowed choices); a
``Domain`` says what a search *samples* (a fixed value, a list of choices or a
range). YAML values map onto domains: a scalar is fixed, a list is a choice and
a mapping ``{low, high, log}`` is a range.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


class SpaceError(ValueError):
    """Invalid search space; the message is one line that names the key."""


@dataclass(frozen=True)
class Fixed:
    value: Any

    def suggest(self, trial, name: str) -> Any:
        return self.value

    def example(self) -> Any:
        """One legal value (what a check or a test builds the gate with)."""
        return self.value

    def holds(self, value: Any) -> bool:
        """Whether a search over this domain can produce ``value``."""
        return value == self.value

    @property
    def sampled(self) -> bool:
        """Whether ``suggest`` asks the Optuna trial (a fixed value is not recorded as a parameter)."""
        return False

    def to_yaml(self) -> Any:
        return self.value


@dataclass(frozen=True)
class Choice:
    values: tuple

    def suggest(self, trial, name: str) -> Any:
        if len(self.values) == 1:
            return self.values[0]
        return trial.suggest_categorical(name, list(self.values))

    def example(self) -> Any:
        return self.values[0]

    def holds(self, value: Any) -> bool:
        return value in self.values

    @property
    def sampled(self) -> bool:
        return len(self.values) > 1

    def to_yaml(self) -> Any:
        return list(self.values)


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    log: bool = False
    integer: bool = False

    def suggest(self, trial, name: str) -> Any:
        if self.integer:
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(name, self.low, self.high, log=self.log)

    def example(self) -> Any:
        return int(self.low) if self.integer else self.low

    def holds(self, value: Any) -> bool:
        return self.low <= value <= self.high and (not self.integer or value == int(value))

    @property
    def sampled(self) -> bool:
        return True

    def to_yaml(self) -> Any:
        return {"low": self.low, "high": self.high, "log": self.log}


Domain = Fixed | Choice | Range


@dataclass(frozen=True, kw_only=True)
class Param:
    """A legal parameter: its type, hard bounds or allowed values, a doc line, and what a search samples when
    the YAML does not say (for a gate's option: the value it keeps)."""

    name: str
    kind: type  # int, float, str or bool
    doc: str
    low: float | None = None  # inclusive hard bounds for numbers
    high: float | None = None
    low_open: bool = False  # True: low itself is not allowed (e.g. lr > 0)
    choices: Sequence[Any] | None = None  # the only allowed values, when finite
    default: Any = None  # default domain in YAML form (a value, a list or {low, high, log}); None: none
    one_per_search: str | None = None  # why one search cannot sample several values (None: it can)

    def check(self, value: Any, where: str) -> Any:
        """Return ``value`` coerced to the parameter's type or raise SpaceError."""
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if self.kind is bool:
            if not isinstance(value, bool):
                raise SpaceError(f"{where}: expected true or false, got {value!r}")
        elif not isinstance(value, self.kind) or isinstance(value, bool):
            raise SpaceError(f"{where}: expected {self.kind.__name__}, got {value!r}")
        if self.kind is float and not math.isfinite(value):
            raise SpaceError(f"{where}: must be finite, got {value!r}")
        if self.choices is not None and value not in self.choices:
            allowed = ", ".join(map(str, self.choices))
            raise SpaceError(f"{where}: {value!r} is not one of {allowed}")
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            op = ">" if self.low_open else ">="
            raise SpaceError(f"{where}: must be {op} {self.low}, got {value!r}")
        if self.high is not None and value > self.high:
            raise SpaceError(f"{where}: must be <= {self.high}, got {value!r}")
        return value

    def domain(self, raw: Any, where: str) -> Domain:
        """Parse a YAML value (scalar, list or {low, high, log}) into a checked domain."""
        if isinstance(raw, list):
            if not raw:
                raise SpaceError(f"{where}: empty list")
            values = tuple(self.check(v, f"{where}[{i}]") for i, v in enumerate(raw))
            if len(set(values)) != len(values):
                raise SpaceError(f"{where}: repeated values in {list(values)}")
            return Choice(values)
        if isinstance(raw, dict):
            if self.kind is str or self.choices is not None:
                raise SpaceError(f"{where}: takes a value or a list of values, not a range")
            unknown = set(raw) - {"low", "high", "log"}
            if unknown:
                raise SpaceError(f"{where}: unknown range key {sorted(unknown)[0]!r} (use low, high, log)")
            if "low" not in raw or "high" not in raw:
                raise SpaceError(f"{where}: a range needs both low and high")
            low = self.check(raw["low"], f"{where}.low")
            high = self.check(raw["high"], f"{where}.high")
            log = raw.get("log", False)
            if not isinstance(log, bool):
                raise SpaceError(f"{where}.log: expected true or false, got {log!r}")
            if low > high:
                raise SpaceError(f"{where}: low {low} is greater than high {high}")
            if log and low <= 0:
                raise SpaceError(f"{where}: a log range needs low > 0, got {low}")
            return Range(low, high, log=log, integer=self.kind is int)
        return Fixed(self.check(raw, where))

    def search_domain(self, raw: Any, where: str) -> Domain:
        """``domain``, refusing more than one value for a parameter that must stay fixed within a search."""
        dom = self.domain(raw, where)
        if self.one_per_search and not isinstance(dom, Fixed):
            which = "true or false, not both" if self.kind is bool else "one value, not several"
            raise SpaceError(f"{where}: {which} ({self.one_per_search}); run one search per setting")
        return dom
