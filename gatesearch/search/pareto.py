"""Pareto fronts over (quality ↑, cost ↓); their plot is ``viz.plots.plot_front``."""

from __future__ import annotations

from collections.abc import Sequence


def pareto_indices(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points of (quality to maximise, cost to minimise)."""
    fronts = nondominated_fronts([(-q, c) for q, c in points])
    return fronts[0] if fronts else []


def front_within(rows: list[dict], constraints, *, min_quality: float | None = None,
                 cost_key: str = "latency_ms") -> list[dict]:
    """The Pareto front (quality ↑, ``cost_key`` ↓) of the trials ``rows`` that meet ``constraints``
    (``spaces.objectives.Constraints``) and ``min_quality``, sorted by cost."""
    kept = [r for r in rows if r.get("feasible", True) and constraints.feasible(r)
            and (min_quality is None or r["quality"] >= min_quality)]
    front = [kept[i] for i in pareto_indices([(r["quality"], r[cost_key]) for r in kept])]
    return sorted(front, key=lambda r: (r[cost_key], -r["quality"]))


def nondominated_fronts(losses: Sequence[Sequence[float]]) -> list[list[int]]:
    """Non-dominated sorting of loss vectors (every objective minimised): the indices of the first front, then of
    the front that is non-dominated once the first is removed, and so on (Deb et al., NSGA-II)."""

    def dominates(a, b) -> bool:
        return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))

    left = list(range(len(losses)))
    fronts = []
    while left:
        front = [i for i in left if not any(dominates(losses[j], losses[i]) for j in left if j != i)]
        fronts.append(front)
        left = [i for i in left if i not in front]
    return fronts

