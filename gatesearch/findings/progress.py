"""What a running fidelity report shows: one line per step with the time so far and an estimate of what is left;
on a terminal also a status line (rich) redrawn in place with the finding running, elapsed and ETA.

The estimate starts from the profile's expected seconds per finding (measured on 2 quiet cores) and is rescaled by
how fast this machine has been so far, so a loaded machine sees a longer, truer ETA.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gatesearch.search.progress import clock


class Progress:
    def __init__(self, estimates: dict[str, float], echo: Callable[[str], None], *, live: bool = False) -> None:
        self.estimates = estimates  # expected seconds per finding key, in run order
        self.echo = echo
        self.start_time = time.perf_counter()
        self.done: dict[str, float] = {}  # key -> seconds it took
        self.current: str | None = None
        self.title = ""
        self.current_start = self.start_time
        self.live = None
        if live:
            from rich.console import Console
            from rich.live import Live

            console = Console(stderr=True)
            self.echo = lambda line: console.print(line, highlight=False, markup=False)
            self.live = Live(get_renderable=self.status, console=console, refresh_per_second=1, transient=True)
            self.live.start()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start_time

    def remaining(self) -> float:
        """Seconds left: estimates of the findings not done, scaled by actual / estimated time so far."""
        est_done = sum(self.estimates.get(k, 0.0) for k in self.done)
        scale = sum(self.done.values()) / est_done if est_done > 0 else 1.0
        left = sum(v for k, v in self.estimates.items() if k not in self.done)
        if self.current is not None:
            left -= min(time.perf_counter() - self.current_start, self.estimates.get(self.current, 0.0))
        return max(0.0, left * scale)

    def status(self) -> str:
        since = clock(time.perf_counter() - self.current_start)
        running = f"running {self.title} for {since} | " if self.current else ""
        return (f"{running}findings done {len(self.done)}/{len(self.estimates)} | elapsed {clock(self.elapsed())} | "
                f"ETA {clock(self.remaining())}")

    def begin(self, key: str, line: str) -> None:
        self.current, self.title, self.current_start = key, line, time.perf_counter()
        self.echo(f"[{len(self.done) + 1}/{len(self.estimates)}] {line}  (elapsed {clock(self.elapsed())}, "
                  f"about {clock(self.remaining())} left)")

    def step(self, line: str) -> None:
        since = time.perf_counter() - self.current_start
        self.echo(f"      {line}  [{clock(since)}; about {clock(self.remaining())} left]")

    def end(self, key: str, line: str) -> None:
        self.done[key] = time.perf_counter() - self.current_start
        self.current = None
        self.echo(f"      {line} in {clock(self.done[key])}")

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


__all__ = ["Progress", "clock"]
