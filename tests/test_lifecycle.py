"""A search's lifecycle without running one: fail-fast checks, the search record, finding a Ray's processes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from gatesearch.cli import BUILTIN_CONFIGS, main
from gatesearch.search import localray, record
from gatesearch.search.preflight import ServiceError, check_folder, check_ray_address, check_tracking
from gatesearch.search.recorder import failure_reason
from gatesearch.spaces import load_search_config, parse_search_config


def closed_port() -> int:
    """A local port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("flag, value, named", [
    ("--tracking-uri", "http://127.0.0.1:9", "tracking server http://127.0.0.1:9 is not reachable"),
    ("--ray-address", "127.0.0.1:9", "Ray cluster at 127.0.0.1:9 is not reachable"),
    ("--workdir", "afile/runs", "cannot be created"),
])
def test_unreachable_service_fails_fast_with_one_line(tmp_path, monkeypatch, flag, value, named):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "afile").write_text("not a folder")
    t0 = time.monotonic()
    r = CliRunner().invoke(main, ["search", "quick", flag, value])
    assert time.monotonic() - t0 <= 10
    assert r.exit_code != 0 and (r.exception is None or isinstance(r.exception, SystemExit))
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and named in lines[0], r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing written


def test_preflight_checks(tmp_path):
    check_folder(tmp_path / "new" / "deeper", "work folder")  # may be created: fine, and nothing is created
    assert not (tmp_path / "new").exists()
    check_tracking(f"sqlite:///{tmp_path}/mlflow.db")
    with pytest.raises(ServiceError, match="MLflow store folder .* cannot be created"):
        (tmp_path / "f").write_text("")
        check_tracking(f"sqlite:///{tmp_path}/f/mlflow.db")
    port = closed_port()
    with pytest.raises(ServiceError, match=f"tracking server https://127.0.0.1:{port} is not reachable"):
        check_tracking(f"https://127.0.0.1:{port}")
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(ServiceError, match="is not reachable"):
            check_ray_address(address)
    with pytest.raises(ServiceError, match="not host:port"):
        check_ray_address("somewhere")


def test_tracking_server_that_is_not_mlflow_is_refused_quickly(tmp_path):
    """Something listens but never answers HTTP: refused within the probe's timeout, not after MLflow's retries."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        t0 = time.monotonic()
        with pytest.raises(ServiceError, match="does not answer as an MLflow server"):
            check_tracking(f"http://127.0.0.1:{srv.getsockname()[1]}")
        assert time.monotonic() - t0 <= 10


def test_config_round_trips_through_the_record():
    """Resume reads the config back from the record: the same search, key for key."""
    cfg = load_search_config(BUILTIN_CONFIGS / "quick.yaml")
    again = parse_search_config(json.loads(json.dumps(cfg.to_dict())))
    assert again.to_dict() == cfg.to_dict()
    set_all = parse_search_config({"objective": "macs", "constraints": {"max_macs": 1e6},
                                   "hypervolume_reference": {"quality": 0.1, "macs": 2e6},
                                   "latency": {"resource": "target", "threads": 2}})
    assert parse_search_config(json.loads(json.dumps(set_all.to_dict()))) == set_all
    assert parse_search_config({"max_failures": 2}).max_failures == 2
    assert parse_search_config({"max_failures": None}).max_failures is None


def test_record_is_saved_atomically_and_found(tmp_path):
    def rec(sid, state, created):
        return record.SearchRecord(search_id=sid, config={"trials": 2}, tracking_uri="sqlite:///m.db",
                                   parent_run_id="p", storage_url="sqlite:///o.db", study_name=sid, state=state,
                                   ray_pids=(1, 2), created=created)

    record.save(tmp_path, rec("a", "finished", 3.0))
    record.save(tmp_path, rec("b", "interrupted", 1.0))
    record.save(tmp_path, rec("c", "running", 2.0))
    assert record.load(tmp_path, "b") == rec("b", "interrupted", 1.0)
    assert record.find(tmp_path, None).search_id == "c"  # latest unfinished
    assert record.find(tmp_path, "a").finished
    assert sorted(p.name for p in (tmp_path / "searches").iterdir()) == ["a.json", "b.json", "c.json"]
    with pytest.raises(LookupError, match="no search 'zz'"):
        record.find(tmp_path, "zz")
    (tmp_path / "searches" / "d.json").write_text("{broken")
    with pytest.raises(LookupError, match="damaged search record"):
        record.load(tmp_path, "d")
    with pytest.raises(LookupError, match="no unfinished search"):
        record.find(tmp_path / "elsewhere", None)


def test_a_held_search_cannot_be_driven_twice(tmp_path):
    with record.hold(tmp_path, "s"):
        with pytest.raises(record.SearchBusy, match=f"search s is running \\(driver pid {os.getpid()}\\)"):
            with record.hold(tmp_path, "s"):
                pass
    with record.hold(tmp_path, "s"):  # released when the holder is done
        pass


def test_resume_refuses_unknown_and_says_finished(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["resume"])
    assert r.exit_code != 0 and "no unfinished search" in r.output
    record.save(tmp_path / "gatesearch_runs", record.SearchRecord(
        search_id="done-1", config={}, tracking_uri="sqlite:///m.db", parent_run_id="p", storage_url="sqlite:///o.db",
        study_name="done-1", state="finished", message="4 completed, 0 failed of 4 trials"))
    r = CliRunner().invoke(main, ["resume", "done-1"])
    assert r.exit_code == 0 and "search done-1 finished (4 completed" in r.output and "nothing to resume" in r.output


HOLDER = """
import signal, sys, time
f = open(sys.argv[1], "w")
if sys.argv[2] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(60)
"""


def test_clean_up_stops_only_the_processes_of_that_ray(tmp_path):
    """Processes holding files in the instance's temp dir are stopped (SIGKILL for those ignoring SIGTERM);
    a recorded pid that holds nothing there is left alone."""
    temp = tmp_path / "gs-x"
    temp.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", HOLDER, str(path), mode], stdout=subprocess.PIPE)
             for path, mode in ((temp / "a.log", "plain"), (temp / "b.log", "stubborn"),
                                (tmp_path / "other.log", "plain"))]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == b"ready"
        mine, stubborn, other = (p.pid for p in procs)
        assert set(localray.ray_processes(temp)) == {mine, stubborn}
        stopped = localray.clean_up(temp, (mine, other), grace_s=1.0)
        assert set(stopped) == {mine, stubborn}
        for p in procs[:2]:
            assert p.wait(5) in (-signal.SIGTERM, -signal.SIGKILL)
        assert procs[1].returncode == -signal.SIGKILL
        assert procs[2].poll() is None and not temp.exists()
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_temp_dir_keeps_unix_sockets_short():
    """Ray's raylet socket lives at <temp>/session_<date>_<time>_<pid>/sockets/raylet: under 107 bytes."""
    temp = localray.temp_dir_for("/a/very/long/work/folder/" * 8 + "search-20250101-000000")
    assert len(f"{temp}/session_2025-01-01_00-00-00_000000_4194304/sockets/plasma_store") < 107


@pytest.mark.parametrize("error, reason", [
    ("Traceback...\nray.exceptions.RayTaskError(FloatingPointError): ray::f()\nFloatingPointError: training "
     "diverged at epoch 1 (loss nan); lower the learning rate", "diverged: FloatingPointError: training diverged"),
    ("Traceback...\nRuntimeError: [enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory",
     "out of memory: RuntimeError: [enforce fail"),
    ("ray.exceptions.OutOfMemoryError: Task was killed due to the node running low on memory.\nMemory on the node",
     "out of memory: ray.exceptions.OutOfMemoryError: Task was killed"),
    ("Traceback...\nValueError: bad knob\n", "crashed: ValueError: bad knob"),
    ("", "crashed: unknown error"),
])
def test_failure_reason_is_one_line(error, reason):
    assert failure_reason(error).startswith(reason)
    assert "\n" not in failure_reason(error)
