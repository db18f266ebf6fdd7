"""Latency on the target device: a 2-node local Ray cluster (a head, and a worker carrying the custom resource
``target``), both started here on 127.0.0.1 and stopped after by process group; every trial's latency must be
measured on the worker."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

import gatesearch

pytestmark = pytest.mark.slow

CONFIG = {
    "name": "target",
    "trials": 2,
    "max_concurrent": 2,
    "model": {"from_scratch": True},
    "data": {"train_clips": 16, "val_clips": 4, "synthetic": {"height": 32, "width": 32}},
    "evaluation": {"frames": 4, "latency_repeats": 2},
    "space": {"gate": ["dense", "input_norm"], "clip_length": 2, "epochs": 1, "block_size": 2},
    "latency": {"threads": 1},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """End the ``ray start --block`` we started and everything it started: its own process group (GCS, raylet and
    workers may outlive a ``ray start`` that took SIGTERM, so the group gets SIGKILL after the grace period)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


@contextlib.contextmanager
def _ray_node(args: list[str], env: dict):
    """A Ray node in a process group of its own. Its temp folder is private: ``ray start`` records the cluster it
    started there (ray_current_cluster), and in the shared /tmp/ray that record would send every other ``ray.init()``
    on this machine to this cluster, and to nothing once it is stopped."""
    proc = subprocess.Popen(["ray", "start", "--block", "--node-ip-address", "127.0.0.1", "--disable-usage-stats",
                             *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        yield proc
    finally:
        _stop(proc)


def _target_node(address: str, env: dict, timeout: float = 60) -> str:
    """The node id of the node carrying ``target``, once both nodes are up."""
    probe = (f"import json, ray; ray.init(address={address!r}, logging_level='ERROR'); "
             "print(json.dumps([(n['NodeID'], n['Resources']) for n in ray.nodes() if n['Alive']]))")
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=30)
        nodes = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 and r.stdout.strip() else []
        targets = [node for node, res in nodes if res.get("target")]
        if len(nodes) == 2 and targets:
            return targets[0]
        time.sleep(2)
    raise AssertionError(f"the 2-node cluster did not come up in {timeout} s")


def test_every_trials_latency_is_measured_on_the_target_node(tmp_path):
    from mlflow.tracking import MlflowClient

    root = str(Path(gatesearch.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    address = f"127.0.0.1:{_free_port()}"
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(CONFIG))
    temp = tempfile.mkdtemp(prefix="gsray", dir="/tmp")  # short: Ray's socket paths live under it
    head = ["--head", "--port", address.split(":")[1], "--num-cpus", "1", "--include-dashboard", "false",
            "--temp-dir", temp]
    try:
        with _ray_node(head, env), _ray_node(["--address", address, "--num-cpus", "1", "--resources",
                                              '{"target": 1}'], env):
            worker = _target_node(address, env)
            r = subprocess.run([sys.executable, "-c", "from gatesearch.cli import main; main()", "search", "s.yaml",
                                "--json", "--ray-address", address, "--latency-on", "target"],
                               cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["trials_completed"] == 2, r.stderr[-4000:]
    client = MlflowClient(summary["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name("target").experiment_id],
                              "tags.`gatesearch.kind` = 'trial'")
    assert len(runs) == 2
    assert [run.data.tags.get("gatesearch.latency_node") for run in runs] == [worker, worker]
    assert all(row["latency_node"] == worker for row in summary["pareto"])


def test_a_target_no_node_carries_is_refused_in_one_line(cli):
    r = cli("search", "quick", "--trials", "1", "--latency-on", "no_such_device")
    assert r.exit_code != 0
    assert "latency.resource: no node of the Ray cluster carries resource 'no_such_device'" in r.output
