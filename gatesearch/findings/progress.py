"""A plain progress display: one line per step, with the time so far and an estimate of what is left.

The estimate starts from the profile's expected seconds per finding (measured on 2 quiet cores) and is rescaled by
how fast this machine has been so far, so a loaded machine sees a longer, truer ETA.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def clock(seconds: float) -> str:
    """``1h02m``, ``12m05s`` or ``42s``."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    def __init__(self, estimates: dict[str, float], echo: Callable[[str], None]) -> None:
        self.estimates = estimates  # expected seconds per finding key, in run order
        self.echo = echo
        self.start_time = time.perf_counter()
        self.done: dict[str, float] = {}  # key -> seconds it took
        self.current: str | None = None
        self.current_start = self.start_time

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

    def begin(self, key: str, line: str) -> None:
        self.current, self.current_start = key, time.perf_counter()
        n = list(self.estimates).index(key) + 1 if key in self.estimates else len(self.done) + 1
        self.echo(f"[{n}/{len(self.estimates)}] {line}  (elapsed {clock(self.elapsed())}, "
                  f"about {clock(self.remaining())} left)")

    def step(self, line: str) -> None:
        since = time.perf_counter() - self.current_start
        self.echo(f"      {line}  [{clock(since)}; about {clock(self.remaining())} left]")

    def end(self, key: str, line: str) -> None:
        self.done[key] = time.perf_counter() - self.current_start
        self.current = None
        self.echo(f"      {line} in {clock(self.done[key])}")


__all__ = ["Progress", "clock"]
