"""The report's PNG plots (matplotlib, Agg backend: no display needed). Each returns the file's name."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def _figure(title: str, xlabel: str, ylabel: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return plt, fig, ax


def _save(plt, fig, ax, path: Path) -> str:
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def front_plot(path: Path, series: dict[str, Sequence[tuple[float, float]]], *, dense: tuple[float, float],
               quality: str, title: str) -> str:
    """Quality against MMACs per frame, one line per series (sorted by MACs), the dense network as a star."""
    plt, fig, ax = _figure(title, "MMACs per frame", quality)
    for name, pts in series.items():
        xs, ys = zip(*sorted(pts)) if pts else ((), ())
        ax.plot([x / 1e6 for x in xs], ys, marker="o", ms=4, label=name)
    ax.plot([dense[0] / 1e6], [dense[1]], marker="*", ms=12, color="black", ls="", label="dense")
    return _save(plt, fig, ax, path)


def line_plot(path: Path, series: dict[str, Sequence[tuple[float, float]]], *, xlabel: str, ylabel: str, title: str,
              xticks: Sequence[tuple[float, str]] | None = None, diagonal: bool = False) -> str:
    """One line per series; ``diagonal`` draws y = x (a speedup equal to the MAC reduction)."""
    plt, fig, ax = _figure(title, xlabel, ylabel)
    for name, pts in series.items():
        xs, ys = zip(*pts) if pts else ((), ())
        ax.plot(xs, ys, marker="o", ms=5, label=name)
    if xticks:
        ax.set_xticks([x for x, _ in xticks], [label for _, label in xticks])
    if diagonal:
        top = max([1.0] + [max(x, y) for pts in series.values() for x, y in pts])
        ax.plot([1, top], [1, top], ls="--", color="grey", lw=1, label="speedup = MAC reduction")
        ax.axhline(1.0, color="black", lw=0.8)
    return _save(plt, fig, ax, path)


__all__ = ["front_plot", "line_plot"]
