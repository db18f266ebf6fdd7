"""``run_search``: Ray Tune runs the trials, Optuna samples them (``searcher``), MLflow records them (``recorder``).

Each trial runs ``tune_trainable`` in a Ray worker and reports its metrics with its model files as the
checkpoint; the Tune trial id tags the trial's Optuna trial and its MLflow child run, which holds those files
for ``export``. The front, its plot and the summary go on the search's parent run at the end.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gatesearch.spaces import DataConfig, EvalConfig, SearchConfig, TrialConfig
from gatesearch.spaces.objectives import LatencyTarget

from .dominance import EPOCH, EPOCHS, Rungs, dominance_scheduler
from .hypervolume import HypervolumeHistory
from .progress import Progress
from .recorder import Recorder, tune_callback
from .searcher import COST, make_searcher, pareto_from_study
from .target import check_resource
from .tracking import Tracker, default_tracking_uri

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


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    workdir: Path = Path("gatesearch_runs")  # MLflow store, Optuna study and Ray results live here
    tracking_uri: str | None = None  # MLflow tracking URI (default: SQLite store in workdir)
    ray_address: str | None = None  # join an existing Ray cluster instead of starting one
    cpus: int | None = None  # CPUs of the local Ray (default: all of this machine's)


def tune_trainable(config: dict, *, data: DataConfig, evaluation: EvalConfig, threads: int,
                   gates: dict[str, type] | None = None, search_id: str | None = None,
                   latency: LatencyTarget = LatencyTarget(), probe_clips: int = 0) -> None:
    """Runs inside a Ray worker: one trial; a report per epoch (``epoch``, ``epochs``, ``train_loss`` and, with
    ``probe_clips``, what early stopping ranks), then a final report holding every objective with the model files as
    its checkpoint. ``gates`` are the searched gates' classes, registered here when the worker does not know them (a
    gate defined in the driver's script); ``latency.resource`` names the Ray node the latency is measured on."""
    import torch
    from ray import tune

    from gatesearch.data.source import frame_shape, num_classes
    from gatesearch.export import trial_meta, write_files
    from gatesearch.objectives.device import DeviceLock
    from gatesearch.policies import adopt
    from gatesearch.search.target import TargetMeter, artifact_files
    from gatesearch.search.trial import run_trial

    adopt(gates or {})
    torch.set_num_threads(threads)
    trial = TrialConfig.from_dict(config["trial"])
    trial_id = tune.get_context().get_trial_id()

    def meta(metrics: dict) -> dict:
        return trial_meta(trial, metrics=metrics, data=data, num_classes=num_classes(data),
                          frame_shape=frame_shape(data), trial_id=trial_id, search_id=search_id)

    meter = None
    if latency.resource:
        meter = TargetMeter(latency.resource, lambda model: artifact_files(model, meta({})), threads=latency.threads,
                            gates=gates)
    lock = DeviceLock()
    try:
        outcome = run_trial(trial, data, evaluation, lock=lock, latency_threads=len(os.sched_getaffinity(0)),
                            meter=meter, probe_clips=probe_clips,
                            on_epoch=lambda epoch, m: tune.report({EPOCH: epoch + 1, EPOCHS: trial.epochs, **m}))
    finally:
        lock.close()
    with tempfile.TemporaryDirectory() as tmp:
        write_files(Path(tmp), outcome.model, meta(outcome.metrics))
        tune.report(outcome.metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def run_search(cfg: SearchConfig, opts: RunOptions = RunOptions(), *,
               echo: Callable[[str], None] = print, progress: Progress | None = None) -> dict[str, Any]:
    """Run a whole search and return its summary (what ``--json`` prints). ``echo`` prints the header lines;
    ``progress`` shows the trials as they run (default: one line per event through ``echo``)."""
    set_env_defaults()
    import optuna
    import ray
    from ray import tune

    start = time.time()
    workdir = opts.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    tracking_uri = opts.tracking_uri or default_tracking_uri(workdir)
    search_id = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage_url = f"sqlite:///{workdir / 'optuna.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    from gatesearch.data.source import check_data
    from gatesearch.ops import native_available
    from gatesearch.policies import POLICIES
    from gatesearch.spaces import Choice

    native_available()  # builds the skip-conv kernels once (cached), before trials would each wait for it

    task = cfg.space.shared["task"]
    check_data(cfg.data, tasks=task.values if isinstance(task, Choice) else (task.value,), echo=echo)
    tracker = Tracker(tracking_uri)
    parent = tracker.start_search(cfg.name, search_id, cfg.to_dict(), workdir / "mlartifacts")
    cost_key, cost_label = COST[cfg.objective]

    rungs = Rungs(cfg.early_stopping.milestones(max_epochs(cfg)), reduction_factor=cfg.early_stopping.reduction_factor)
    recorder = Recorder(tracker, parent, search_id, trials=cfg.trials, cost_key=cost_key, progress=progress,
                        echo=echo, constraints=cfg.constraints, stopped=rungs.stopped,
                        hypervolume=HypervolumeHistory(cfg.hypervolume_reference, cfg.constraints, cost_key))

    cpus = opts.cpus or os.cpu_count() or 1
    started_ray = not ray.is_initialized()  # a caller (or a test session) may have connected already
    if started_ray and opts.ray_address:
        ray.init(address=opts.ray_address, logging_level="ERROR", log_to_driver=False)
    elif started_ray:
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    if opts.ray_address or not started_ray:
        cpus = int(ray.cluster_resources().get("CPU", cpus))
    threads = max(1, cpus // cfg.max_concurrent)
    echo(f"search {search_id}: {cfg.trials} trials, {cfg.max_concurrent} at a time, {threads} thread(s) each; "
         f"MLflow {tracking_uri}")
    status = "FAILED"
    try:
        if cfg.latency.resource:
            check_resource(cfg.latency.resource)
        trainable = tune.with_resources(
            tune.with_parameters(tune_trainable, data=cfg.data, evaluation=cfg.evaluation, threads=threads,
                                 gates={g: POLICIES.get(g) for g in cfg.space.gate.values}, search_id=search_id,
                                 latency=cfg.latency,
                                 probe_clips=cfg.early_stopping.probe_clips if cfg.early_stopping.enabled else 0),
            {"cpu": threads},
        )
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=make_searcher(cfg, storage_url, search_id, stopped=rungs.stopped, run_ids=recorder.runs),
                scheduler=dominance_scheduler(rungs) if cfg.early_stopping.enabled else None,
                num_samples=cfg.trials,
                max_concurrent_trials=cfg.max_concurrent,
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=search_id,
                storage_path=str(workdir / "ray"),
                verbose=0,
                callbacks=[tune_callback(recorder)],
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
        with recorder.showing():
            tuner.fit()
        status = "FINISHED"
    finally:
        if started_ray:
            ray.shutdown()
        recorder.close_open_runs()
        rows = recorder.rows
        pareto = pareto_from_study(storage_url, search_id, rows, cost_key)
        tracker.mark_pareto(recorder.runs, {r["trial_id"] for r in pareto})
        if status == "FINISHED":
            from .previews import log_previews

            log_previews(tracker, pareto, data=cfg.data, evaluation=cfg.evaluation, out=workdir / "plots" / search_id)
        plot = None
        if rows:
            from gatesearch.viz.plots import plot_front

            plot = workdir / "plots" / search_id / "pareto.png"
            plot.parent.mkdir(parents=True, exist_ok=True)
            plot_front(rows, {r["trial_id"] for r in pareto}, plot, cost_key=cost_key, cost_label=cost_label,
                       title=f"{search_id}: {len(rows)} trials, {len(pareto)} Pareto-optimal")
        summary = {
            "search_id": search_id,
            "trials_completed": len(rows),
            "trials_failed": len(recorder.failed),
            "trials_pruned": len(recorder.pruned),
            "trials_infeasible": sum(not r["feasible"] for r in rows),
            "tracking_uri": tracking_uri,
            "optuna_storage": storage_url,
            "objectives": ["quality", cost_key],
            "wall_s": round(time.time() - start, 2),
            "pareto_size": len(pareto),
            "hypervolume": recorder.hypervolume.current,
            "hypervolume_reference": vars(recorder.hypervolume.reference) if recorder.hypervolume.reference else None,
            "pareto_plot": str(plot) if plot else None,
            "pareto": pareto,
            "mlflow_ui": tracker.ui_url(parent),
        }
        tracker.finish_search(parent, summary, pareto, plot, status, rows=rows)
    return summary


def max_epochs(cfg: SearchConfig) -> int:
    """The most epochs any trial of the search trains (where the rungs of early stopping must end)."""
    from gatesearch.spaces import Choice, Fixed

    dom = cfg.space.shared["epochs"]
    if isinstance(dom, Fixed):
        return int(dom.value)
    return int(max(dom.values) if isinstance(dom, Choice) else dom.high)


__all__ = ["RunOptions", "run_search", "set_env_defaults", "tune_trainable"]
