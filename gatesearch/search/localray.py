"""The Ray a search runs on: a cluster it joins, or a local Ray it owns and leaves nothing of.

A local Ray started by a search gets a temp dir of its own, so its processes can be told apart from any other
Ray on the machine: every process of that instance (GCS, raylet, agents, workers) keeps its log files open under
that folder, and that is how they are found again, even after the driver was killed with SIGKILL (its agents
then outlive it). Ray puts Unix sockets in the temp dir and a socket path holds at most 107 bytes, so the folder
is short: ``/tmp/gs-<10 hex digits>``, keyed by the search.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

TEMP_ROOT = Path("/tmp")


class RayStartError(RuntimeError):
    """Ray could not be started or joined (one-line message)."""


@dataclass(frozen=True, kw_only=True)
class RayHandle:
    started: bool  # True when this search started a local Ray (and so must stop it)
    cpus: int  # CPUs the trials can use
    temp_dir: str | None = None  # the local Ray's temp dir (None when joining a cluster)
    pids: tuple[int, ...] = ()  # that Ray's processes right after it started


def temp_dir_for(key: str) -> Path:
    """The local Ray temp dir of the search ``key`` (the search's work folder and id)."""
    return TEMP_ROOT / f"gs-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def start_ray(*, address: str | None, cpus: int, temp_dir: Path) -> RayHandle:
    """Join ``address``, reuse a Ray this process already holds, or start a local Ray in ``temp_dir``."""
    import ray

    if ray.is_initialized():  # a caller (or a test session) connected already; it stops what it started
        return RayHandle(started=False, cpus=int(ray.cluster_resources().get("CPU", cpus)))
    try:
        if address:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            return RayHandle(started=False, cpus=int(ray.cluster_resources().get("CPU", cpus)))
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                 _temp_dir=str(temp_dir), _node_ip_address="127.0.0.1")
    except (ConnectionError, RuntimeError, ValueError) as e:
        ray.shutdown()
        where = f"Ray cluster at {address}" if address else "a local Ray"
        raise RayStartError(f"could not start or join {where}: {str(e).strip().splitlines()[0][:200]}") from None
    return RayHandle(started=True, cpus=cpus, temp_dir=str(temp_dir), pids=tuple(ray_processes(temp_dir)))


def stop_ray(handle: RayHandle) -> None:
    """Shut down the local Ray this search started, then stop whatever of it is still running."""
    import ray

    if not handle.started:
        return
    ray.shutdown()
    if handle.temp_dir:
        clean_up(Path(handle.temp_dir), handle.pids)


def clean_up(temp_dir: Path, pids: tuple[int, ...] = (), *, grace_s: float = 3.0) -> list[int]:
    """Stop every process of the Ray instance in ``temp_dir`` (SIGTERM, then SIGKILL), remove the folder.

    ``pids`` (recorded when that Ray started) are stopped only while they still hold files in ``temp_dir``: a pid
    reused by another process since is left alone. Returns the pids that were signalled.
    """
    procs = ray_processes(temp_dir, also=pids)
    _signal(procs, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(p) for p in procs):
        time.sleep(0.1)
    _signal([p for p in procs if _alive(p)], signal.SIGKILL)  # Ray's agents ignore SIGTERM
    shutil.rmtree(temp_dir, ignore_errors=True)
    return procs


def kill_now(temp_dir: Path, pids: tuple[int, ...] = ()) -> None:
    """SIGKILL the Ray instance in ``temp_dir`` at once (a second Ctrl-C)."""
    _signal(ray_processes(temp_dir, also=pids), signal.SIGKILL)


def ray_processes(temp_dir: Path, *, also: tuple[int, ...] = ()) -> list[int]:
    """Processes (other than this one) that hold a file open under ``temp_dir``: that Ray instance's.

    ``also`` are pids checked first; every process readable in /proc is scanned too, so workers started after
    the pids were recorded are found.
    """
    root = str(Path(temp_dir).absolute()) + "/"
    own = os.getpid()
    candidates = dict.fromkeys([*also, *(int(p) for p in os.listdir("/proc") if p.isdigit())])
    return [pid for pid in candidates if pid != own and _holds_files_under(pid, root)]


def _holds_files_under(pid: int, root: str) -> bool:
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:  # gone, or not ours to look at
        return False
    for fd in fds:
        try:
            if os.readlink(f"{fd_dir}/{fd}").startswith(root):
                return True
        except OSError:
            continue
    return False


def _alive(pid: int) -> bool:
    """Running (a zombie that nobody reaped has released everything and counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


__all__ = ["RayHandle", "RayStartError", "clean_up", "kill_now", "ray_processes", "start_ray", "stop_ray",
           "temp_dir_for"]
