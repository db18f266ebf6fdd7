"""A search's own record: what ``gatesearch resume`` needs to continue it, kept in the work folder.

One JSON file per search (``<workdir>/searches/<search_id>.json``, replaced atomically) holds the config the
search runs with, where its Optuna study and MLflow parent run are, the local Ray it started (temp dir and
process ids, so a killed driver's leftovers can be found) and its state. A driver holds an exclusive lock on
``<search_id>.lock`` while it runs: the kernel drops the lock when the driver dies, even by SIGKILL, so a record
that says ``running`` with its lock free belongs to a driver that was killed.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gatesearch.atomic import write_atomic

from .tracking import NotFoundError

STATES = ("running", "interrupted", "failed", "finished")  # "running" with a free lock: the driver was killed
FOLDER = "searches"


class SearchBusy(RuntimeError):
    """The search is being driven by another process (one-line message)."""


@dataclass(frozen=True, kw_only=True)
class SearchRecord:
    search_id: str
    config: dict[str, Any]  # SearchConfig.to_dict(): resume reads the config from here
    tracking_uri: str  # where the MLflow parent run lives
    parent_run_id: str  # the MLflow parent run, reused by resume
    storage_url: str  # the Optuna study's storage ...
    study_name: str  # ... and its name
    state: str = "running"  # one of STATES
    ray_address: str | None = None  # the cluster joined, if any
    ray_temp_dir: str | None = None  # the local Ray started by the driver (None when joining one)
    ray_pids: tuple[int, ...] = ()  # that Ray's processes when it started
    driver_pid: int = 0
    attempts: int = 1  # 1 + how many times it was resumed
    created: float = 0.0  # unix time
    updated: float = 0.0
    message: str = ""  # how the last attempt ended

    @property
    def finished(self) -> bool:
        return self.state == "finished"

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["ray_pids"] = list(self.ray_pids)
        return out

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> SearchRecord:
        fields = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(raw, dict) or not {"search_id", "config", "parent_run_id"} <= set(raw):
            raise NotFoundError(f"{where}: not a gatesearch search record")
        rec = cls(**{k: v for k, v in raw.items() if k in fields})
        if rec.state not in STATES:
            raise NotFoundError(f"{where}: unknown state {rec.state!r}")
        return dataclasses.replace(rec, ray_pids=tuple(int(p) for p in rec.ray_pids))


def record_path(workdir: Path, search_id: str) -> Path:
    return Path(workdir) / FOLDER / f"{search_id}.json"


def save(workdir: Path, rec: SearchRecord) -> None:
    """Write the record atomically: a reader sees the old file or the new one, never half of one."""
    write_atomic(record_path(workdir, rec.search_id), json.dumps(rec.to_dict(), indent=1))


def load(workdir: Path, search_id: str) -> SearchRecord:
    path = record_path(workdir, search_id)
    if not path.is_file():
        raise NotFoundError(f"no search {search_id!r} in {workdir}")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise NotFoundError(f"{path}: damaged search record (not JSON)") from None
    return SearchRecord.from_dict(raw, str(path))


def find(workdir: Path, search_id: str | None) -> SearchRecord:
    """``search_id``'s record, or the latest unfinished search's when None."""
    if search_id:
        return load(workdir, search_id)
    folder = Path(workdir) / FOLDER
    records = [load(workdir, p.stem) for p in folder.glob("*.json")] if folder.is_dir() else []
    unfinished = [r for r in records if not r.finished]
    if not unfinished:
        raise NotFoundError(f"no unfinished search in {workdir}")
    return max(unfinished, key=lambda r: r.created)


def exists(workdir: Path, search_id: str) -> bool:
    return record_path(workdir, search_id).exists()


@contextmanager
def hold(workdir: Path, search_id: str) -> Iterator[None]:
    """Hold the search's lock while driving it; refuse when another live process holds it."""
    path = record_path(workdir, search_id).with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "?"
            raise SearchBusy(f"search {search_id} is running (driver pid {pid}); stop it before resuming") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


__all__ = ["STATES", "SearchBusy", "SearchRecord", "exists", "find", "hold", "load", "record_path", "save"]
