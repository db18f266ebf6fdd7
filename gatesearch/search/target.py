"""Where a trial's latency is measured: on this machine holding its device lock (``LocalMeter``), or on the target
device, a Ray task on the node that carries the device's custom resource (``TargetMeter``).

Trials train wherever Ray places them; the latency that ranks them must be the device's. The trial hands its
model over as the exported artifact's files (what a deployment loads), and a task that needs one unit of the
device's resource (``ray start --resources '{"target": 1}'`` on the device) loads and times it there: one unit,
one measurement at a time. On that node the measurement holds the device lock as a local one does, so a trial
training there pauses between steps. The result says which node measured it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from gatesearch.objectives.latency import LatencyStats, measure_latency


@dataclass(frozen=True, kw_only=True)
class Measured:
    stats: LatencyStats
    node_id: str | None  # Ray node id of the node that measured (None outside Ray)
    node_ip: str | None
    threads: int | None  # torch threads the measurement ran with (None: as the process was)

    def metrics(self) -> dict[str, float | str | None]:
        """What a trial reports of its latency: the per-frame median and spread, and where it was measured."""
        return {"latency_ms": self.stats.median_ms, "latency_min_ms": self.stats.min_ms,
                "latency_max_ms": self.stats.max_ms, "latency_clips": self.stats.clips, "latency_node": self.node_id,
                "latency_node_ip": self.node_ip, "latency_threads": self.threads}


def _where() -> tuple[str | None, str | None]:
    """(node id, node ip) of this process's Ray node, or Nones outside Ray."""
    import ray

    if not ray.is_initialized():
        return None, None
    return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()


@dataclass(frozen=True)
class LocalMeter:
    """On the machine that trained the trial, holding its device lock (other trials there pause between steps)."""

    lock: object  # objectives.device.DeviceLock or NoLock
    threads: int | None = None

    def measure(self, model: torch.nn.Module, clip: torch.Tensor, *, reset_every: int | None, warmup: int,
                repeats: int) -> Measured:
        with self.lock.exclusive(self.threads):
            stats = measure_latency(model, clip, reset_every=reset_every, warmup=warmup, repeats=repeats)
        node_id, node_ip = _where()
        return Measured(stats=stats, node_id=node_id, node_ip=node_ip, threads=self.threads)


@dataclass(frozen=True)
class TargetMeter:
    """On the node carrying ``resource``: ``files`` turns the trained model into its artifact's files."""

    resource: str
    files: Callable[[torch.nn.Module], dict[str, bytes]]
    threads: int | None = None
    gates: dict[str, type] | None = None

    def measure(self, model: torch.nn.Module, clip: torch.Tensor, *, reset_every: int | None, warmup: int,
                repeats: int) -> Measured:
        return measure_on(self.resource, self.files(model), clip, threads=self.threads, reset_every=reset_every,
                          warmup=warmup, repeats=repeats, gates=self.gates)


def check_resource(resource: str) -> None:
    """Refuse a target no node of the connected Ray cluster carries (the measurement would wait forever)."""
    import ray

    from gatesearch.spaces import SpaceError

    if ray.cluster_resources().get(resource, 0) <= 0:
        hint = f"ray start --address ... --resources '{{\"{resource}\": 1}}'"
        raise SpaceError(f"latency.resource: no node of the Ray cluster carries resource {resource!r} "
                          f"(start the target device with: {hint})")


def artifact_files(model: torch.nn.Module, meta: dict) -> dict[str, bytes]:
    """The model's artifact (``export.write_files``) as bytes, to ship to another node."""
    from gatesearch.export import write_files

    with tempfile.TemporaryDirectory() as tmp:
        write_files(Path(tmp), model, dict(meta))
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}


def measure_on(resource: str, files: dict[str, bytes], clip: torch.Tensor, *, threads: int | None,
               reset_every: int | None, warmup: int, repeats: int, gates: dict[str, type] | None = None) -> Measured:
    """Time the artifact ``files`` on the node holding ``resource`` (waits there for the device's turn)."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    # outside the trial's placement group (Tune's bundles hold CPUs only): on whichever node carries the resource
    task = ray.remote(_measure).options(resources={resource: 1}, num_cpus=0, max_retries=0,
                                        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
    return ray.get(task.remote(files, clip, threads=threads, reset_every=reset_every, warmup=warmup, repeats=repeats,
                               gates=gates or {}))


def _measure(files: dict[str, bytes], clip: torch.Tensor, *, threads: int | None, reset_every: int | None,
             warmup: int, repeats: int, gates: dict[str, type]) -> Measured:
    """Runs on the target node: load the artifact as a deployment would, then time it holding the device alone."""
    from gatesearch.export import load_artifact
    from gatesearch.objectives.device import DeviceLock
    from gatesearch.policies import adopt

    adopt(gates)
    threads = threads or len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        model = load_artifact(Path(tmp)).model
    lock = DeviceLock()
    try:
        return LocalMeter(lock, threads).measure(model, clip, reset_every=reset_every, warmup=warmup, repeats=repeats)
    finally:
        lock.close()


__all__ = ["LocalMeter", "Measured", "TargetMeter", "artifact_files", "check_resource", "measure_on"]
