"""spaces.sections: one schema check for every YAML section (field annotations are the schema)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from gatesearch.spaces.params import SpaceError
from gatesearch.spaces.sections import section


@dataclass(frozen=True, kw_only=True)
class Example:
    count: int = 1
    rate: float = 0.5
    name: str | None = None
    every: int | str = "clip_length"
    flag: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def test_values_are_typed_and_ints_widen_to_floats():
    got = section(Example, {"count": 3, "rate": 2, "name": None, "every": 4, "flag": True, "extra": {"a": 1}}, "ex")
    assert got == Example(count=3, rate=2.0, name=None, every=4, flag=True, extra={"a": 1})
    assert isinstance(got.rate, float)
    assert section(Example, None, "ex") == Example()


@pytest.mark.parametrize(("raw", "message"), [
    ([1], "^ex: expected a mapping, got list$"),
    ({"cont": 1}, "^ex.cont: unknown key; known: count, rate, name, every, flag, extra$"),
    ({"count": True}, "^ex.count: expected int, got True$"),
    ({"count": 1.5}, "^ex.count: expected int, got 1.5$"),
    ({"rate": "5e6"}, "^ex.rate: expected float, got '5e6'$"),
    ({"name": 3}, "^ex.name: expected str, got 3$"),
    ({"every": 1.0}, "^ex.every: expected int or str, got 1.0$"),
    ({"flag": 1}, "^ex.flag: expected true or false, got 1$"),
    ({"extra": [1]}, r"^ex.extra: expected a mapping, got \[1\]$"),
    ({"count": 0}, "^ex.count: must be >= 1, got 0$"),
])
def test_bad_values_get_one_line_naming_the_key(raw, message):
    with pytest.raises(SpaceError, match=message):
        section(Example, raw, "ex", minimum={"count": 1})
