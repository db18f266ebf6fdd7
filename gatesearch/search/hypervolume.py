"""The search's measure of its own progress: the hypervolume of the front of (quality ↑, cost ↓).

The hypervolume is the area the front dominates, bounded by a fixed reference point (a quality floor, a cost
ceiling); it grows whenever a trial extends the front and never shrinks, so one number says how far a search has
got. Optuna computes it (``optuna._hypervolume.compute_hypervolume``, the same code behind
``optuna.visualization.plot_hypervolume_history``); infeasible trials are left out, as Optuna's history does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from gatesearch.spaces.objectives import Constraints, HypervolumeReference


@dataclass(frozen=True)
class Reference:
    quality: float  # floor: a trial must do better to count
    cost: float  # ceiling, in the search's cost objective


def hypervolume(points: Sequence[tuple[float, float]], reference: Reference) -> float:
    """Area dominated by ``points`` (quality, cost) up to ``reference``; points no better than it in both count
    nothing."""
    import numpy as np
    from optuna._hypervolume import compute_hypervolume

    losses = [(-q, c) for q, c in points if q > reference.quality and c < reference.cost]
    if not losses:
        return 0.0
    return float(compute_hypervolume(np.asarray(losses, dtype=float), np.asarray([-reference.quality, reference.cost])))


def reference_point(given: HypervolumeReference, *, dense: Sequence[tuple[float | None, float | None]],
                    constraints: Constraints | None = None) -> Reference | None:
    """The fixed reference: what the YAML gives, the rest from the dense networks ``dense`` (quality, cost) of the
    search — the largest dense cost (a gated model slower than dense is no gain), and a quality floor of 0, or of
    the worst dense quality less ``max_quality_drop`` when that budget is set. None while something is missing."""
    qualities = [q for q, _ in dense if q is not None]
    costs = [c for _, c in dense if c is not None]
    quality, cost = given.quality, given.cost
    drop = constraints.max_quality_drop if constraints else None
    if cost is None and costs:
        cost = max(costs)
    if quality is None:
        if drop is None:
            quality = 0.0
        elif qualities:
            quality = min(qualities) - drop
    return None if quality is None or cost is None else Reference(quality, cost)


@dataclass
class HypervolumeHistory:
    """The hypervolume after each finished trial, for the progress line and the MLflow parent's step metric. The
    reference is fixed before the first value: from the YAML, the search's dense networks, or else the dense
    figures the first finished trial reports beside its own (``dense_quality``, ``dense_<cost>``)."""

    given: HypervolumeReference = field(default_factory=HypervolumeReference)
    constraints: Constraints | None = None
    cost_key: str = "latency_ms"
    reference: Reference | None = None
    points: list[tuple[float, float]] = field(default_factory=list)  # feasible finished trials
    values: list[float] = field(default_factory=list)  # after each finished trial, feasible or not

    def add(self, metrics: dict, *, feasible: bool = True) -> float | None:
        """Count one finished trial; the hypervolume now (None while the reference is unknown)."""
        if self.reference is None:
            dense = [(metrics.get("dense_quality"), metrics.get(f"dense_{self.cost_key}"))]
            self.reference = reference_point(self.given, dense=dense, constraints=self.constraints)
        if feasible:
            self.points.append((metrics["quality"], metrics[self.cost_key]))
        if self.reference is None:
            return None
        self.values.append(hypervolume(self.points, self.reference))
        return self.values[-1]

    @property
    def current(self) -> float | None:
        return self.values[-1] if self.values else None


__all__ = ["HypervolumeHistory", "Reference", "hypervolume", "reference_point"]
