"""The driver side of a running search: one MLflow child run per finished trial, and a progress line.

Runs are written from the driver (a Ray Tune callback), so trials on remote Ray nodes need no access to the
tracking store. ``Recorder`` holds the table of finished trials the Pareto front is built from; ``tune_callback``
wraps it in the ``tune.Callback`` Tune calls.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .pareto import pareto_indices
from .tracking import Tracker


def format_params(params: dict[str, Any]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return " ".join(f"{k}={fmt(v)}" for k, v in params.items())


def trial_row(trial_cfg: dict[str, Any], metrics: dict[str, Any], trial_id: str) -> dict[str, Any]:
    """One finished trial as a row of the results table (what ``pareto.json`` holds)."""
    from gatesearch.policies import POLICIES

    knobs = {p.name: trial_cfg.get(p.name) for p in POLICIES.get(trial_cfg["gate"]).params}
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


class Recorder:
    """Logs each finished or failed trial under the search's parent run and echoes a progress line."""

    def __init__(self, tracker: Tracker, parent: str, search_id: str, *, trials: int, cost_key: str,
                 echo: Callable[[str], None]) -> None:
        self.tracker, self.parent, self.search_id = tracker, parent, search_id
        self.trials, self.cost_key, self.echo = trials, cost_key, echo
        self.rows: list[dict[str, Any]] = []  # finished trials
        self.failed: list[str] = []  # ids of failed trials

    def finished(self, trial_id: str, trial_cfg: dict, metrics: dict, files: Path | None) -> None:
        row = trial_row(trial_cfg, metrics, trial_id)
        row["run_id"] = self.tracker.log_trial(self.parent, self.search_id, trial_id, trial_cfg, metrics,
                                               status="FINISHED", files=files)
        self.rows.append(row)
        self._progress(f"{trial_id} {row['gate']} {format_params(row['params'])} -> quality {row['quality']:.3f}, "
                       f"{row['latency_ms']:.2f} ms/frame, {row['macs'] / 1e6:.1f} MMACs")

    def failed_trial(self, trial_id: str, trial_cfg: dict, error: str) -> None:
        self.tracker.log_trial(self.parent, self.search_id, trial_id, trial_cfg, None, status="FAILED", error=error)
        self.failed.append(trial_id)
        reason = error.strip().splitlines()[-1] if error.strip() else "unknown error"
        self._progress(f"{trial_id} FAILED: {reason}")

    def _progress(self, line: str) -> None:
        done = len(self.rows) + len(self.failed)
        best = max((r["quality"] for r in self.rows), default=float("nan"))
        front = len(pareto_indices([(r["quality"], r[self.cost_key]) for r in self.rows]))
        self.echo(f"[{done}/{self.trials}] {line} | best quality {best:.3f} | Pareto front {front}")


def tune_callback(recorder: Recorder):
    """The ``tune.Callback`` that hands Tune's trial events to ``recorder``."""
    from ray import tune

    class RecorderCallback(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            files = Path(trial.checkpoint.path) if trial.checkpoint else None
            recorder.finished(trial.trial_id, trial.config["trial"], dict(trial.last_result or {}), files)

        def on_trial_error(self, iteration, trials, trial, **info):
            recorder.failed_trial(trial.trial_id, trial.config.get("trial", {}), _trial_error(trial))

    return RecorderCallback()


def _trial_error(trial) -> str:
    path = getattr(trial, "error_file", None)
    if path and Path(path).is_file():
        return Path(path).read_text()
    return str(getattr(trial, "error_msg", "") or "")
