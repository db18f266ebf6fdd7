"""MLflow records: one parent run per search, one nested child run per trial.

Runs are written from the driver (a Tune callback), so trials on remote Ray
nodes need no access to the tracking store. Trials are found again by tag:
``gatesearch.search_id`` on both, ``gatesearch.trial_id`` on children.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

SEARCH_TAG = "gatesearch.search_id"
TRIAL_TAG = "gatesearch.trial_id"
KIND_TAG = "gatesearch.kind"  # "search" or "trial"
PARETO_TAG = "gatesearch.pareto"
PARENT_TAG = "mlflow.parentRunId"


def default_tracking_uri(workdir: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(workdir / 'mlflow.db').resolve()}"


class NotFoundError(LookupError):
    """A search or trial that is not in the tracking store (one-line message)."""


class Tracker:
    def __init__(self, tracking_uri: str) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri
        mlflow.set_tracking_uri(tracking_uri)
        self.client = MlflowClient(tracking_uri)

    # -- writing ------------------------------------------------------------
    def start_search(self, name: str, search_id: str, config: dict[str, Any], artifact_root: Path | None) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            # a local store keeps its artifacts beside it, not in whatever folder the command ran from
            local = artifact_root is not None and self.uri.startswith("sqlite:")
            loc = (artifact_root / name).resolve().as_uri() if local else None
            exp_id = self.client.create_experiment(name, artifact_location=loc)
        else:
            exp_id = exp.experiment_id
        run = self.client.create_run(exp_id, run_name=search_id, tags={SEARCH_TAG: search_id, KIND_TAG: "search"})
        self.client.log_dict(run.info.run_id, config, "search_config.json")
        for key, value in _flatten(config).items():
            self.client.log_param(run.info.run_id, key, _short(value))
        return run.info.run_id

    def log_trial(self, parent: str, search_id: str, trial_id: str, config: dict, metrics: dict | None,
                  *, status: str, error: str | None = None, files: Path | None = None) -> str:
        parent_run = self.client.get_run(parent)
        tags = {SEARCH_TAG: search_id, TRIAL_TAG: trial_id, KIND_TAG: "trial", PARENT_TAG: parent}
        if error:
            tags["gatesearch.error"] = error[:4000]
        run = self.client.create_run(parent_run.info.experiment_id, run_name=trial_id, tags=tags)
        rid = run.info.run_id
        for key, value in config.items():
            self.client.log_param(rid, key, _short(value))
        for key, value in (metrics or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.client.log_metric(rid, key, float(value))
        if files is not None:
            self.client.log_artifacts(rid, str(files), "model")
        self.client.set_terminated(rid, status=status)
        return rid

    def finish_search(self, parent: str, summary: dict, pareto_rows: list[dict], plot: Path | None,
                      status: str) -> None:
        self.client.log_dict(parent, pareto_rows, "pareto.json")
        if pareto_rows:
            self.client.log_text(parent, _csv(pareto_rows), "pareto.csv")
        if plot is not None and plot.exists():
            self.client.log_artifact(parent, str(plot))
        for key in ("trials_completed", "trials_failed", "wall_s", "pareto_size"):
            if key in summary:
                self.client.log_metric(parent, key, float(summary[key]))
        for row in pareto_rows:
            if row.get("run_id"):
                self.client.set_tag(row["run_id"], PARETO_TAG, "true")
        self.client.set_terminated(parent, status=status)

    # -- reading ------------------------------------------------------------
    def _search_runs(self, filter_string: str, max_results: int = 1000):
        exps = [e.experiment_id for e in self.client.search_experiments()]
        if not exps:
            return []
        return self.client.search_runs(exps, filter_string, max_results=max_results,
                                       order_by=["attributes.start_time DESC"])

    def search_run(self, search_id: str | None):
        """The parent run of ``search_id``, or of the latest search when None."""
        flt = f"tags.`{KIND_TAG}` = 'search'"
        if search_id:
            flt += f" and tags.`{SEARCH_TAG}` = '{_quote(search_id)}'"
        runs = self._search_runs(flt, max_results=1)
        if not runs:
            what = f"search {search_id!r}" if search_id else "any search"
            raise NotFoundError(f"no record of {what} in {self.uri}")
        return runs[0]

    def trial_runs(self, search_id: str):
        return self._search_runs(f"tags.`{SEARCH_TAG}` = '{_quote(search_id)}' and tags.`{KIND_TAG}` = 'trial'")

    def trial_run(self, trial_id: str):
        runs = self._search_runs(f"tags.`{TRIAL_TAG}` = '{_quote(trial_id)}'", max_results=1)
        if not runs:
            raise NotFoundError(f"no trial {trial_id!r} in {self.uri}")
        return runs[0]

    def pareto_rows(self, parent_run) -> list[dict]:
        path = self.client.download_artifacts(parent_run.info.run_id, "pareto.json")
        return json.loads(Path(path).read_text())

    def download_model(self, run, dst: Path) -> Path:
        return Path(self.client.download_artifacts(run.info.run_id, "model", str(dst)))


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _short(value: Any) -> str:
    s = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return s if len(s) <= 6000 else s[:5997] + "..."


def _quote(s: str) -> str:
    return s.replace("'", "")


def _csv(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = [",".join(keys)]
    for r in rows:
        lines.append(",".join("" if r.get(k) is None else str(r.get(k)) for k in keys))
    return "\n".join(lines) + "\n"
