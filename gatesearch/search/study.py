"""The search's Optuna study as its ledger: which trials completed, failed or were interrupted.

The study lives in RDB storage in the work folder and is written at every trial's end, so it is the record a
resumed search counts from. Each Optuna trial carries the Tune trial id, the trial's config and (once complete)
its metrics as user attributes, so the results table can be rebuilt without re-running anything. A failed
trial carries ``reason``; ``reason == "interrupted"`` marks a trial that was running when the search stopped: it
does not count against the budget (a resumed search runs another in its place).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gatesearch.spaces.objectives import Constraints

INTERRUPTED = "interrupted"
TUNE_ID = "tune_trial_id"
CONFIG = "trial_config"
METRICS = "metrics"
REASON = "reason"
CONTINUES = "continues"  # on a trial queued to continue an interrupted one: that trial's Tune id
RESUME_FROM = "resume_from"  # ... and the training state it starts from (also the key in the Tune config)


@dataclass(frozen=True, kw_only=True)
class Tally:
    rows: list[dict[str, Any]] = field(default_factory=list)  # completed trials (recorder rows)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # Tune id -> a completed trial's metrics
    failed: list[str] = field(default_factory=list)  # Tune ids of failed trials (interrupted ones excluded)
    pruned: list[str] = field(default_factory=list)  # Tune ids of trials early stopping stopped
    interrupted: list[str] = field(default_factory=list)  # Tune ids of interrupted trials

    @property
    def used(self) -> int:
        """Trials that count against the budget: completed, failed and stopped early."""
        return len(self.rows) + len(self.failed) + len(self.pruned)


class StudyLedger:
    def __init__(self, storage_url: str, study_name: str) -> None:
        import optuna

        self.storage = optuna.storages.RDBStorage(storage_url)
        self.study_name = study_name

    def _trials(self, states=None):
        try:
            study_id = self.storage.get_study_id_from_name(self.study_name)
        except KeyError:  # no trial was ever asked for
            return []
        trials = self.storage.get_all_trials(study_id, deepcopy=False)
        return [t for t in trials if states is None or t.state in states]

    def _trial_id(self, trial) -> int:
        study_id = self.storage.get_study_id_from_name(self.study_name)
        return self.storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)

    def fail(self, tune_id: str, reason: str) -> None:
        """Mark the running trial of ``tune_id`` failed with ``reason`` (a finished one is left as it is)."""
        import optuna

        for t in self._trials({optuna.trial.TrialState.RUNNING}):
            if t.user_attrs.get(TUNE_ID) == tune_id:
                self._fail(t, reason)

    def fail_running(self, reason: str = INTERRUPTED) -> list[tuple[str, dict]]:
        """Mark every trial still running failed with ``reason``; returns their (Tune id, trial config)."""
        import optuna

        running = self._trials({optuna.trial.TrialState.RUNNING})
        for t in running:
            self._fail(t, reason)
        return [(t.user_attrs.get(TUNE_ID, f"#{t.number}"), t.user_attrs.get(CONFIG, {})) for t in running]

    def _fail(self, trial, reason: str) -> None:
        import optuna

        tid = self._trial_id(trial)
        self.storage.set_trial_user_attr(tid, REASON, reason[:1000])
        self.storage.set_trial_state_values(tid, optuna.trial.TrialState.FAIL)

    def requeue_interrupted(self, last_state: Callable[[str], tuple[Path, int] | None]) -> list[tuple[str, Path, int]]:
        """Queue each interrupted trial that left a training state (``last_state(tune id)``: folder, epoch) and is
        not queued yet: the next trial the sampler asks for gets its parameters and starts from that state.
        A continuation interrupted before its own first checkpoint passes on the state it started from.
        Returns (Tune id, folder, epoch) of each trial queued."""
        import optuna

        from .checkpoint import TrainState

        trials = self._trials()
        queued = {t.user_attrs.get(CONTINUES) for t in trials}
        out = []
        for t in trials:
            tune_id = t.user_attrs.get(TUNE_ID)
            if t.state != optuna.trial.TrialState.FAIL or t.user_attrs.get(REASON) != INTERRUPTED or tune_id in queued:
                continue
            found = last_state(tune_id)
            if found is None and t.user_attrs.get(RESUME_FROM):
                state = TrainState.load(Path(t.user_attrs[RESUME_FROM]))
                found = (Path(t.user_attrs[RESUME_FROM]), state.epoch) if state is not None else None
            if found is None:
                continue
            folder, epoch = found
            study = optuna.load_study(study_name=self.study_name, storage=self.storage)
            study.enqueue_trial(t.params, user_attrs={CONTINUES: tune_id, RESUME_FROM: str(folder)})
            out.append((tune_id, folder, epoch))
        return out

    def tally(self, constraints: Constraints | None = None) -> Tally:
        """What the study holds so far: completed rows (``feasible`` under ``constraints``), failed, pruned and
        interrupted trials."""
        import optuna

        from .recorder import trial_row

        out = Tally()
        for t in self._trials():
            tune_id = t.user_attrs.get(TUNE_ID, f"#{t.number}")
            if t.state == optuna.trial.TrialState.COMPLETE and CONFIG in t.user_attrs and METRICS in t.user_attrs:
                metrics = t.user_attrs[METRICS]
                row = trial_row(t.user_attrs[CONFIG], metrics, tune_id)
                row["feasible"] = constraints is None or constraints.feasible(metrics)
                out.rows.append(row)
                out.metrics[tune_id] = metrics
            elif t.state == optuna.trial.TrialState.PRUNED:
                out.pruned.append(tune_id)
            elif t.state == optuna.trial.TrialState.FAIL:
                (out.interrupted if t.user_attrs.get(REASON) == INTERRUPTED else out.failed).append(tune_id)
        return out


__all__ = ["INTERRUPTED", "StudyLedger", "Tally"]
