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


def reference_point(given: HypervolumeReference, *, dense: Sequence[tuple[float, float]],
                    constraints: Constraints | None = None) -> Reference | None:
    """The fixed reference: what the YAML gives, the rest from the dense networks ``dense`` (quality, cost) of the
    search — the largest dense cost (a gated model slower than dense is no gain), and a quality floor of 0, or of
    the worst dense quality less ``max_quality_drop`` when that budget is set. None while something is missing."""
    quality, cost = given.quality, given.cost
    drop = constraints.max_quality_drop if constraints else None
    if cost is None and dense:
        cost = max(c for _, c in dense)
    if quality is None:
        if drop is None:
            quality = 0.0
        elif dense:
            quality = min(q for q, _ in dense) - drop
    return None if quality is None or cost is None else Reference(quality, cost)


@dataclass
class HypervolumeHistory:
    """The hypervolume after each finished trial, for the progress line and the MLflow parent's step metric."""

    reference: Reference | None = None  # set once, before the first value is taken
    points: list[tuple[float, float]] = field(default_factory=list)  # feasible finished trials
    values: list[float] = field(default_factory=list)  # after each finished trial, feasible or not

    def add(self, quality: float, cost: float, *, feasible: bool = True) -> float | None:
        """Count one finished trial; the hypervolume now (None while the reference is unknown)."""
        if feasible:
            self.points.append((quality, cost))
        if self.reference is None:
            return None
        self.values.append(hypervolume(self.points, self.reference))
        return self.values[-1]

    @property
    def current(self) -> float | None:
        return self.values[-1] if self.values else None


__all__ = ["HypervolumeHistory", "Reference", "hypervolume", "reference_point"]
