"""Latency measured on the target device: a Ray task on the node that carries the device's custom resource.

Trials train wherever Ray places them; the latency that ranks them must be the device's. The trial hands its
model over as the exported artifact's files (what a deployment loads), and a task that needs one unit of the
device's resource (``ray start --resources '{"target": 1}'`` on the device) loads and times it there: one unit,
one measurement at a time. On that node the measurement holds the device lock as a local one does, so a trial
training there pauses between steps. The result says which node measured it.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from gatesearch.objectives.latency import LatencyStats


@dataclass(frozen=True, kw_only=True)
class Measured:
    stats: LatencyStats
    node_id: str  # Ray node id of the node that measured
    node_ip: str
    threads: int  # torch threads the measurement ran with


def check_resource(resource: str) -> None:
    """Refuse a target no node of the connected Ray cluster carries (the measurement would wait forever)."""
    import ray

    if ray.cluster_resources().get(resource, 0) <= 0:
        hint = f"ray start --address ... --resources '{{\"{resource}\": 1}}'"
        raise LookupError(f"latency.resource: no node of the Ray cluster carries resource {resource!r} "
                          f"(start the target device with: {hint})")


def model_files(folder: Path) -> dict[str, bytes]:
    """An artifact folder as bytes, to ship to another node."""
    return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}


def measure_on(resource: str, files: dict[str, bytes], clip: torch.Tensor, *, threads: int | None,
               reset_every: int | None, warmup: int, repeats: int, gates: dict[str, type] | None = None) -> Measured:
    """Time the artifact ``files`` on the node holding ``resource`` (waits there for the device's turn)."""
    import ray

    task = ray.remote(_measure).options(resources={resource: 1}, num_cpus=0, max_retries=0)
    return ray.get(task.remote(files, clip, threads=threads, reset_every=reset_every, warmup=warmup, repeats=repeats,
                               gates=gates or {}))


def _measure(files: dict[str, bytes], clip: torch.Tensor, *, threads: int | None, reset_every: int | None,
             warmup: int, repeats: int, gates: dict[str, type]) -> Measured:
    """Runs on the target node: load the artifact as a deployment would, then time it holding the device alone."""
    import ray

    from gatesearch.export import load_artifact
    from gatesearch.objectives import measure_latency
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
        with lock.exclusive(threads):
            stats = measure_latency(model, clip, reset_every=reset_every, warmup=warmup, repeats=repeats)
    finally:
        lock.close()
    ctx = ray.get_runtime_context()
    return Measured(stats=stats, node_id=ctx.get_node_id(), node_ip=ray.util.get_node_ip_address(), threads=threads)


__all__ = ["Measured", "check_resource", "measure_on", "model_files"]
