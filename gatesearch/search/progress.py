"""What a running search shows: the trials running (gate, epoch), done and failed counts, elapsed and ETA, the front.

``SearchState`` is what the recorder knows; a display draws it. ``LiveProgress`` (rich) redraws a small table
in place on a terminal; ``PlainProgress`` prints one line per started and per finished trial, for logs, pipes
and ``--json``. What the front adds to the status line (its size, the best quality, and any further figure
such as a hypervolume) comes from ``SearchState.front``, which the recorder fills (``Recorder.front_summary``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class Running:
    trial_id: str
    gate: str
    epochs: int  # epochs the trial trains for
    started: float = field(default_factory=time.time)
    epoch: int = 0  # epochs finished so far


@dataclass
class SearchState:
    search_id: str
    trials: int  # trials the search runs in all
    started: float = field(default_factory=time.time)
    running: dict[str, Running] = field(default_factory=dict)
    done: int = 0
    failed: int = 0
    stopped: int = 0  # trials early stopping stopped
    front: dict[str, Any] = field(default_factory=dict)  # what the status line says of the front, in order
    earlier: int = 0  # trials done or failed in earlier attempts of a resumed search (not part of this pace)

    def elapsed(self) -> float:
        return time.time() - self.started

    def eta(self) -> float | None:
        """Seconds left at the pace so far: trials finished plus the running ones' share of their epochs."""
        partial = sum(r.epoch / r.epochs for r in self.running.values() if r.epochs)
        progress = self.done + self.failed + self.stopped - self.earlier + partial
        if progress <= 0:
            return None
        return max(0.0, self.elapsed() * (self.trials - self.earlier - progress) / progress)

    def status(self) -> str:
        parts = [f"done {self.done}/{self.trials}", f"failed {self.failed}", f"running {len(self.running)}",
                 f"elapsed {clock(self.elapsed())}", f"ETA {clock(self.eta())}"]
        if self.stopped:
            parts.insert(2, f"stopped early {self.stopped}")
        parts += [f"{key} {fmt(value)}" for key, value in self.front.items()]
        return " | ".join(parts)


class Progress(Protocol):
    def start(self, state: SearchState) -> None: ...
    def refresh(self) -> None: ...  # the state changed
    def line(self, text: str) -> None: ...  # an event worth a line of its own
    def stop(self) -> None: ...


class PlainProgress:
    """One line per event, the status appended: for logs, pipes and ``--json``."""

    def __init__(self, echo: Callable[[str], None] = print) -> None:
        self.echo = echo
        self.state: SearchState | None = None

    def start(self, state: SearchState) -> None:
        self.state = state

    def refresh(self) -> None:
        pass

    def line(self, text: str) -> None:
        self.echo(f"{text} | {self.state.status()}" if self.state else text)

    def stop(self) -> None:
        pass


class LiveProgress:
    """A rich table of the running trials and a status line, redrawn in place; finished trials print above."""

    def __init__(self, console=None) -> None:
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.state: SearchState | None = None
        self.live = None

    def start(self, state: SearchState) -> None:
        from rich.live import Live

        self.state = state
        self.live = Live(get_renderable=self._render, console=self.console, refresh_per_second=2, transient=True)
        self.live.start()

    def refresh(self) -> None:
        if self.live is not None:
            self.live.refresh()

    def line(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False)

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
        if self.state is not None:
            self.console.print(self.state.status(), highlight=False, markup=False)

    def _render(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        state = self.state
        table = Table(box=None, show_edge=False, pad_edge=False, header_style="bold")
        for name, justify in (("trial", "left"), ("gate", "left"), ("epoch", "right"), ("running", "right")):
            table.add_column(name, justify=justify)
        for r in state.running.values():
            table.add_row(r.trial_id, r.gate, f"{r.epoch}/{r.epochs}", clock(time.time() - r.started))
        return Group(Text(f"search {state.search_id}", style="bold"), table, Text(state.status()))


def clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
