"""Fail fast: every service a search needs is checked before anything is written.

A search runs for hours, so a tracking server that is down, a Ray address nobody listens on or a work folder
that cannot be written must be reported in seconds, as one line, before the first file exists. MLflow's HTTP
client retries a dead server for minutes by default (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` with exponential
backoff), so the server is first probed with a plain TCP connect, then asked one question with retries off.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 3.0  # per probe; a search checks at most three services, so all of it stays under 10 s


class ServiceError(RuntimeError):
    """A service the search needs is missing or unusable (one-line message naming it)."""


def check_services(*, workdir: Path, tracking_uri: str, ray_address: str | None) -> None:
    """Check the work folder, the MLflow tracking store and the Ray address, in that order; write nothing."""
    check_folder(workdir, "work folder")
    check_tracking(tracking_uri)
    if ray_address:
        check_ray_address(ray_address)


def check_folder(path: Path, what: str) -> None:
    """``path`` is a writable folder, or could be created as one (its nearest existing parent is writable)."""
    path = Path(path).expanduser().absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ServiceError(f"{what} {path} cannot be created: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ServiceError(f"{what} {path} is not writable ({existing} denies writing)")


def check_tracking(uri: str) -> None:
    """The MLflow tracking URI answers: a local store's folder is writable, a server takes one request."""
    parts = urlsplit(uri)
    if parts.scheme == "sqlite":
        db = uri.removeprefix("sqlite:///")  # "x.db" (relative) or "/abs/x.db"
        if db and db != ":memory:":
            check_folder(Path(db).parent, "MLflow store folder")
        return
    if parts.scheme in ("", "file"):
        check_folder(Path(parts.path if parts.scheme else uri), "MLflow store folder")
        return
    if parts.hostname:
        default_port = {"http": 80, "https": 443}.get(parts.scheme)
        port = parts.port or default_port
        if port is not None:
            probe_tcp(parts.hostname, port, f"tracking server {uri}")
    if parts.scheme in ("http", "https", "databricks"):
        _probe_mlflow(uri)


def check_ray_address(address: str) -> None:
    """A Ray address given as host:port (or ray://host:port) has something listening on it."""
    if address in ("auto", "local"):
        return  # resolved by ray.init itself, which fails at once when there is no cluster
    parts = urlsplit(address if "://" in address else f"ray://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or port is None:
        raise ServiceError(f"Ray address {address!r} is not host:port")
    probe_tcp(host, port, f"Ray cluster at {address}")


def probe_tcp(host: str, port: int, what: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Connect once, name resolution included, and give up after ``timeout`` seconds."""
    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(e)

    worker = threading.Thread(target=connect, daemon=True)  # getaddrinfo itself has no timeout
    worker.start()
    worker.join(timeout + 0.5)
    if not outcome:
        raise ServiceError(f"{what} is not reachable (no answer in {timeout:.0f} s)")
    if outcome[0] is not None:
        raise ServiceError(f"{what} is not reachable ({_reason(outcome[0])})")


def _probe_mlflow(uri: str) -> None:
    from mlflow.tracking import MlflowClient

    with _quick_http():
        try:
            MlflowClient(uri).search_experiments(max_results=1)
        except Exception as e:  # any failure here means the search could not record anything
            raise ServiceError(f"tracking server {uri} does not answer as an MLflow server ({_reason(e)})") from None


@contextmanager
def _quick_http() -> Iterator[None]:
    """MLflow's HTTP client without retries and with a short timeout, for the probe only."""
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(PROBE_TIMEOUT_S))}
    saved = {k: os.environ.get(k) for k in quick}
    os.environ.update(quick)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


__all__ = ["ServiceError", "check_folder", "check_ray_address", "check_services", "check_tracking", "probe_tcp"]
