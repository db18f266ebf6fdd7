"""The driver side of a running search: each trial's MLflow child run, live from start to end, and the progress.

Runs are written from the driver (a Ray Tune callback), so trials on remote Ray nodes need no access to the
tracking store. ``Recorder`` opens a trial's run when the trial starts, logs each per-epoch report at its
epoch, and at the end logs the final metrics with the model and closes the run; it keeps the table of finished
trials the Pareto front is built from. A finished trial is checked against the search's constraints and counted in
the hypervolume (a step metric of the parent); one that early stopping stopped is closed KILLED with its rung.
``tune_callback`` wraps it in the ``tune.Callback`` Tune calls.

A trial's end goes to the search's Optuna study too (``study.StudyLedger``): a failed trial is failed there with
a one-line reason (``failure_reason``), and trials the search stopped under are failed as ``interrupted``, so a
resumed search knows which trials count against its budget.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from gatesearch.spaces.objectives import Constraints

from .dominance import EPOCH, EPOCHS
from .hypervolume import HypervolumeHistory
from .pareto import pareto_indices
from .progress import PlainProgress, Progress, Running, SearchState
from .stopping import StopRequest
from .study import CONTINUES, INTERRUPTED, StudyLedger, Tally
from .tracking import FEASIBLE_TAG, LATENCY_NODE_TAG, PRUNED_TAG, Tracker, now_ms


def format_params(params: dict[str, Any]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return " ".join(f"{k}={fmt(v)}" for k, v in params.items())


def trial_params(trial_cfg: dict[str, Any]) -> dict[str, Any]:
    """What a trial's run records as params: the shared fields and its own gate's knobs, nothing unset."""
    from gatesearch.spaces import TrialConfig

    return {k: v for k, v in TrialConfig.from_dict(trial_cfg).to_dict().items() if v is not None}


def trial_row(trial_cfg: dict[str, Any], metrics: dict[str, Any], trial_id: str) -> dict[str, Any]:
    """One finished trial as a row of the results table (what ``pareto.json`` holds)."""
    from gatesearch.spaces import TrialConfig

    trial = TrialConfig.from_dict(trial_cfg)
    trained = {"lr": trial.lr} if trial.epochs else {}  # a trial that did not train has no lr
    ci = (metrics.get("quality_drop_ci_low"), metrics.get("quality_drop_ci_high"))
    return {
        "trial_id": trial_id,
        "gate": trial.gate,
        "params": {**trial.knobs, "clip_length": trial.clip_length, **trained, "backbone": trial.backbone},
        "quality": metrics.get("quality"),
        "quality_drop": metrics.get("quality_drop"),  # dense − trial on the same clips (paired)
        "quality_drop_ci": list(ci) if None not in ci else None,  # its 95 % bootstrap interval
        "quality_clips": metrics.get("quality_clips"),
        "latency_ms": metrics.get("latency_ms"),
        "speedup": metrics.get("speedup"),  # dense latency in this search ÷ the trial's
        "macs": metrics.get("macs"),
        "dense_macs": metrics.get("dense_macs"),
        "mean_density": metrics.get("mean_density"),
        "latency_node": metrics.get("latency_node"),
    }


class Recorder:
    """Records each trial under the search's parent run and in its study, and keeps the progress display up to date.

    Starts from what earlier attempts of the search recorded (``prior``). ``stopped`` (trial id -> epoch of the
    rung) holds the trials early stopping stopped. Once more than ``max_failures`` trials failed in this attempt, the
    search is asked to stop (``stop``); a trial that errs while the search stops, or is still running when it
    stopped, is recorded as killed.
    """

    def __init__(self, tracker: Tracker, parent: str, search_id: str, *, trials: int, cost_key: str,
                 ledger: StudyLedger | None = None, stop: StopRequest | None = None, max_failures: int | None = None,
                 prior: Tally | None = None, progress: Progress | None = None,
                 echo: Callable[[str], None] = print, constraints: Constraints = Constraints(),
                 stopped: Mapping[str, int] | None = None, hypervolume: HypervolumeHistory | None = None) -> None:
        self.tracker, self.parent, self.search_id = tracker, parent, search_id
        self.cost_key = cost_key
        self.ledger, self.stop, self.max_failures = ledger, stop or StopRequest(), max_failures
        self.constraints, self.stopped = constraints, {} if stopped is None else stopped
        self.hypervolume = hypervolume or HypervolumeHistory()
        prior = prior or Tally()
        self.progress = progress or PlainProgress(echo)
        self.state = SearchState(search_id=search_id, trials=trials, done=len(prior.rows), failed=len(prior.failed),
                                 stopped=len(prior.pruned), earlier=prior.used)
        self.rows: list[dict[str, Any]] = []  # finished trials
        self.failed: list[str] = list(prior.failed)  # ids of failed trials
        self.pruned: list[str] = list(prior.pruned)  # ids of trials early stopping stopped
        self.killed: list[str] = []  # ids of trials killed in this attempt
        self.new_failures = 0  # failed in this attempt (what max_failures bounds)
        # trial id -> MLflow run id, every trial started (and the earlier attempts' finished ones)
        self.runs: dict[str, str] = {r["trial_id"]: r["run_id"] for r in prior.rows if r.get("run_id")}
        self.models: dict[str, str] = {}  # trial id -> MLflow logged model id
        self._open: set[str] = set()  # trials whose run is still RUNNING
        self._epoch: dict[str, int] = {}  # trial id -> last epoch reported
        self._epoch_keys: dict[str, set[str]] = {}  # trial id -> metrics reported per epoch (not logged again)
        for row in prior.rows:  # earlier attempts' trials, logged then: in the table and the hypervolume again
            self.rows.append(row)
            self.hypervolume.add(prior.metrics[row["trial_id"]], feasible=row["feasible"])
        if self.rows:
            self.state.front = self.front_summary()

    @contextlib.contextmanager
    def showing(self) -> Iterator[None]:
        """The progress display runs within this block (the trials' events come in inside it)."""
        self.progress.start(self.state)
        try:
            yield
        finally:
            self.progress.stop()

    # -- Tune's events ------------------------------------------------------------------------------------------
    def started(self, trial_id: str, trial_cfg: dict, *, start_ms: int | None = None,
                continues: str | None = None) -> None:
        """``continues``: the interrupted trial this one takes over from its last checkpoint."""
        if trial_id in self._open:  # Tune restarting a trial it had started: the same run goes on
            return
        params = trial_params(trial_cfg)
        self.runs[trial_id] = self.tracker.start_trial(self.parent, self.search_id, trial_id, params,
                                                       start_ms=start_ms, continues=continues)
        self._open.add(trial_id)
        self.state.running[trial_id] = Running(trial_id=trial_id, gate=params["gate"],
                                               epochs=int(params.get("epochs") or 0))
        knobs = {k: v for k, v in params.items() if k not in ("backbone", "width", "task", "gate", "epochs",
                                                               "batch_size", "seed")}
        then = f" (continues {continues})" if continues else ""
        self.progress.line(f"{trial_id} started: {params['gate']} {format_params(knobs)}{then}")
        self.progress.refresh()

    def epoch(self, trial_id: str, epoch: int, metrics: dict[str, Any], *, timestamp_ms: int | None = None) -> None:
        """A per-epoch report: its metrics at step ``epoch`` (1-based)."""
        self.tracker.log_metrics(self.runs[trial_id], metrics, step=epoch, timestamp_ms=timestamp_ms)
        self._epoch[trial_id] = epoch
        self._epoch_keys.setdefault(trial_id, set()).update(metrics)
        if trial_id in self.state.running:
            self.state.running[trial_id].epoch = epoch
        self.progress.refresh()

    def finished(self, trial_id: str, trial_cfg: dict, metrics: dict, files: Path | None, *,
                 end_ms: int | None = None) -> None:
        rid = self.runs.get(trial_id) or self._late_start(trial_id, trial_cfg)
        if trial_id in self.stopped:
            return self._pruned(trial_id, rid, self.stopped[trial_id], end_ms=end_ms)
        row = trial_row(trial_cfg, metrics, trial_id)
        violations = self.constraints.violations(metrics)
        row["feasible"] = all(v <= 0 for v in violations.values())
        tags = {LATENCY_NODE_TAG: row["latency_node"]} if row["latency_node"] else {}
        if violations:
            tags[FEASIBLE_TAG] = str(row["feasible"]).lower()
        self.tracker.set_tags(rid, tags)
        metrics = {**metrics, **{f"constraint.{k}": v for k, v in violations.items()}}
        step = self._epoch.get(trial_id, 0)
        model_id = self.tracker.log_model(rid, trial_id, files, step=step) if files is not None else None
        if model_id:
            self.models[trial_id] = model_id
        seen = self._epoch_keys.get(trial_id, set())
        self.tracker.log_metrics(rid, {k: v for k, v in metrics.items() if k not in seen}, step=step,
                                 model_id=model_id)
        self.tracker.end_trial(rid, status="FINISHED", end_ms=end_ms)
        self._open.discard(trial_id)
        row["run_id"] = rid
        self.rows.append(row)
        hv = self.hypervolume.add(metrics, feasible=row["feasible"])
        if hv is not None:
            self.tracker.log_metrics(self.parent, {"hypervolume": hv}, step=len(self.hypervolume.values))
        self.state.running.pop(trial_id, None)
        self.state.done += 1
        self.state.front = self.front_summary()
        budget = "" if row["feasible"] else " (over budget: " + ", ".join(
            k for k, v in violations.items() if v > 0) + ")"
        versus = ""
        if row["quality_drop"] is not None and row["speedup"] is not None:
            versus = f" (drop {row['quality_drop']:+.3f} {_interval(row['quality_drop_ci'])}, {row['speedup']:.2f}x)"
        self.progress.line(f"{trial_id} {row['gate']} {format_params(row['params'])} -> quality {row['quality']:.3f}"
                           f"{versus}, {row['latency_ms']:.2f} ms/frame, {row['macs'] / 1e6:.1f} MMACs{budget}")
        self.progress.refresh()

    def _pruned(self, trial_id: str, rid: str, rung: int, *, end_ms: int | None) -> None:
        """Early stopping stopped the trial at ``rung``: its per-epoch metrics are all it logged."""
        self.tracker.set_tags(rid, {PRUNED_TAG: str(rung)})
        self.tracker.end_trial(rid, status="KILLED", end_ms=end_ms)
        self._open.discard(trial_id)
        self.pruned.append(trial_id)
        self.state.running.pop(trial_id, None)
        self.state.stopped += 1
        self.progress.line(f"{trial_id} stopped at epoch {rung}: dominated at its rung")
        self.progress.refresh()

    def failed_trial(self, trial_id: str, trial_cfg: dict, error: str, *, end_ms: int | None = None) -> None:
        if self.stop.requested:  # an error while the search stops is the stop's doing, not the trial's
            self.kill(trial_id, trial_cfg, INTERRUPTED)
            return
        rid = self.runs.get(trial_id) or self._late_start(trial_id, trial_cfg)
        reason = failure_reason(error)
        self.tracker.end_trial(rid, status="FAILED", end_ms=end_ms, error=error, reason=reason)
        if self.ledger is not None:
            self.ledger.fail(trial_id, reason)
        self._open.discard(trial_id)
        self.failed.append(trial_id)
        self.new_failures += 1
        self.state.running.pop(trial_id, None)
        self.state.failed += 1
        self.progress.line(f"{trial_id} FAILED: {reason}")
        self.progress.refresh()
        if self.max_failures is not None and self.new_failures > self.max_failures:
            self.stop.request(f"{self.new_failures} trials failed, more than max_failures ({self.max_failures}); "
                              f"last: {reason}")

    def kill(self, trial_id: str, trial_cfg: dict, reason: str) -> None:
        """A trial that did not end by itself: its run KILLED and its Optuna trial failed, with ``reason``."""
        rid = self.runs.get(trial_id) or self._late_start(trial_id, trial_cfg)
        self.tracker.end_trial(rid, status="KILLED", reason=reason)
        if self.ledger is not None:
            self.ledger.fail(trial_id, reason)
        self._open.discard(trial_id)
        self.killed.append(trial_id)
        self.state.running.pop(trial_id, None)
        self.progress.line(f"{trial_id} KILLED: {reason}")

    def close_open_runs(self, reason: str = INTERRUPTED) -> list[str]:
        """Kill the trials still running (the search stopped under them); returns their ids."""
        left = sorted(self._open)
        for trial_id in left:
            self.kill(trial_id, {}, reason)
        return left

    def _late_start(self, trial_id: str, trial_cfg: dict) -> str:
        """A trial whose start was not seen (its run is opened now)."""
        self.started(trial_id, trial_cfg)
        return self.runs[trial_id]

    # -- the front ------------------------------------------------------------------------------------------------
    def front_summary(self) -> dict[str, Any]:
        """What the status line says of the front (of the trials within the constraints): its size, the best
        quality, and the hypervolume once there is one."""
        feasible = [r for r in self.rows if r["feasible"]]
        front = pareto_indices([(r["quality"], r[self.cost_key]) for r in feasible])
        out = {"front": len(front), "best quality": max((r["quality"] for r in feasible), default=float("nan"))}
        if self.hypervolume.current is not None:
            out["hypervolume"] = f"{self.hypervolume.current:.4g}"
        return out


def failure_reason(error: str) -> str:
    """One line saying why a trial failed: out of memory, diverged (NaN), or the exception it crashed with."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    raised = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b[^:]*:", line)]
    last = (raised or lines or ["unknown error"])[-1][:300]
    low = error.lower()
    if any(k in low for k in ("out of memory", "outofmemoryerror", "memoryerror", "can't allocate memory")):
        return f"out of memory: {last}"
    if any(k in low for k in ("floatingpointerror", "diverged", "nan loss")):
        return f"diverged: {last}"
    return f"crashed: {last}"


def _ray_keys() -> frozenset[str]:
    """What Ray Tune adds to every report (never logged as metrics)."""
    from ray.tune import result as r

    return frozenset(r.AUTO_RESULT_KEYS) | {r.DONE, r.TRIAL_ID, r.EXPERIMENT_TAG, r.SHOULD_CHECKPOINT,
                                            r.TIMESTEPS_THIS_ITER, r.EPISODES_THIS_ITER, r.RESULT_DUPLICATE}


def trial_metrics(result: dict[str, Any], ray_keys: frozenset[str]) -> dict[str, Any]:
    """A Tune report without Ray's bookkeeping (pid, timestamp, training_iteration, ...), ``epoch`` and ``epochs``."""
    return {k: v for k, v in result.items() if k not in ray_keys and k not in (EPOCH, EPOCHS)}


def _interval(ci) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""


def tune_callback(recorder: Recorder):
    """The ``tune.Callback`` that hands Tune's trial events to ``recorder``. A report that carries ``epoch`` is a
    per-epoch one; the trial's last report (with its model as the checkpoint) has none."""
    from ray import tune

    ray_keys = _ray_keys()

    class RecorderCallback(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            recorder.started(trial.trial_id, trial.config["trial"], start_ms=now_ms(),
                             continues=trial.config.get(CONTINUES))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if "epoch" in result:
                stamp = result.get("timestamp")
                recorder.epoch(trial.trial_id, int(result["epoch"]), trial_metrics(result, ray_keys),
                               timestamp_ms=int(stamp * 1000) if stamp else None)

        def on_trial_complete(self, iteration, trials, trial, **info):
            if "quality" not in (trial.last_result or {}) and trial.trial_id not in recorder.stopped:
                # stopped before its final report, not by early stopping: the search stopped under it
                recorder.kill(trial.trial_id, trial.config["trial"], INTERRUPTED)
                return
            files = Path(trial.checkpoint.path) if trial.checkpoint else None
            recorder.finished(trial.trial_id, trial.config["trial"],
                              trial_metrics(dict(trial.last_result or {}), ray_keys), files, end_ms=now_ms())

        def on_trial_error(self, iteration, trials, trial, **info):
            recorder.failed_trial(trial.trial_id, trial.config.get("trial", {}), _trial_error(trial), end_ms=now_ms())

    return RecorderCallback()


def _trial_error(trial) -> str:
    path = getattr(trial, "error_file", None)
    if path and Path(path).is_file():
        return Path(path).read_text()
    return str(getattr(trial, "error_msg", "") or "")
