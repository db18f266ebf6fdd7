"""Pareto fronts over (quality ↑, cost ↓), and the plot a person looks at."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


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


def plot_front(rows: list[dict], front_ids: set[str], path: Path, *, cost_key: str, cost_label: str,
               title: str = "") -> None:
    """Scatter every trial by gate, circle the Pareto front, draw its staircase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    gates = sorted({r["gate"] for r in rows})
    for gate in gates:
        pts = [r for r in rows if r["gate"] == gate]
        ax.scatter([r[cost_key] for r in pts], [r["quality"] for r in pts], label=gate, alpha=0.75, s=28)
    front = sorted((r for r in rows if r["trial_id"] in front_ids), key=lambda r: r[cost_key])
    if front:
        ax.step([r[cost_key] for r in front], [r["quality"] for r in front], where="post", color="black", lw=1)
        ax.scatter([r[cost_key] for r in front], [r["quality"] for r in front], facecolors="none",
                   edgecolors="black", s=90, label="Pareto front")
    ax.set_xlabel(cost_label)
    if title:
        ax.set_title(title, fontsize=10)
    ax.set_ylabel("quality")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
