"""Stopping a running search: Ctrl-C / SIGTERM, or too many failed trials.

The first SIGINT or SIGTERM only raises a flag: Ray Tune's loop sees it through ``stopper()`` (``stop_all``),
stops the running trials, and the engine then records them as killed and the search as interrupted. A second
signal exits at once (``on_second`` runs first, to kill what must not outlive the driver). Ray Tune's own SIGINT
handler is turned off (``TUNE_DISABLE_SIGINT_HANDLER``) so that the same path serves SIGINT and SIGTERM.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class StopRequest:
    """Why the search was asked to stop: ``signal`` (the number) for Ctrl-C / SIGTERM, else ``reason``."""

    event: threading.Event = field(default_factory=threading.Event)
    reason: str | None = None
    signal: int | None = None

    def request(self, reason: str, sig: int | None = None) -> None:
        if not self.event.is_set():
            self.reason, self.signal = reason, sig
            self.event.set()

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    @property
    def interrupted(self) -> bool:
        """Stopped by a signal (the search can be resumed as it was), not by its own rules."""
        return self.signal is not None

    def __reduce__(self):  # Ray Tune pickles its config; the request is this process's, never shipped
        return (current, ())


_CURRENT = StopRequest()


def current() -> StopRequest:
    return _CURRENT


def reset() -> StopRequest:
    """A fresh request for the next search driven by this process."""
    global _CURRENT
    _CURRENT = StopRequest()
    return _CURRENT


@contextmanager
def handle_signals(*, on_first: Callable[[int], None], on_second: Callable[[int], None]) -> Iterator[StopRequest]:
    """Route SIGINT/SIGTERM to the stop request while the block runs; restore the old handlers after it."""
    req = reset()
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield req
        return

    def handler(sig, frame):
        if req.requested:
            on_second(sig)
            os._exit(128 + sig)
        req.request("interrupted", sig)
        on_first(sig)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    try:
        yield req
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def stopper():
    """The ``tune.Stopper`` that ends Ray Tune's loop once a stop was requested."""
    from ray import tune

    class StopOnRequest(tune.Stopper):
        def __call__(self, trial_id, result) -> bool:
            return False

        def stop_all(self) -> bool:
            return current().requested

    return StopOnRequest()


__all__ = ["StopRequest", "current", "handle_signals", "reset", "stopper"]
