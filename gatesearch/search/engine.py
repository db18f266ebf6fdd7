"""The search engine: Ray Tune runs trials, Optuna samples them, MLflow records them.

Optuna's study lives in SQLite storage in the work folder (beside the MLflow
store), so the Pareto front is read from the study itself. Each Optuna trial
carries the Tune trial id as a user attribute; that id also tags the trial's
MLflow child run, which holds the trial's model files for ``export``.
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

from .pareto import pareto_indices, plot_front
from .tracking import Tracker, default_tracking_uri

ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_AIR_NEW_OUTPUT": "0",
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}
COST = {"latency": ("latency_ms", "latency per frame (ms)"), "macs": ("macs", "MACs per frame")}


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


def tune_trainable(config: dict, *, data: DataConfig, evaluation: EvalConfig, threads: int) -> None:
    """Runs inside a Ray worker: one trial, one final report holding every objective."""
    import torch
    from ray import tune

    from gatesearch.data.source import frame_shape, num_classes
    from gatesearch.export import trial_meta, write_files
    from gatesearch.objectives.device import DeviceLock
    from gatesearch.search.trial import run_trial

    torch.set_num_threads(threads)
    trial = TrialConfig.from_dict(config["trial"])
    lock = DeviceLock()
    try:
        outcome = run_trial(trial, data, evaluation, lock=lock, latency_threads=len(os.sched_getaffinity(0)))
    finally:
        lock.close()
    with tempfile.TemporaryDirectory() as tmp:
        meta = trial_meta(trial, metrics=outcome.metrics, data=data, num_classes=num_classes(data),
                          frame_shape=frame_shape(data), trial_id=tune.get_context().get_trial_id())
        write_files(Path(tmp), outcome.model, meta)
        tune.report(outcome.metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def _sampler(cfg: SearchConfig):
    import optuna

    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=cfg.seed)
    if cfg.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=cfg.seed, population_size=max(4, min(50, cfg.trials // 3)))
    return optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=max(4, min(10, cfg.trials // 3)))


def _searcher(cfg: SearchConfig, storage_url: str, study_name: str):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    class TaggedOptunaSearch(OptunaSearch):
        """OptunaSearch that records the Tune trial id on each Optuna trial."""

        def suggest(self, trial_id: str):
            params = super().suggest(trial_id)
            self._ot_trials[trial_id].set_user_attr("tune_trial_id", trial_id)
            return params

    return TaggedOptunaSearch(
        space=cfg.space.define_by_run,
        metric=["quality", COST[cfg.objective][0]],
        mode=["max", "min"],
        sampler=_sampler(cfg),
        storage=optuna.storages.RDBStorage(storage_url),
        study_name=study_name,
    )


def _row(trial_cfg: dict, metrics: dict, trial_id: str) -> dict[str, Any]:
    from gatesearch.policies import POLICIES

    knobs = {k: trial_cfg.get(k) for k in POLICIES.get(trial_cfg["gate"]).params}
    return {
        "trial_id": trial_id,
        "gate": trial_cfg["gate"],
        "params": {**knobs, "clip_length": trial_cfg["clip_length"], "lr": trial_cfg["lr"],
                   "backbone": trial_cfg["backbone"]},
        "quality": metrics.get("quality"),
        "latency_ms": metrics.get("latency_ms"),
        "macs": metrics.get("macs"),
        "dense_macs": metrics.get("dense_macs"),
        "mean_density": metrics.get("mean_density"),
    }


def format_params(params: dict[str, Any]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return " ".join(f"{k}={fmt(v)}" for k, v in params.items())


def run_search(cfg: SearchConfig, opts: RunOptions = RunOptions(), *,
               echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run a whole search and return its summary (what ``--json`` prints)."""
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
    from gatesearch.spaces import Choice

    native_available()  # builds the skip-conv kernels once (cached), before trials would each wait for it

    task = cfg.space.shared["task"]
    check_data(cfg.data, tasks=task.values if isinstance(task, Choice) else (task.value,), echo=echo)
    tracker = Tracker(tracking_uri)
    parent = tracker.start_search(cfg.name, search_id, cfg.to_dict(), workdir / "mlartifacts")
    cost_key, cost_label = COST[cfg.objective]

    rows: list[dict[str, Any]] = []
    failed: list[str] = []

    class Recorder(tune.Callback):
        """Driver-side: log each finished trial to MLflow and print progress."""

        def _progress(self, line: str) -> None:
            done = len(rows) + len(failed)
            best = max((r["quality"] for r in rows), default=float("nan"))
            front = len(pareto_indices([(r["quality"], r[cost_key]) for r in rows]))
            echo(f"[{done}/{cfg.trials}] {line} | best quality {best:.3f} | Pareto front {front}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            metrics = dict(trial.last_result or {})
            tcfg = trial.config["trial"]
            files = Path(trial.checkpoint.path) if trial.checkpoint else None
            row = _row(tcfg, metrics, trial.trial_id)
            row["run_id"] = tracker.log_trial(parent, search_id, trial.trial_id, tcfg, metrics, status="FINISHED",
                                              files=files)
            rows.append(row)
            self._progress(
                f"{trial.trial_id} {row['gate']} {format_params(row['params'])} -> quality {row['quality']:.3f}, "
                f"{row['latency_ms']:.2f} ms/frame, {row['macs'] / 1e6:.1f} MMACs"
            )

        def on_trial_error(self, iteration, trials, trial, **info):
            err = _trial_error(trial)
            tcfg = trial.config.get("trial", {})
            tracker.log_trial(parent, search_id, trial.trial_id, tcfg, None, status="FAILED", error=err)
            failed.append(trial.trial_id)
            reason = err.strip().splitlines()[-1] if err.strip() else "unknown error"
            self._progress(f"{trial.trial_id} FAILED: {reason}")

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
        trainable = tune.with_resources(
            tune.with_parameters(tune_trainable, data=cfg.data, evaluation=cfg.evaluation, threads=threads),
            {"cpu": threads},
        )
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=_searcher(cfg, storage_url, search_id),
                num_samples=cfg.trials,
                max_concurrent_trials=cfg.max_concurrent,
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=search_id,
                storage_path=str(workdir / "ray"),
                verbose=0,
                callbacks=[Recorder()],
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
        tuner.fit()
        status = "FINISHED"
    finally:
        if started_ray:
            ray.shutdown()
        pareto = _pareto_from_study(storage_url, search_id, rows, cost_key)
        plot = None
        if rows:
            plot = workdir / "plots" / f"{search_id}-pareto.png"
            plot.parent.mkdir(parents=True, exist_ok=True)
            plot_front(rows, {r["trial_id"] for r in pareto}, plot, cost_key=cost_key, cost_label=cost_label,
                       title=f"{search_id}: {len(rows)} trials, {len(pareto)} Pareto-optimal")
        summary = {
            "search_id": search_id,
            "trials_completed": len(rows),
            "trials_failed": len(failed),
            "tracking_uri": tracking_uri,
            "optuna_storage": storage_url,
            "objectives": ["quality", cost_key],
            "wall_s": round(time.time() - start, 2),
            "pareto_size": len(pareto),
            "pareto_plot": str(plot) if plot else None,
            "pareto": pareto,
        }
        tracker.finish_search(parent, summary, pareto, plot, status)
    return summary


def _pareto_from_study(storage_url: str, study_name: str, rows: list[dict], cost_key: str) -> list[dict]:
    """Pareto-optimal trials according to the Optuna study, as table rows sorted by cost."""
    import optuna

    by_id = {r["trial_id"]: r for r in rows}
    try:
        study = optuna.load_study(study_name=study_name, storage=storage_url)
        best = study.best_trials
    except (KeyError, ValueError):  # no study or no completed trial
        return []
    front = [by_id[t.user_attrs["tune_trial_id"]] for t in best if t.user_attrs.get("tune_trial_id") in by_id]
    return sorted(front, key=lambda r: (r[cost_key], -r["quality"]))


def _trial_error(trial) -> str:
    path = getattr(trial, "error_file", None)
    if path and Path(path).is_file():
        return Path(path).read_text()
    return str(getattr(trial, "error_msg", "") or "")


__all__ = ["RunOptions", "run_search", "set_env_defaults", "tune_trainable", "format_params"]
