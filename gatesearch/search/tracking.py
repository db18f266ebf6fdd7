"""MLflow records: one parent run per search, one nested child run per trial, one logged model per finished trial.

Runs are written from the driver (a Tune callback), so trials on remote Ray nodes need no access to the
tracking store. Trials are found again by tag: ``gatesearch.search_id`` on both, ``gatesearch.trial_id`` on
children. A child run is opened when its trial starts and closed when it ends, so its start and end are the
trial's; it holds only the trial's own parameters (the shared ones and its gate's knobs), its per-epoch metrics
by step, its final metrics, ``gatesearch.pareto`` (true or false) and its model, logged as an MLflow logged
model (``export.mlflow_model``: safetensors, loaded without unpickling).

The experiment is marked as model training (``mlflow.experimentKind``) and carries a saved runs-table view
(``mlflow.sharedViewState.gatesearch``: the quality and cost columns shown, best quality first);
``Tracker.ui_url`` is the link that opens it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

SEARCH_TAG = "gatesearch.search_id"
TRIAL_TAG = "gatesearch.trial_id"
KIND_TAG = "gatesearch.kind"  # "search" or "trial"
PARETO_TAG = "gatesearch.pareto"  # "true" / "false" on every trial
PARENT_TAG = "mlflow.parentRunId"
ERROR_TAG = "gatesearch.error"  # a failed trial's traceback (its end)
REASON_TAG = "gatesearch.reason"  # one line: why a trial failed or was killed ("interrupted")
CONTINUES_TAG = "gatesearch.continues"  # the interrupted trial a trial took over from its checkpoint
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"  # MLflow's experiment kind for model training (runs table first)
VIEW_KEY = "gatesearch"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"  # a saved runs-table view, opened by ?viewStateShareKey=
#: columns of the runs table a search opens with (metrics a search does not log are left out by the UI)
RUNS_TABLE_COLUMNS = (
    "params.`gate`",
    "metrics.`quality`",
    "metrics.`quality_drop`",
    "metrics.`quality_drop_ci_low`",
    "metrics.`quality_drop_ci_high`",
    "metrics.`latency_ms`",
    "metrics.`speedup`",
    "metrics.`macs`",
    "metrics.`mean_density`",
    f"tags.`{PARETO_TAG}`",
    "attributes.`Duration`",
)
TRIALS_FILE = "trials.json"  # every finished trial's row, on the parent run
PRUNED_TAG = "gatesearch.stopped_at_epoch"  # a trial early stopping stopped: the epoch of its rung
FEASIBLE_TAG = "gatesearch.feasible"  # "true" / "false" when the search has constraints
LATENCY_NODE_TAG = "gatesearch.latency_node"  # Ray node id of the node that measured the latency


def default_tracking_uri(workdir: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(workdir / 'mlflow.db').resolve()}"


def now_ms() -> int:
    return int(time.time() * 1000)


class NotFoundError(LookupError):
    """A search or trial that is not in the tracking store (one-line message)."""


class Tracker:
    def __init__(self, tracking_uri: str) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri
        mlflow.set_tracking_uri(tracking_uri)
        self.client = MlflowClient(tracking_uri)

    # -- a search -----------------------------------------------------------------------------------------------
    def experiment(self, name: str, artifact_root: Path | None) -> str:
        """The experiment's id, created when new; marked as model training either way."""
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            # a local store keeps its artifacts beside it, not in whatever folder the command ran from
            local = artifact_root is not None and self.uri.startswith("sqlite:")
            loc = (artifact_root / name).resolve().as_uri() if local else None
            return self.client.create_experiment(name, artifact_location=loc,
                                                 tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
        self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
        return exp.experiment_id

    def record_weights(self, parent: str, sources: dict[str, dict]) -> None:
        """Which trained weights the search's trials start from (per backbone@width: path and sha256)."""
        self.client.log_dict(parent, sources, "start_weights.json")
        for key, source in sources.items():
            for field in ("path", "sha256"):
                if source.get(field):
                    self.client.set_tag(parent, f"gatesearch.weights.{key.replace('@', ':')}.{field}", source[field])

    def start_search(self, name: str, search_id: str, config: dict[str, Any], artifact_root: Path | None) -> str:
        exp_id = self.experiment(name, artifact_root)
        run = self.client.create_run(exp_id, run_name=search_id, tags={SEARCH_TAG: search_id, KIND_TAG: "search"})
        rid = run.info.run_id
        self.client.log_dict(rid, config, "search_config.json")
        self._log_params(rid, _flatten(config))
        self._show_runs(exp_id)
        return rid

    def _show_runs(self, exp_id: str) -> None:
        """The experiment's saved runs-table view: gatesearch's columns first, best quality first. Sorting by a
        metric lists every run flat (the UI nests children only when sorted by date, and a shared view cannot
        expand rows), so the trials of every search are on the first screen."""
        view = {"selectedColumns": list(RUNS_TABLE_COLUMNS), "columnOrder": list(RUNS_TABLE_COLUMNS),
                "orderByKey": "metrics.`quality`", "orderByAsc": False}
        self.client.set_experiment_tag(exp_id, VIEW_TAG, json.dumps(view, separators=(",", ":")))

    def ui_url(self, run_id: str, host: str | None = None) -> str:
        """The MLflow UI link that opens this run's experiment on the runs table with gatesearch's view (the UI
        picks its view from ``workflowType``; the experiment tag alone does not switch it). ``host``: the UI's
        address (default: the tracking server, or ``mlflow ui``'s default for a local store)."""
        if host is None:
            host = self.uri.rstrip("/") if self.uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
        exp_id = self.client.get_run(run_id).info.experiment_id
        return f"{host}/#/experiments/{exp_id}/runs?viewStateShareKey={VIEW_KEY}&workflowType=machine_learning"

    def reopen_search(self, parent: str, record: dict) -> None:
        """A resumed search goes on in its own parent run: the same run id, RUNNING again."""
        self.client.update_run(parent, status="RUNNING")
        self.client.log_dict(parent, record, "search_record.json")

    def finish_search(self, parent: str, summary: dict, pareto_rows: list[dict], plot: Path | None,
                      status: str, rows: list[dict] | None = None, record: dict | None = None) -> None:
        if record is not None:  # the search's own record (``record.SearchRecord``), as it ended
            self.client.log_dict(parent, record, "search_record.json")
        self.client.log_dict(parent, pareto_rows, "pareto.json")
        if rows is not None:
            self.client.log_dict(parent, rows, TRIALS_FILE)
        if pareto_rows:
            self.client.log_text(parent, pareto_csv(pareto_rows), "pareto.csv")
        if plot is not None and plot.exists():
            self.client.log_artifact(parent, str(plot))
        for key in ("trials_completed", "trials_failed", "trials_pruned", "trials_infeasible", "wall_s",
                    "pareto_size"):
            if summary.get(key) is not None:
                self.client.log_metric(parent, key, float(summary[key]))
        self.client.set_terminated(parent, status=status)

    # -- a trial --------------------------------------------------------------------------------------------------
    def start_trial(self, parent: str, search_id: str, trial_id: str, params: dict[str, Any], *,
                    start_ms: int | None = None, continues: str | None = None) -> str:
        """Open the trial's child run as the trial starts; ``params``: the trial's own (None values dropped);
        ``continues``: the interrupted trial it takes over from its last checkpoint."""
        exp_id = self.client.get_run(parent).info.experiment_id
        tags = {SEARCH_TAG: search_id, TRIAL_TAG: trial_id, KIND_TAG: "trial", PARENT_TAG: parent,
                PARETO_TAG: "false"}
        if continues:
            tags[CONTINUES_TAG] = continues
        run = self.client.create_run(exp_id, start_time=start_ms or now_ms(), run_name=trial_id, tags=tags)
        self._log_params(run.info.run_id, params)
        return run.info.run_id

    def log_metrics(self, run_id: str, metrics: dict[str, Any], *, step: int, timestamp_ms: int | None = None,
                    model_id: str | None = None) -> None:
        """Numeric metrics at ``step`` in one call (linked to a logged model when given)."""
        from mlflow.entities import Metric

        ts = timestamp_ms or now_ms()
        batch = [Metric(key, float(v), ts, step, model_id=model_id) for key, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if batch:
            self.client.log_batch(run_id, metrics=batch)

    def log_model(self, run_id: str, trial_id: str, files: Path, *, step: int) -> str:
        """The trial's model folder as an MLflow logged model of its run (READY once its files are stored)."""
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus

        from gatesearch.export.mlflow_model import save_model

        run = self.client.get_run(run_id)
        model = self.client.create_logged_model(run.info.experiment_id, name=trial_id, source_run_id=run_id,
                                                params=run.data.params, model_type="gatesearch",
                                                tags={SEARCH_TAG: run.data.tags.get(SEARCH_TAG, ""),
                                                      TRIAL_TAG: trial_id})
        with tempfile.TemporaryDirectory() as tmp:
            save_model(Path(tmp) / "model", files)
            self.client.log_model_artifacts(model.model_id, str(Path(tmp) / "model"))
        self.client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
        self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        return model.model_id

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)

    def end_trial(self, run_id: str, *, status: str, end_ms: int | None = None, error: str | None = None,
                  reason: str | None = None) -> None:
        if error:
            self.client.set_tag(run_id, ERROR_TAG, error[-4000:])
        if reason:
            self.client.set_tag(run_id, REASON_TAG, reason[:500])
        self.client.set_terminated(run_id, status=status, end_time=end_ms or now_ms())

    def kill_running_trials(self, search_id: str, reason: str) -> list[str]:
        """End the search's trial runs still RUNNING (their driver died) as KILLED with ``reason``."""
        killed = []
        for run in self.trial_runs(search_id):
            if run.info.status == "RUNNING":
                self.end_trial(run.info.run_id, status="KILLED", reason=reason)
                killed.append(run.data.tags.get(TRIAL_TAG, run.info.run_id))
        return killed

    def mark_pareto(self, trial_runs: dict[str, str], front: set[str]) -> None:
        """``gatesearch.pareto`` true on the front's trials, false on the others (trial id -> run id)."""
        for trial_id, rid in trial_runs.items():
            self.client.set_tag(rid, PARETO_TAG, "true" if trial_id in front else "false")

    def log_file(self, run_id: str, path: Path, folder: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), folder)

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        batch = [Param(k, _short(v)) for k, v in params.items() if v is not None]
        for start in range(0, len(batch), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=batch[start : start + 100])

    # -- reading --------------------------------------------------------------------------------------------------
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

    def trial_rows(self, parent_run) -> list[dict]:
        """Every finished trial of a search (pruned and failed ones left out); [] for a search recorded without."""
        names = {a.path for a in self.client.list_artifacts(parent_run.info.run_id)}
        if TRIALS_FILE not in names:
            return []
        return json.loads(Path(self.client.download_artifacts(parent_run.info.run_id, TRIALS_FILE)).read_text())

    def pareto_rows(self, parent_run) -> list[dict]:
        path = self.client.download_artifacts(parent_run.info.run_id, "pareto.json")
        return json.loads(Path(path).read_text())

    def logged_model(self, run):
        """The logged model of a trial's run, or None (runs recorded before models were logged)."""
        models = self.client.search_logged_models([run.info.experiment_id],
                                                  filter_string=f"source_run_id = '{run.info.run_id}'",
                                                  max_results=1)
        return models[0] if models else None

    def download_model(self, run, dst: Path) -> Path:
        """The trial's gatesearch artifact folder, downloaded under ``dst``."""
        import mlflow

        from gatesearch.export.mlflow_model import artifact_folder

        model = self.logged_model(run)
        if model is None:  # an older record: the artifact folder as a plain run artifact
            return Path(self.client.download_artifacts(run.info.run_id, "model", str(dst)))
        folder = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model.model_id}", dst_path=str(dst),
                                                     tracking_uri=self.uri)
        return artifact_folder(Path(folder))

    def register(self, run, name: str):
        """Put the trial's logged model in the Model Registry under ``name`` (a new version when it exists)."""
        import mlflow

        model = self.logged_model(run)
        if model is None:
            raise NotFoundError(f"trial {run.data.tags.get(TRIAL_TAG)!r} has no logged model to register")
        return mlflow.register_model(f"models:/{model.model_id}", name)


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


def pareto_csv(rows: list[dict]) -> str:
    """The front as CSV: one column per scalar field, ``params`` as one JSON object (RFC 4180 quoting)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v
                         for k, v in r.items()})
    return buf.getvalue()
