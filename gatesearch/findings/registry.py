"""What a finding is: the registry of the experiments a fidelity report re-runs, and what each one returns.

A finding is one module holding one function ``run(ctx) -> Finding``, registered with
``@register_finding(key, number=..., title=..., source=...)``. It measures what a paper reports and states, per
claim, the paper's number, ours and a verdict. The verdict is computed from the numbers by a rule the finding
states (``Claim.rule``); a claim that does not hold is reported as such, never dropped: the report is a
measurement, not a test. ``requires`` names findings whose models this one times or reuses (finding 7 times the
gated models findings 2, 5 and 6 trained), so they run first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gatesearch.registry import Registry

REPRODUCED, NOT_REPRODUCED = "reproduced", "not reproduced"


@dataclass(frozen=True, kw_only=True)
class Claim:
    """One line of the report."""

    statement: str  # what the paper finds, in one line
    paper: str  # the paper's number(s), with the table they come from
    ours: str  # our number(s), formatted
    reproduced: bool
    rule: str = ""  # how the verdict follows from our numbers (shown under the finding)

    @property
    def verdict(self) -> str:
        return REPRODUCED if self.reproduced else NOT_REPRODUCED


@dataclass(frozen=True, kw_only=True)
class Finding:
    """What one finding measured."""

    claims: tuple[Claim, ...]
    numbers: dict[str, float]  # every measured figure by name (the JSON report, MLflow metrics)
    setup: str  # what was run: network, sizes, seeds, sweeps
    details: str = ""  # Markdown tables of the measurements
    plots: tuple[str, ...] = ()  # PNG file names in the report folder


@dataclass(frozen=True, kw_only=True)
class FindingSpec:
    key: str
    number: int  # the finding's number in issue 20 (the report's order)
    title: str
    source: str  # paper and table / figure
    run: Callable[[Any], Finding]  # run(ctx: runner.Context) -> Finding
    requires: tuple[str, ...] = field(default=())


FINDINGS: Registry[FindingSpec] = Registry(
    "finding",
    "Contract: each entry is a FindingSpec whose run(ctx) returns a Finding with at least one Claim and its "
    "numbers; registered by @register_finding in a module of gatesearch.findings.",
)


def register_finding(key: str, *, number: int, title: str, source: str, requires: tuple[str, ...] = ()):
    """``@register_finding("gate_fronts", number=2, ...)`` on a finding's ``run(ctx)``."""

    def deco(fn: Callable[[Any], Finding]) -> Callable[[Any], Finding]:
        FINDINGS.register(key)(FindingSpec(key=key, number=number, title=title, source=source, run=fn,
                                           requires=requires))
        return fn

    return deco


def ordered(keys: list[str] | None = None) -> list[FindingSpec]:
    """The findings to run, by number: ``keys`` (None: all) and whatever they require."""
    wanted = set(FINDINGS) if not keys else set()
    todo = list(keys or [])
    while todo:
        key = todo.pop()
        if key not in wanted:
            wanted.add(key)
            todo.extend(FINDINGS.get(key).requires)  # an unknown key: the registry's one-line error
    return sorted((FINDINGS.get(k) for k in wanted), key=lambda s: s.number)


__all__ = ["FINDINGS", "NOT_REPRODUCED", "REPRODUCED", "Claim", "Finding", "FindingSpec", "ordered",
           "register_finding"]
