"""How a search treats its two objectives beyond sampling them: early stopping, budgets, the reference point of
the hypervolume and where latency is measured. Each is a section of the search YAML, validated here with one-line
errors naming the key, and off (or local) unless the YAML names it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .params import SpaceError
from .sections import section, typed

STOPPING_KINDS = ("off", "dominance")


@dataclass(frozen=True, kw_only=True)
class EarlyStopping:
    """``early_stopping:`` — stop a trial at a rung when it is dominated (Syne Tune's MOASHA, Schmucker et al.):
    the trials that reached the rung are sorted into non-dominated fronts and a trial goes on only when at most a
    fraction 1/η of them lie in better fronts than its own."""

    kind: str = "off"  # "off" or "dominance"
    grace_period: int = 1  # epoch of the first rung
    reduction_factor: float = 3.0  # η: rungs at grace_period·η^k; the top 1/η of a rung goes on
    rungs: int = 0  # how many rungs; 0: every grace_period·η^k below the longest trial's last epoch
    probe_clips: int = 8  # held-out clips each epoch's quality and MACs are measured on

    @property
    def enabled(self) -> bool:
        return self.kind != "off"

    def milestones(self, max_epochs: int) -> tuple[int, ...]:
        """The rungs' epochs: grace_period·η^k, rounded, below ``max_epochs`` (a trial's last epoch is no rung:
        stopping it there would save nothing but its final evaluation)."""
        out: list[int] = []
        k = 0
        while self.rungs == 0 or k < self.rungs:
            epoch = round(self.grace_period * self.reduction_factor**k)
            if epoch >= max_epochs:
                break
            if not out or epoch > out[-1]:
                out.append(epoch)
            k += 1
        return tuple(out)


@dataclass(frozen=True, kw_only=True)
class Constraints:
    """``constraints:`` — budgets a trial must meet to count. The sampler is told (Optuna's named constraints,
    ``Trial.set_constraint``: a value > 0 is a violation by that much); the front holds feasible trials only."""

    max_latency_ms: float | None = None  # per frame, on the measuring device
    max_quality_drop: float | None = None  # against the dense network on the same clips
    max_macs: float | None = None  # effective MACs per frame

    #: constraint -> the trial metric it bounds
    METRICS = {"max_latency_ms": "latency_ms", "max_quality_drop": "quality_drop", "max_macs": "macs"}

    def named(self) -> dict[str, float]:
        """The constraints that are set, by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def violations(self, metrics: dict[str, Any]) -> dict[str, float]:
        """Each set constraint's value for a trial: metric − bound (≤ 0 feasible). A metric the trial did not
        report violates its constraint (infinitely: nothing says it is met)."""
        out = {}
        for name, bound in self.named().items():
            value = metrics.get(self.METRICS[name])
            ok = isinstance(value, (int, float)) and math.isfinite(value)
            out[name] = float(value) - bound if ok else math.inf
        return out

    def feasible(self, metrics: dict[str, Any]) -> bool:
        return all(v <= 0 for v in self.violations(metrics).values())


@dataclass(frozen=True, kw_only=True)
class LatencyTarget:
    """``latency:`` — where a trial's latency is measured. With a ``resource``, on a Ray node that carries that
    custom resource (the target device, started with ``ray start --resources '{"target": 1}'``), one
    measurement per unit of it at a time, with ``threads`` torch threads; without, on the machine that trained
    the trial, holding its device lock."""

    resource: str | None = None  # Ray custom resource of the target device
    threads: int | None = None  # torch threads of the deployment (default: every core the measuring process has)


@dataclass(frozen=True, kw_only=True)
class HypervolumeReference:
    """``hypervolume_reference:`` — the fixed point the front's hypervolume is measured from: a quality floor and
    a cost ceiling (in the search's cost objective). Unset parts come from the dense network (its cost; the
    quality floor 0, or the dense quality less ``constraints.max_quality_drop``)."""

    quality: float | None = None
    cost: float | None = None


def parse_early_stopping(raw: Any) -> EarlyStopping:
    es = section(EarlyStopping, raw, "early_stopping", minimum={"grace_period": 1, "rungs": 0, "probe_clips": 1})
    if es.kind not in STOPPING_KINDS:
        raise SpaceError(f"early_stopping.kind: {es.kind!r} is not one of {', '.join(STOPPING_KINDS)}")
    if not es.reduction_factor > 1:
        raise SpaceError(f"early_stopping.reduction_factor: must be > 1, got {es.reduction_factor}")
    return es


def parse_constraints(raw: Any) -> Constraints:
    c = section(Constraints, raw, "constraints")
    for name, bound in c.named().items():
        if not math.isfinite(bound) or bound < 0:
            raise SpaceError(f"constraints.{name}: must be a finite number >= 0, got {bound}")
    return c


def parse_latency(raw: Any) -> LatencyTarget:
    target = section(LatencyTarget, raw, "latency", minimum={"threads": 1})
    if target.resource is not None and not target.resource.strip():
        raise SpaceError("latency.resource: must name a Ray custom resource, got an empty name")
    return target


def parse_hypervolume_reference(raw: Any, cost_key: str) -> HypervolumeReference:
    """``{quality: Q, <cost_key>: C}``, the cost named as the search's objective reports it (latency_ms or macs)."""
    if raw is None:
        return HypervolumeReference()
    if not isinstance(raw, dict):
        raise SpaceError(f"hypervolume_reference: expected a mapping, got {type(raw).__name__}")
    for key in raw:
        if key not in ("quality", cost_key):
            raise SpaceError(f"hypervolume_reference.{key}: unknown key; known: quality, {cost_key} "
                             f"(the cost as the search's objective reports it)")
    values = {k: typed(v, float, f"hypervolume_reference.{k}") for k, v in raw.items()}
    return HypervolumeReference(quality=values.get("quality"), cost=values.get(cost_key))
