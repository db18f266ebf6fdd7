"""Exclusive use of the target device while latency is measured.

Trials run side by side on one machine; a latency measured while another
trial trains measures the contention, not the model. Training steps hold a
shared lock, a latency measurement holds the exclusive one (with writer
priority through a turnstile), so measurements run on a quiet machine and may
use all of its cores. The locks are files in the machine's temp folder, so
they order every trial on the same host, whichever search it belongs to.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

_DIR = Path(os.environ.get("GATESEARCH_LOCK_DIR", tempfile.gettempdir()))


def _open(folder: Path, name: str) -> int:
    return os.open(folder / f"gatesearch-{name}.lock", os.O_RDWR | os.O_CREAT, 0o666)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run torch with ``threads`` threads inside the block (None: leave as is)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _flock(fd: int, mode: int) -> Iterator[None]:
    fcntl.flock(fd, mode)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


class DeviceLock:
    """Shared for work that may overlap, exclusive for timing."""

    def __init__(self, folder: Path | None = None) -> None:
        folder = Path(folder) if folder is not None else _DIR
        self._turnstile = _open(folder, "turnstile")
        self._device = _open(folder, "device")

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with _flock(self._turnstile, fcntl.LOCK_EX):
            pass  # waits here while a measurement is queued or running
        with _flock(self._device, fcntl.LOCK_SH):
            yield

    @contextlib.contextmanager
    def exclusive(self, threads: int | None = None) -> Iterator[None]:
        """Hold the device alone; optionally run torch with ``threads`` threads meanwhile."""
        with _flock(self._turnstile, fcntl.LOCK_EX), _flock(self._device, fcntl.LOCK_EX), torch_threads(threads):
            yield

    def close(self) -> None:
        os.close(self._turnstile)
        os.close(self._device)


class NoLock:
    """Stand-in when a trial runs alone (tests, a single process)."""

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        yield

    def exclusive(self, threads: int | None = None) -> contextlib.AbstractContextManager:
        return torch_threads(threads)
