"""Pareto fronts over (quality ↑, cost ↓); their plot is ``viz.plots.plot_front``."""

from __future__ import annotations

from collections.abc import Sequence


def pareto_indices(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points of (quality to maximise, cost to minimise)."""
    front = []
    for i, (q, c) in enumerate(points):
        dominated = any(
            (q2 >= q and c2 <= c) and (q2 > q or c2 < c) for j, (q2, c2) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return front
