"""A search that survives (issue 16): killed or interrupted in a subprocess, then resumed to its full budget.

Each search runs as its own ``gatesearch`` process with its own local Ray (bound to 127.0.0.1). Whatever happens,
the fixture stops the driver and the processes of its Ray by pid.
"""

import dataclasses
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gatesearch.search import localray, record

pytestmark = pytest.mark.slow

CONFIG = """
name: survive
trials: {trials}
max_concurrent: 1
seed: {seed}
{extra}
model: {{from_scratch: true}}  # every trial trains for space.epochs: a trial is running when the search is stopped
data: {{train_clips: {clips}, val_clips: 8, synthetic: {{height: 32, width: 32}}}}
evaluation: {{frames: 8, latency_repeats: 2}}
space:
  gate: {gate}
  clip_length: [2, 4]
  lr: {{low: 0.003, high: 0.01, log: true}}
  epochs: {epochs}
"""


class Search:
    """One ``gatesearch`` command in a subprocess; threads read its stdout and stderr, so no wait blocks on a pipe
    (each wait has a deadline)."""

    def __init__(self, cwd: Path, *args: str) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("MLFLOW_TRACKING_URI", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "gatesearch.cli", *args], cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []  # stderr, as far as a wait has read it
        self._err: queue.Queue[str | None] = queue.Queue()
        self._out: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(self.proc.stderr, self._err.put), daemon=True),
                         threading.Thread(target=self._read, args=(self.proc.stdout, self._out.append), daemon=True)]
        for t in self._readers:
            t.start()

    @staticmethod
    def _read(pipe, put) -> None:
        for line in pipe:
            put(line)
        put(None)

    def wait_for(self, text: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._err.get(timeout=left)
            except queue.Empty:
                break
            if line is None:  # the process closed its stderr
                self._err.put(None)
                break
            self.lines.append(line.rstrip())
            if text in line:
                return
        raise AssertionError(f"never printed {text!r}:\n" + "\n".join(self.lines))

    def finish(self, timeout: float = 300) -> tuple[int, str, list[str]]:
        """Wait for the process to exit: (exit code, stdout, the non-empty stderr lines)."""
        self.proc.wait(timeout=timeout)
        for t in self._readers:
            t.join(timeout=10)
        while not self._err.empty():
            line = self._err.get_nowait()
            if line is not None:
                self.lines.append(line.rstrip())
        out = "".join(line for line in self._out if line is not None)
        return self.proc.returncode, out, [line for line in self.lines if line.strip()]


@pytest.fixture
def searches(tmp_path):
    """Start searches in ``tmp_path``; afterwards stop every driver and every process of their Ray, by pid."""
    started: list[Search] = []

    def start(*args: str) -> Search:
        started.append(Search(tmp_path, *args))
        return started[-1]

    yield start
    for s in started:
        if s.proc.poll() is None:
            os.killpg(s.proc.pid, signal.SIGKILL)  # its own session: the driver and anything it forked
            s.proc.wait(timeout=30)
    folder = tmp_path / "gatesearch_runs" / "searches"
    for path in folder.glob("*.json") if folder.is_dir() else []:
        rec = record.load(tmp_path / "gatesearch_runs", path.stem)
        if rec.ray_temp_dir:
            localray.clean_up(Path(rec.ray_temp_dir), rec.ray_pids, grace_s=0.5)


def write_config(tmp_path: Path, *, trials: int, gate: str = "[dense, input_norm, output_norm]", seed: int = 3,
                 epochs: int = 1, clips: int = 16, extra: str = "") -> str:
    (tmp_path / "s.yaml").write_text(CONFIG.format(trials=trials, gate=gate, seed=seed, epochs=epochs, clips=clips,
                                                   extra=extra))
    return "s.yaml"


def only_record(tmp_path: Path) -> record.SearchRecord:
    recs = list((tmp_path / "gatesearch_runs" / "searches").glob("*.json"))
    assert len(recs) == 1
    return record.load(tmp_path / "gatesearch_runs", recs[0].stem)


def ray_pids(rec: record.SearchRecord) -> set[int]:
    """The processes of the search's local Ray: those it recorded, and whatever holds files in its temp dir."""
    assert rec.ray_temp_dir and rec.ray_pids
    return set(rec.ray_pids) | set(localray.ray_processes(Path(rec.ray_temp_dir)))


def alive(pid: int) -> bool:
    """Running, by its state in /proc (a zombie nobody reaped yet is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stores(rec: record.SearchRecord):
    """(Optuna trials, MLflow parent runs, MLflow trial runs) of the search."""
    import optuna
    from mlflow.tracking import MlflowClient

    trials = optuna.load_study(study_name=rec.study_name, storage=rec.storage_url).get_trials(deepcopy=False)
    client = MlflowClient(rec.tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.`gatesearch.search_id` = '{rec.search_id}'")
    parents = [r for r in runs if r.data.tags["gatesearch.kind"] == "search"]
    children = [r for r in runs if r.data.tags["gatesearch.kind"] == "trial"]
    return trials, parents, children


def assert_settled(rec: record.SearchRecord, *, completed: int, parent_status: str) -> tuple[list, list]:
    """Nothing RUNNING in either store, one parent, each trial id completed at most once."""
    import optuna

    trials, parents, children = stores(rec)
    assert [t.number for t in trials if t.state == optuna.trial.TrialState.RUNNING] == []
    assert [r.info.run_name for r in children if r.info.status == "RUNNING"] == []
    assert len(parents) == 1 and parents[0].info.run_id == rec.parent_run_id
    assert parents[0].info.status == parent_status
    done = [t.user_attrs["tune_trial_id"] for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    finished = [r.data.tags["gatesearch.trial_id"] for r in children if r.info.status == "FINISHED"]
    assert len(done) == len(set(done)) == completed
    assert sorted(finished) == sorted(done)
    for t in trials:
        if t.state == optuna.trial.TrialState.FAIL:
            assert t.user_attrs["reason"]
    return trials, children


def test_sigkill_then_resume_completes_the_budget(tmp_path, searches):
    cfg = write_config(tmp_path, trials=4)
    s = searches("search", cfg)
    s.wait_for("done 2/4")
    rec = only_record(tmp_path)
    pids = ray_pids(rec)
    s.proc.kill()  # SIGKILL: nothing of the driver runs after this
    s.proc.wait(timeout=30)
    killed = record.load(tmp_path / "gatesearch_runs", rec.search_id)
    assert killed.state == "running"  # as the killed driver left it
    # as if it had been killed before it recorded its Ray: resume finds that Ray by the search's own name
    record.save(tmp_path / "gatesearch_runs", dataclasses.replace(killed, ray_temp_dir=None, ray_pids=()))

    r = searches("resume", "--json")
    code, out, lines = r.finish()
    assert code == 0, "\n".join(lines)
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["search_id"] == rec.search_id and summary["state"] == "finished"
    assert summary["trials_completed"] == 4 and summary["trials_failed"] == 0 and summary["attempts"] == 2
    assert any("left by the search's previous Ray" in line for line in lines)  # stopped before trials ran
    assert [p for p in pids if alive(p)] == []  # no process of the killed Ray instance is left
    after = only_record(tmp_path)
    assert after.state == "finished" and after.parent_run_id == rec.parent_run_id
    assert_settled(after, completed=4, parent_status="FINISHED")
    assert [p for p in ray_pids(after) if alive(p)] == []  # nor of the resumed one's

    r = searches("resume", rec.search_id)
    code, out, _ = r.finish()
    assert code == 0 and "finished" in out and "nothing to resume" in out


def test_sigint_stops_cleanly_then_resumes(tmp_path, searches, test_gates):
    import optuna

    cfg = write_config(tmp_path, trials=3, gate="[test_slow]", epochs=2, clips=48)  # seconds a trial: one runs
    s = searches("search", cfg)
    s.wait_for("done 1/3")
    time.sleep(1)
    rec = only_record(tmp_path)
    pids = ray_pids(rec)
    t0 = time.monotonic()
    s.proc.send_signal(signal.SIGINT)
    code, _, lines = s.finish(timeout=60)
    assert time.monotonic() - t0 <= 15
    assert code == 128 + signal.SIGINT
    assert f"gatesearch resume {rec.search_id}" in lines[-1] and "interrupted" in lines[-1]
    assert [p for p in pids if alive(p)] == []
    stopped = only_record(tmp_path)
    assert stopped.state == "interrupted"
    trials, children = assert_settled(stopped, completed=1, parent_status="KILLED")
    interrupted = [t for t in trials if t.user_attrs.get("reason") == "interrupted"]
    assert interrupted and all(t.state == optuna.trial.TrialState.FAIL for t in interrupted)
    killed = {r.data.tags["gatesearch.trial_id"] for r in children if r.info.status == "KILLED"}
    assert killed == {t.user_attrs["tune_trial_id"] for t in interrupted}

    code, out, lines = searches("resume", stopped.search_id, "--json").finish()
    assert code == 0, "\n".join(lines)
    assert json.loads(out.strip().splitlines()[-1])["trials_completed"] == 3
    assert_settled(only_record(tmp_path), completed=3, parent_status="FINISHED")


TEST_GATES = '''
"""Gates that fail the way real trials fail (and one that is slow), registered in the driver and every Ray worker."""
import torch

from gatesearch.policies.base import Policy, register_policy


@register_policy("test_diverges")
class Diverges(Policy):
    """Test gate: its loss is NaN, so training diverges."""

    @classmethod
    def keep_all(cls):
        return {}

    def loss(self, model, *, output=None, batch=None):
        return torch.tensor(float("nan"))


@register_policy("test_slow")
class Slow(Policy):
    """Test gate: every training step takes at least 0.3 s, so a trial is surely running when the search is
    stopped, however fast the machine."""

    @classmethod
    def keep_all(cls):
        return {}

    def loss(self, model, *, output=None, batch=None):
        import time

        time.sleep(0.3)
        return torch.zeros(())


@register_policy("test_out_of_memory")
class OutOfMemory(Policy):
    """Test gate: training runs out of memory."""

    @classmethod
    def keep_all(cls):
        return {}

    def loss(self, model, *, output=None, batch=None):
        raise MemoryError("injected: cannot allocate the gate's buffers")
'''


@pytest.fixture
def test_gates(tmp_path, monkeypatch):
    """Every Python process of the test's searches (Ray workers too) registers the failing gates at start-up."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(TEST_GATES)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))


def test_a_second_ctrl_c_exits_at_once_and_leaves_no_ray_behind(tmp_path, searches, test_gates):
    cfg = write_config(tmp_path, trials=3, gate="[test_slow]", epochs=2, clips=48)
    s = searches("search", cfg)
    s.wait_for("started")
    pids = ray_pids(only_record(tmp_path))
    s.proc.send_signal(signal.SIGINT)
    s.wait_for("press Ctrl-C again to exit at once")
    t0 = time.monotonic()
    s.proc.send_signal(signal.SIGINT)
    code, _, lines = s.finish(timeout=30)
    assert time.monotonic() - t0 <= 5
    assert code == 128 + signal.SIGINT and "exiting at once" in lines[-1]
    assert [p for p in pids if alive(p)] == []
    _, parents, children = stores(only_record(tmp_path))  # MLflow shows it stopped, not RUNNING
    assert parents[0].info.status == "KILLED"
    assert [r.info.run_name for r in children if r.info.status == "RUNNING"] == []


def test_failing_trials_are_recorded_and_the_search_goes_on(tmp_path, searches, test_gates):
    """Trials that diverge (NaN) or run out of memory are FAILED with their reason in both stores; the search
    goes on and the other trials complete."""
    import optuna

    # seed 10 draws dense, test_diverges, test_out_of_memory, dense (TPE's random start-up phase)
    cfg = write_config(tmp_path, trials=4, gate="[dense, test_diverges, test_out_of_memory]", seed=10)
    code, out, lines = searches("search", cfg, "--json").finish()
    assert code == 0, "\n".join(lines)
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["trials_completed"] == 2 and summary["trials_failed"] == 2
    trials, children = assert_settled(only_record(tmp_path), completed=summary["trials_completed"],
                                      parent_status="FINISHED")
    expected = {"dense": None, "test_diverges": "diverged: FloatingPointError: training diverged",
                "test_out_of_memory": "out of memory: MemoryError: injected"}
    runs = {r.data.tags["gatesearch.trial_id"]: r for r in children}
    assert {t.params["gate"] for t in trials} == set(expected)  # each kind of trial ran
    for t in trials:
        run = runs[t.user_attrs["tune_trial_id"]]
        if expected[t.params["gate"]] is None:
            assert t.state == optuna.trial.TrialState.COMPLETE and run.info.status == "FINISHED"
        else:
            assert t.state == optuna.trial.TrialState.FAIL and run.info.status == "FAILED"
            assert t.user_attrs["reason"].startswith(expected[t.params["gate"]])
            assert run.data.tags["gatesearch.reason"] == t.user_attrs["reason"]


def test_max_failures_stops_the_search_with_one_line(tmp_path, searches, test_gates):
    cfg = write_config(tmp_path, trials=4, gate="test_diverges", extra="max_failures: 1")
    code, _, lines = searches("search", cfg).finish()
    assert code == 1
    assert "stopped: 2 trials failed, more than max_failures (1)" in lines[-1], "\n".join(lines)
    assert "gatesearch resume" in lines[-1]
    assert_settled(only_record(tmp_path), completed=0, parent_status="FAILED")


def test_a_long_trial_killed_mid_training_continues_from_its_checkpoint(tmp_path, searches):
    """SIGKILL after a trial checkpointed two of its epochs: the resumed search runs its parameters from epoch 2
    under a new trial id (tagged with the one it continues) instead of training it again."""
    import optuna

    from gatesearch.search.checkpoint import LONG_TRIAL_EPOCHS, TrainState

    cfg = write_config(tmp_path, trials=2, epochs=LONG_TRIAL_EPOCHS, clips=64)
    s = searches("search", cfg)
    s.wait_for("started")
    first = s.lines[-1].split()[0]
    state = tmp_path / "gatesearch_runs" / "ray"
    deadline = time.monotonic() + 300
    while not list(state.glob(f"*/{first}/checkpoint_000001/state.json")) and time.monotonic() < deadline:
        time.sleep(0.2)
    s.proc.kill()
    s.proc.wait(timeout=30)
    code, out, lines = searches("resume", "--json").finish()
    assert code == 0, "\n".join(lines)
    # the orphaned trial may checkpoint another epoch until resume stops the dead driver's Ray: read which it found
    found = [re.search(rf"trial {first} continues from its checkpoint after epoch (\d+)", line) for line in lines]
    saved = next(int(m.group(1)) for m in found if m)
    states = [TrainState.load(p.parent) for p in state.glob(f"*/{first}/checkpoint_*/state.json")]
    assert 2 <= saved == max(s.epoch for s in states if s is not None) < LONG_TRIAL_EPOCHS  # the last complete one
    assert json.loads(out.strip().splitlines()[-1])["trials_completed"] == 2
    trials, children = assert_settled(only_record(tmp_path), completed=2, parent_status="FINISHED")
    killed = next(t for t in trials if t.user_attrs["tune_trial_id"] == first)
    heir = next(t for t in trials if t.user_attrs.get("continues") == first)
    assert killed.state == optuna.trial.TrialState.FAIL and killed.user_attrs["reason"] == "interrupted"
    assert heir.state == optuna.trial.TrialState.COMPLETE and heir.params == killed.params
    run = next(r for r in children if r.data.tags["gatesearch.trial_id"] == heir.user_attrs["tune_trial_id"])
    assert run.data.tags["gatesearch.continues"] == first
    from mlflow.tracking import MlflowClient

    steps = [m.step for m in MlflowClient(only_record(tmp_path).tracking_uri).get_metric_history(run.info.run_id,
                                                                                                "train_loss")]
    assert steps == list(range(saved + 1, LONG_TRIAL_EPOCHS + 1))  # only the epochs after the checkpoint ran
