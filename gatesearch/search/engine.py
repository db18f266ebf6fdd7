"""A search's lifecycle: ``run_search`` starts one, ``resume_search`` continues one that stopped or was killed.

Ray Tune runs the trials, Optuna samples them (``searcher``) and keeps the ledger of what ended (``study``),
MLflow records them (``recorder``). Each trial runs ``trainable.tune_trainable`` in a Ray worker and reports its
metrics with its model files as the checkpoint; the Tune trial id tags the trial's Optuna trial and its MLflow
child run, which holds those files for ``export``. The front, its plot and the summary go on the search's parent run.

Around that run: services are checked before anything is written (``preflight``), the search's own record
(``record``) says how to continue it, Ctrl-C / SIGTERM stop it cleanly (``stopping``) and a local Ray started
for it is stopped with everything it spawned (``localray``), however the search ends.

Resuming is a new Tuner on the same Optuna study, the same MLflow parent run and the remaining budget, not
``Tuner.restore``: (1) Tune snapshots its experiment state every ten seconds or more, so after a SIGKILL it may
list as running a trial that completed since, and would run it again; the study is written at every trial's
end. (2) ``Tuner.restore`` keeps ``num_samples`` and resumes an interrupted trial under its old id, so it could
not give an interrupted trial's budget back to the sampler nor keep "killed" and "completed" apart per trial id.
(3) It unpickles the searcher and the trainable from the work folder, and loading a file here never runs code.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gatesearch.spaces import SearchConfig, parse_search_config

from . import dense
from . import record as records
from .dense import DenseStart
from .dominance import Rungs, dominance_scheduler
from .hypervolume import HypervolumeHistory
from .localray import RayHandle, clean_up, kill_now, start_ray, stop_ray, temp_dir_for
from .preflight import check_services
from .progress import Progress
from .record import SearchRecord
from .recorder import Recorder, tune_callback
from .searcher import COST, make_searcher, pareto_from_study
from .stopping import StopRequest, handle_signals, stopper
from .study import INTERRUPTED, StudyLedger
from .target import check_resource
from .tracking import TRIAL_TAG, Tracker, default_tracking_uri
from .trainable import last_state, trial_dirname, tune_trainable

ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_AIR_NEW_OUTPUT": "0",
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # trials report per epoch (train loss, what early stopping ranks) before their final report holds the
    # objectives the searcher reads
    "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
}


def set_env_defaults() -> None:
    """Quiet, offline-friendly defaults for Ray and MLflow, unless the user set them."""
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


DEFAULT_WORKDIR = Path("gatesearch_runs")


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    workdir: Path = DEFAULT_WORKDIR  # MLflow store, Optuna study, Ray results and search records live here
    tracking_uri: str | None = None  # MLflow tracking URI (default: SQLite store in workdir)
    ray_address: str | None = None  # join an existing Ray cluster instead of starting one
    cpus: int | None = None  # CPUs of the local Ray (default: all of this machine's)


class SearchStopped(Exception):
    """The search ended before its budget was used (interrupted, too many failures): one line and an exit code."""

    def __init__(self, message: str, *, exit_code: int, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.exit_code, self.summary = exit_code, summary


class NothingToResume(Exception):
    """``resume`` was asked for a search that finished (one line; not an error)."""


def run_search(cfg: SearchConfig, opts: RunOptions = RunOptions(), *, echo: Callable[[str], None] = print,
               progress: Progress | None = None) -> dict[str, Any]:
    """Run a whole search and return its summary (what ``--json`` prints); raises SearchStopped if it stops early.
    ``echo`` prints the header lines; ``progress`` shows the trials as they run (default: a line per event)."""
    set_env_defaults()
    workdir = opts.workdir.resolve()
    tracking_uri = opts.tracking_uri or default_tracking_uri(workdir)
    check_services(workdir=workdir, tracking_uri=tracking_uri, ray_address=opts.ray_address)
    plans = _check_inputs(cfg, echo)
    workdir.mkdir(parents=True, exist_ok=True)
    search_id = _new_search_id(workdir, cfg.name)
    with records.hold(workdir, search_id):
        tracker = Tracker(tracking_uri)
        parent = tracker.start_search(cfg.name, search_id, cfg.to_dict(), workdir / "mlartifacts")
        now = time.time()
        rec = SearchRecord(search_id=search_id, config=cfg.to_dict(), tracking_uri=tracking_uri, parent_run_id=parent,
                           storage_url=f"sqlite:///{workdir / 'optuna.db'}", study_name=search_id,
                           ray_address=opts.ray_address, driver_pid=os.getpid(), created=now, updated=now)
        records.save(workdir, rec)
        return _drive(rec, cfg, plans, tracker, opts, echo, progress)


def resume_search(search_id: str | None, opts: RunOptions = RunOptions(), *, echo: Callable[[str], None] = print,
                  progress: Progress | None = None) -> dict[str, Any]:
    """Continue ``search_id`` (the latest unfinished search when None) where it stopped; returns its summary.

    The config, the Optuna study, the MLflow parent run and the budget are the record's. Completed trials are
    kept; trials that were running when it stopped are failed ("interrupted") in both stores and their budget
    is given back; what a killed driver's Ray left running is stopped first.
    """
    set_env_defaults()
    workdir = opts.workdir.resolve()
    rec = records.find(workdir, search_id)
    if rec.finished:
        raise NothingToResume(f"search {rec.search_id} finished ({rec.message}); nothing to resume")
    ray_address = opts.ray_address or rec.ray_address
    check_services(workdir=workdir, tracking_uri=rec.tracking_uri, ray_address=ray_address)
    cfg = parse_search_config(rec.config)
    plans = _check_inputs(cfg, echo)
    with records.hold(workdir, rec.search_id):
        rec = records.load(workdir, rec.search_id)  # as its last driver left it
        tracker = Tracker(rec.tracking_uri)
        _recover(rec, tracker, workdir, echo)
        rec = dataclasses.replace(rec, state="running", attempts=rec.attempts + 1, ray_address=ray_address,
                                  driver_pid=os.getpid(), updated=time.time(), message="")
        records.save(workdir, rec)
        tracker.reopen_search(rec.parent_run_id, rec.to_dict())
        echo(f"resuming {rec.search_id} (attempt {rec.attempts})")
        return _drive(rec, cfg, plans, tracker, dataclasses.replace(opts, ray_address=ray_address), echo, progress)


def _recover(rec: SearchRecord, tracker: Tracker, workdir: Path, echo: Callable[[str], None]) -> None:
    """What the last driver left: its local Ray's processes, trials still RUNNING in Optuna or MLflow, and long
    trials to continue from their last checkpoint."""
    # a driver killed before it recorded its Ray's folder still started it where temp_dir_for says
    temp_dir = rec.ray_temp_dir or (None if rec.ray_address else str(_ray_temp_dir(workdir, rec.search_id)))
    if temp_dir:
        left = clean_up(Path(temp_dir), rec.ray_pids)
        if left:
            echo(f"stopped {len(left)} process(es) left by the search's previous Ray")
    ledger = StudyLedger(rec.storage_url, rec.study_name)
    running = ledger.fail_running(INTERRUPTED)
    tracker.kill_running_trials(rec.search_id, INTERRUPTED)
    if running:
        echo(f"{len(running)} trial(s) interrupted: {', '.join(t for t, _ in running)}; their budget is given back")
    for tune_id, folder, epoch in ledger.requeue_interrupted(lambda tid: last_state(workdir, tid)):
        echo(f"trial {tune_id} continues from its checkpoint after epoch {epoch} ({folder})")


def _drive(rec: SearchRecord, cfg: SearchConfig, plans: list[dense.DensePlan], tracker: Tracker, opts: RunOptions,
           echo: Callable[[str], None], progress: Progress | None) -> dict[str, Any]:
    """Run what is left of the budget, then record how it ended whatever happened (finished, stopped, crashed)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    start = time.time()
    workdir = opts.workdir.resolve()
    cost_key = cfg.cost_key
    ledger = StudyLedger(rec.storage_url, rec.study_name)
    prior = ledger.tally(cfg.constraints)
    _attach_run_ids(prior.rows, tracker, rec.search_id)
    resume_hint = _resume_hint(rec.search_id, opts.workdir)
    held: dict[str, RayHandle] = {}

    def first(sig: int) -> None:
        echo(f"{signal.Signals(sig).name}: stopping {rec.search_id} (running trials are killed; "
             "press Ctrl-C again to exit at once)")

    def second(sig: int) -> None:
        handle = held.get("ray")
        if handle is not None and handle.temp_dir:
            kill_now(Path(handle.temp_dir), handle.pids)
        _record_killed(tracker, rec, timeout_s=3.0)
        if sys.stderr.isatty():
            sys.stderr.write("\x1b[?25h")  # a live display hid the cursor; nothing will show it again
        echo(f"exiting at once; continue the search with: {resume_hint}")

    with handle_signals(on_first=first, on_second=second) as stop:
        rungs = Rungs(cfg.early_stopping.milestones(max_epochs(cfg)),
                      reduction_factor=cfg.early_stopping.reduction_factor)
        recorder = Recorder(tracker, rec.parent_run_id, rec.search_id, trials=cfg.trials, cost_key=cost_key,
                            ledger=ledger, stop=stop, max_failures=cfg.max_failures, prior=prior, progress=progress,
                            echo=echo, constraints=cfg.constraints, stopped=rungs.stopped,
                            hypervolume=HypervolumeHistory(cfg.hypervolume_reference, cfg.constraints, cost_key))
        error: BaseException | None = None
        starts: dict[str, DenseStart] = {}
        try:
            held["ray"] = handle = start_ray(address=opts.ray_address, cpus=opts.cpus or os.cpu_count() or 1,
                                             temp_dir=_ray_temp_dir(workdir, rec.search_id))
            rec = dataclasses.replace(rec, ray_temp_dir=handle.temp_dir, ray_pids=handle.pids, updated=time.time())
            records.save(workdir, rec)
            if cfg.latency.resource:
                check_resource(cfg.latency.resource)
            threads = max(1, handle.cpus // cfg.max_concurrent)
            remaining = cfg.trials - prior.used
            echo(f"search {rec.search_id}: {remaining} of {cfg.trials} trials to run, {cfg.max_concurrent} at a "
                 f"time, {threads} thread(s) each; MLflow {rec.tracking_uri}")
            if remaining > 0 and not stop.requested:
                # the dense network every trial starts from: trained once (cached) or the user's, and its baseline
                starts = dense.prepare(cfg, plans, dense.DenseCache(workdir / "dense"), cpus=handle.cpus, echo=echo)
                tracker.record_weights(rec.parent_run_id, {k: s.source for k, s in starts.items()})
                with recorder.showing():
                    _fit(cfg, rec, workdir, recorder, rungs, starts, threads=threads, num_samples=remaining)
        except BaseException as e:
            error = e
            raise
        finally:
            recorder.close_open_runs(INTERRUPTED)
            ledger.fail_running(INTERRUPTED)  # asked for by the sampler, never started
            if "ray" in held:
                stop_ray(held["ray"])
            summary, stopped = _finish(rec, cfg, tracker, recorder, stop, error, starts, workdir=workdir,
                                       start=start, resume_hint=resume_hint)
    if stopped is not None:
        raise stopped
    return summary


def _ray_temp_dir(workdir: Path, search_id: str) -> Path:
    return temp_dir_for(f"{workdir}/{search_id}")


def _record_killed(tracker: Tracker, rec: SearchRecord, *, timeout_s: float) -> None:
    """On the way out after a second Ctrl-C: the parent and its running trials KILLED in MLflow, if the store
    answers within ``timeout_s`` (the user asked to exit at once; ``resume`` repairs whatever is left)."""
    import threading

    def record() -> None:
        tracker.kill_running_trials(rec.search_id, INTERRUPTED)
        tracker.client.set_terminated(rec.parent_run_id, status="KILLED")

    worker = threading.Thread(target=record, daemon=True)
    worker.start()
    worker.join(timeout_s)


def _fit(cfg: SearchConfig, rec: SearchRecord, workdir: Path, recorder: Recorder, rungs: Rungs,
         starts: dict[str, DenseStart], *, threads: int, num_samples: int) -> None:
    """One Ray Tune run of ``num_samples`` trials, sampled from the search's study (early stopping by ``rungs``),
    each starting from ``starts`` (its backbone's dense weights and baseline)."""
    from ray import tune

    from gatesearch.plugins import from_plugin_file
    from gatesearch.policies import POLICIES

    trainable = tune.with_resources(
        tune.with_parameters(tune_trainable, data=cfg.data, evaluation=cfg.evaluation, threads=threads,
                             starts=starts, share_weights=not cfg.model.from_scratch, plugins=cfg.plugins,
                             gates={g: POLICIES.get(g) for g in cfg.space.gate.values
                                    if not from_plugin_file(POLICIES.get(g))},  # those the worker imports
                             search_id=rec.search_id, latency=cfg.latency,
                             probe_clips=cfg.early_stopping.probe_clips if cfg.early_stopping.enabled else 0),
        {"cpu": threads},
    )
    seed = cfg.seed + rec.attempts - 1  # a resumed search draws new points, not its first attempt's again
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=make_searcher(cfg, rec.storage_url, rec.study_name, stopped=rungs.stopped,
                                     run_ids=recorder.runs, seed=seed),
            scheduler=dominance_scheduler(rungs) if cfg.early_stopping.enabled else None,
            num_samples=num_samples,
            max_concurrent_trials=cfg.max_concurrent,
            reuse_actors=True,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=rec.search_id if rec.attempts == 1 else f"{rec.search_id}-resume{rec.attempts - 1}",
            storage_path=str(workdir / "ray"),
            verbose=0,
            callbacks=[tune_callback(recorder)],
            stop=stopper(),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),  # a last one cut short leaves the one before
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
    tuner.fit()


def _finish(rec: SearchRecord, cfg: SearchConfig, tracker: Tracker, recorder: Recorder, stop: StopRequest,
            error: BaseException | None, starts: dict[str, DenseStart], *, workdir: Path, start: float,
            resume_hint: str) -> tuple[dict[str, Any], SearchStopped | None]:
    """The front, the summary, the parent run's status and the record's state, for any ending."""
    cost_key, cost_label = COST[cfg.objective]
    rows = recorder.rows
    pareto = pareto_from_study(rec.storage_url, rec.study_name, rows, cost_key)
    tracker.mark_pareto(recorder.runs, {r["trial_id"] for r in pareto})
    used = len(rows) + len(recorder.failed) + len(recorder.pruned)
    if error is None and used >= cfg.trials:
        from .previews import log_previews

        log_previews(tracker, pareto, data=cfg.data, evaluation=cfg.evaluation,
                     out=workdir / "plots" / rec.search_id)
    plot = None
    if rows:
        from gatesearch.viz.plots import plot_front

        plot = workdir / "plots" / rec.search_id / "pareto.png"
        plot.parent.mkdir(parents=True, exist_ok=True)
        plot_front(rows, {r["trial_id"] for r in pareto}, plot, cost_key=cost_key, cost_label=cost_label,
                   title=f"{rec.search_id}: {len(rows)} trials, {len(pareto)} Pareto-optimal",
                   dense=[s.baseline.summary() for s in starts.values()])
    pruned = f", {len(recorder.pruned)} stopped early" if recorder.pruned else ""
    done = f"{len(rows)} completed, {len(recorder.failed)} failed{pruned} of {cfg.trials} trials"
    if error is not None:
        state, status, exit_code = "failed", "FAILED", 1
        message = f"search {rec.search_id} failed ({type(error).__name__}: {error}); {done}; resume: {resume_hint}"
    elif used >= cfg.trials:  # a stop asked for once the last trial had ended lost nothing
        state, status, exit_code = "finished", "FINISHED", 0
        message = f"{done} in {rec.attempts} attempt(s)" if rec.attempts > 1 else done
    elif stop.interrupted:
        state, status, exit_code = "interrupted", "KILLED", 128 + (stop.signal or 0)
        message = f"search {rec.search_id} interrupted: {done}; continue it with: {resume_hint}"
    elif stop.requested:
        state, status, exit_code = "failed", "FAILED", 1
        message = f"search {rec.search_id} stopped: {stop.reason}; {done}; continue it with: {resume_hint}"
    else:  # Tune ended with trials killed under it (budget given back)
        state, status, exit_code = "interrupted", "KILLED", 1
        message = f"search {rec.search_id} ended early: {done}; continue it with: {resume_hint}"
    rec = dataclasses.replace(rec, state=state, updated=time.time(), message=message)
    summary = {
        "search_id": rec.search_id,
        "state": state,
        "trials_completed": len(rows),
        "trials_failed": len(recorder.failed),
        "trials_killed": len(recorder.killed),
        "trials_pruned": len(recorder.pruned),
        "trials_infeasible": sum(not r["feasible"] for r in rows),
        "attempts": rec.attempts,
        "tracking_uri": rec.tracking_uri,
        "optuna_storage": rec.storage_url,
        "objectives": ["quality", cost_key],
        "wall_s": round(time.time() - start, 2),
        "pareto_size": len(pareto),
        "hypervolume": recorder.hypervolume.current,
        "hypervolume_reference": vars(recorder.hypervolume.reference) if recorder.hypervolume.reference else None,
        "pareto_plot": str(plot) if plot else None,
        "dense": {k: {**s.baseline.summary(), "weights": s.source} for k, s in starts.items()},
        "pareto": pareto,
        "mlflow_ui": tracker.ui_url(rec.parent_run_id),
    }
    tracker.finish_search(rec.parent_run_id, summary, pareto, plot, status, rows=rows, record=rec.to_dict())
    records.save(workdir, rec)
    return summary, (None if state == "finished" else SearchStopped(message, exit_code=exit_code, summary=summary))


def max_epochs(cfg: SearchConfig) -> int:
    """The most epochs any trial of the search trains (where the rungs of early stopping must end)."""
    from gatesearch.spaces import Choice, Fixed

    if cfg.space.epochs_by_gate is not None:  # trials start from the shared dense weights: fine-tuning epochs
        return max(cfg.space.epochs_by_gate.values(), default=0)
    dom = cfg.space.shared["epochs"]
    if isinstance(dom, Fixed):
        return int(dom.value)
    return int(max(dom.values) if isinstance(dom, Choice) else dom.high)


def _check_inputs(cfg: SearchConfig, echo: Callable[[str], None]) -> list[dense.DensePlan]:
    """The data is readable, the user's weights fit every searched backbone (``WeightsError``: one line naming the
    file and the keys) and the kernels are built, before any record exists; returns what the dense start needs."""
    from gatesearch.data.source import check_data
    from gatesearch.ops import native_available
    from gatesearch.spaces import Choice

    task = cfg.space.shared["task"]
    check_data(cfg.data, tasks=task.values if isinstance(task, Choice) else (task.value,), echo=echo)
    plans = dense.plan(cfg)  # reads the weights, writes nothing
    native_available()  # builds the skip-conv kernels once (cached), before trials would each wait for it
    return plans


def _new_search_id(workdir: Path, name: str) -> str:
    base = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    search_id, n = base, 1
    while records.exists(workdir, search_id):  # two searches started within the same second
        n += 1
        search_id = f"{base}-{n}"
    return search_id


def _attach_run_ids(rows: list[dict[str, Any]], tracker: Tracker, search_id: str) -> None:
    """Rows rebuilt from the study get their MLflow run ids back (the Pareto tags go on those runs)."""
    if not rows:
        return
    runs = {r.data.tags.get(TRIAL_TAG): r.info.run_id for r in tracker.trial_runs(search_id)
            if r.info.status == "FINISHED"}
    for row in rows:
        row["run_id"] = runs.get(row["trial_id"])


def _resume_hint(search_id: str, workdir: Path) -> str:
    where = "" if Path(workdir) == DEFAULT_WORKDIR else f" --workdir {workdir}"
    return f"gatesearch resume {search_id}{where}"


__all__ = ["NothingToResume", "RunOptions", "SearchStopped", "resume_search", "run_search",
           "set_env_defaults"]
