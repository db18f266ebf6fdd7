"""The plots a person looks at: a search's Pareto front, and a stream's density per layer over time."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .colours import gate_colour


def pyplot():
    """matplotlib's pyplot on the file-only backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_front(rows: list[dict], front_ids: set[str], path: Path, *, cost_key: str, cost_label: str,
               title: str = "", dense: list[dict] | None = None) -> None:
    """Scatter every trial in its gate's colour with its 95 % interval (the drop's, around the trial's quality),
    circle the Pareto front, draw its staircase, and mark each dense baseline (``dense``: {quality, cost_key})."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for gate in sorted({r["gate"] for r in rows}):
        pts = [r for r in rows if r["gate"] == gate]
        ax.scatter([r[cost_key] for r in pts], [r["quality"] for r in pts], label=gate, alpha=0.8, s=28,
                   color=gate_colour(gate))
        ci = [r for r in pts if r.get("quality_drop_ci")]
        if ci:  # quality = dense − drop, so the drop's interval [low, high] maps to [q − (high − drop), q + ...]
            yerr = [[max(0.0, r["quality_drop_ci"][1] - r["quality_drop"]) for r in ci],
                    [max(0.0, r["quality_drop"] - r["quality_drop_ci"][0]) for r in ci]]
            ax.errorbar([r[cost_key] for r in ci], [r["quality"] for r in ci], yerr=yerr, fmt="none",
                        ecolor=gate_colour(gate), alpha=0.5, lw=1)
    for i, base in enumerate(dense or []):
        ax.axhline(base["quality"], color="grey", ls="--", lw=0.8, label="dense" if i == 0 else None)
        if base.get(cost_key) is not None:
            ax.axvline(base[cost_key], color="grey", ls=":", lw=0.8)
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


def plot_density(density: dict[str, Sequence[float]], path: Path, *, reference_frames: Sequence[int] = (),
                 title: str = "") -> None:
    """Density (fraction of each gated layer's work computed) per frame, one line per layer, reference frames
    (dense by construction) marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.0), dpi=120)
    cmap = plt.get_cmap("viridis")
    names = list(density)
    for i, name in enumerate(names):
        values = list(density[name])
        ax.plot(range(len(values)), values, lw=1.2, color=cmap(i / max(1, len(names) - 1)), label=name)
    for t in reference_frames:
        ax.axvline(t, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("frame")
    ax.set_ylabel("density (fraction computed)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    if 0 < len(names) <= 12:
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
