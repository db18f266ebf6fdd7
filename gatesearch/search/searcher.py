"""Optuna inside Ray Tune: the sampler, the searcher that records Tune's trial ids, and the front read back.

Optuna's study lives in SQLite storage in the work folder (beside the MLflow store). Each Optuna trial carries
the Tune trial id as a user attribute, so the Pareto front is read from the study itself and matched to the
trials the recorder logged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gatesearch.spaces import SearchConfig

from .study import CONFIG, CONTINUES, METRICS, RESUME_FROM, TUNE_ID

RUN_ID = "mlflow_run_id"  # user attribute: the trial's MLflow run
STOPPED_AT = "stopped_at_epoch"  # user attribute of a trial early stopping pruned: the rung's epoch

#: second objective -> (metric key, axis label)
COST = {"latency": ("latency_ms", "latency per frame (ms)"), "macs": ("macs", "MACs per frame")}


def make_sampler(cfg: SearchConfig, *, seed: int | None = None):
    """The multi-objective Optuna sampler the search names, seeded (``cfg.seed`` unless ``seed`` is given)."""
    import optuna

    seed = cfg.seed if seed is None else seed
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if cfg.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, cfg.trials // 3)))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(4, min(10, cfg.trials // 3)))


def make_searcher(cfg: SearchConfig, storage_url: str, study_name: str, *, stopped: Mapping[str, int] | None = None,
                  run_ids: Mapping[str, str] | None = None, seed: int | None = None):
    """Ray Tune's OptunaSearch over the joint space (define-by-run), objectives quality ↑ and cost ↓, named in the
    study (optuna-dashboard shows them). ``cfg.warm_start`` is enqueued first; each trial carries its Tune id, its
    config and, from ``run_ids``, its MLflow run id; one that ``stopped`` holds (early stopping: Tune id -> rung) is
    PRUNED; a finished one carries its metrics (a resumed search rebuilds its table from them) and
    ``cfg.constraints`` as Optuna's named constraints, so the sampler and the front know which trials are infeasible.

    ``seed`` overrides the sampler's: a resumed search reseeds it, or its random start-up phase would draw the
    very points it drew before the interruption.
    """
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    stopped = {} if stopped is None else stopped
    run_ids = {} if run_ids is None else run_ids

    class TaggedOptunaSearch(OptunaSearch):
        """A failed trial is left running here: the recorder fails it with its reason (Optuna cannot annotate a
        finished trial), after Tune has handed over the error."""

        def _setup_study(self, mode):
            super()._setup_study(mode)
            self._ot_study.set_metric_names(["quality", cfg.cost_key])
            if not self._ot_study.trials:  # a fresh study (a resumed one enqueued them before)
                for i, point in enumerate(cfg.warm_start):
                    self._ot_study.enqueue_trial(cfg.space.enqueue_params(point, f"warm_start[{i}]"))

        def suggest(self, trial_id: str):
            params = super().suggest(trial_id)
            ot_trial = self._ot_trials[trial_id]
            ot_trial.set_user_attr(TUNE_ID, trial_id)
            ot_trial.set_user_attr(CONFIG, params["trial"])
            if ot_trial.user_attrs.get(RESUME_FROM):  # queued to continue an interrupted trial
                params[RESUME_FROM] = ot_trial.user_attrs[RESUME_FROM]
                params[CONTINUES] = ot_trial.user_attrs.get(CONTINUES)
            return params

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
            ot_trial = self._ot_trials.get(trial_id)
            if ot_trial is None or trial_id in self._completed_trials:
                return
            if trial_id in run_ids:
                ot_trial.set_user_attr(RUN_ID, run_ids[trial_id])
            if error:
                self._completed_trials.add(trial_id)
                return
            if trial_id in stopped:
                ot_trial.set_user_attr(STOPPED_AT, stopped[trial_id])
                self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.PRUNED)
                self._completed_trials.add(trial_id)
                return
            if result and all(m in result for m in self.metric):
                kept = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                ot_trial.set_user_attr(METRICS, kept)
                for name, value in cfg.constraints.violations(result).items():
                    ot_trial.set_constraint(name, value)
            super().on_trial_complete(trial_id, result, error)

    import warnings

    with warnings.catch_warnings():  # set_metric_names is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return TaggedOptunaSearch(
            space=cfg.space.define_by_run,
            metric=["quality", cfg.cost_key],
            mode=["max", "min"],
            sampler=make_sampler(cfg, seed=seed),
            storage=optuna.storages.RDBStorage(storage_url),
            study_name=study_name,
        )


def pareto_from_study(storage_url: str, study_name: str, rows: list[dict[str, Any]], cost_key: str) -> list[dict]:
    """Pareto-optimal trials according to the Optuna study, as the recorder's rows sorted by cost."""
    import optuna

    by_id = {r["trial_id"]: r for r in rows}
    try:
        study = optuna.load_study(study_name=study_name, storage=storage_url)
        best = study.best_trials
    except (KeyError, ValueError):  # no study or no completed trial
        return []
    front = [by_id[t.user_attrs[TUNE_ID]] for t in best if t.user_attrs.get(TUNE_ID) in by_id]
    return sorted(front, key=lambda r: (r[cost_key], -r["quality"]))
