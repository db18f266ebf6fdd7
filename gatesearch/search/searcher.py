"""Optuna inside Ray Tune: the sampler, the searcher that records Tune's trial ids, and the front read back.

Optuna's study lives in SQLite storage in the work folder (beside the MLflow store). Each Optuna trial carries
the Tune trial id as a user attribute, so the Pareto front is read from the study itself and matched to the
trials the recorder logged.
"""

from __future__ import annotations

from typing import Any

from gatesearch.spaces import SearchConfig

#: second objective -> (metric key, axis label)
COST = {"latency": ("latency_ms", "latency per frame (ms)"), "macs": ("macs", "MACs per frame")}


def make_sampler(cfg: SearchConfig):
    """The multi-objective Optuna sampler the search names, seeded."""
    import optuna

    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=cfg.seed)
    if cfg.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=cfg.seed, population_size=max(4, min(50, cfg.trials // 3)))
    return optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=max(4, min(10, cfg.trials // 3)))


def make_searcher(cfg: SearchConfig, storage_url: str, study_name: str):
    """Ray Tune's OptunaSearch over the joint space (define-by-run), objectives quality ↑ and cost ↓."""
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
        sampler=make_sampler(cfg),
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
    front = [by_id[t.user_attrs["tune_trial_id"]] for t in best if t.user_attrs.get("tune_trial_id") in by_id]
    return sorted(front, key=lambda r: (r[cost_key], -r["quality"]))
