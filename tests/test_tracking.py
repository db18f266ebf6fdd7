"""MLflow records as a user browses them, checked through MLflow's own client (no Ray: the recorder is fed the
events Tune would send)."""

import csv
import io
import json
import pickle
import time

import pytest
import torch

from gatesearch.export import save_artifact, trial_meta
from gatesearch.models import build_model
from gatesearch.search.progress import PlainProgress
from gatesearch.search.recorder import Recorder, trial_metrics
from gatesearch.search.tracking import (
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING,
    PARETO_TAG,
    VIEW_TAG,
    Tracker,
    pareto_csv,
)
from gatesearch.spaces import DataConfig, TrialConfig

DATA = DataConfig(synthetic={"height": 32, "width": 32})
TRIALS = {
    "t_dense": TrialConfig(gate="dense", clip_length=4, epochs=2),
    "t_input": TrialConfig(gate="input_norm", knobs={"threshold": 0.3, "block_size": 2}, clip_length=4, epochs=2),
}
METRICS = {
    "t_dense": {"quality": 0.9, "latency_ms": 2.0, "macs": 2e6, "dense_macs": 2e6, "mean_density": 1.0},
    "t_input": {"quality": 0.8, "latency_ms": 1.0, "macs": 1e6, "dense_macs": 2e6, "mean_density": 0.5},
}


def artifact_files(tmp_path, trial_id):
    trial = TRIALS[trial_id]
    meta = trial_meta(trial, metrics=METRICS[trial_id], data=DATA, num_classes=12, frame_shape=(3, 32, 32),
                      trial_id=trial_id, search_id="s-1")
    return save_artifact(tmp_path / "files" / trial_id, build_model(trial, 12).eval(), meta)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A search of two trials recorded as the Tune callback records them, with real start/end times."""
    tmp_path = tmp_path_factory.mktemp("recorded")
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = tracker.start_search("unit", "s-1", {"trials": 2}, tmp_path / "mlartifacts")
    lines = []
    recorder = Recorder(tracker, parent, "s-1", trials=2, cost_key="latency_ms", progress=PlainProgress(lines.append))
    spans = {}
    with recorder.showing():
        record_trials(tmp_path, recorder, spans)
    tracker.mark_pareto(recorder.runs, {"t_dense"})
    tracker.finish_search(parent, {"trials_completed": 2}, recorder.rows, None, "FINISHED")
    return tracker, recorder, spans, lines


def record_trials(tmp_path, recorder, spans):
    for trial_id, trial in TRIALS.items():
        start = int(time.time() * 1000)
        recorder.started(trial_id, trial.to_dict(), start_ms=start)
        for epoch in (1, 2):
            recorder.epoch(trial_id, epoch, {"train_loss": 1.0 / epoch})
        time.sleep(0.05)
        end = int(time.time() * 1000)
        recorder.finished(trial_id, trial.to_dict(), METRICS[trial_id], artifact_files(tmp_path, trial_id),
                          end_ms=end)
        spans[trial_id] = (start, end)


def test_experiment_opens_as_model_training_with_the_runs_table_view(recorded):
    tracker, recorder, _, _ = recorded
    exp = tracker.client.get_experiment_by_name("unit")
    assert exp.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    view = json.loads(exp.tags[VIEW_TAG])
    assert "metrics.`quality`" in view["selectedColumns"] and "metrics.`latency_ms`" in view["selectedColumns"]
    assert view["orderByKey"] == "metrics.`quality`" and view["orderByAsc"] is False
    url = tracker.ui_url(recorder.parent)
    assert f"/experiments/{exp.experiment_id}/runs?" in url and "workflowType=machine_learning" in url


def test_child_runs_span_the_trial_and_hold_only_the_gate_params(recorded):
    tracker, recorder, spans, _ = recorded
    for trial_id, rid in recorder.runs.items():
        run = tracker.client.get_run(rid)
        assert (run.info.start_time, run.info.end_time) == spans[trial_id]
        assert run.info.status == "FINISHED"
        params = run.data.params
        knobs = set(TRIALS[trial_id].knobs)
        assert set(params) == set(TrialConfig.shared_fields()) | knobs
        assert "None" not in params.values()
    assert "threshold" not in tracker.client.get_run(recorder.runs["t_dense"]).data.params


def test_per_epoch_metrics_have_steps_and_finals_follow_the_last_epoch(recorded):
    tracker, recorder, _, _ = recorded
    rid = recorder.runs["t_input"]
    history = tracker.client.get_metric_history(rid, "train_loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5)]
    assert [m.step for m in tracker.client.get_metric_history(rid, "quality")] == [2]


def test_every_trial_has_a_pareto_tag(recorded):
    tracker, recorder, _, _ = recorded
    tags = {t: tracker.client.get_run(rid).data.tags[PARETO_TAG] for t, rid in recorder.runs.items()}
    assert tags == {"t_dense": "true", "t_input": "false"}


def test_ray_bookkeeping_is_not_a_metric():
    from gatesearch.search.recorder import _ray_keys

    result = {"quality": 0.5, "epoch": 3, "pid": 11, "timestamp": 1.0, "time_this_iter_s": 2.0,
              "training_iteration": 4, "time_total_s": 3.0, "done": True, "trial_id": "x", "hostname": "h"}
    assert trial_metrics(result, _ray_keys()) == {"quality": 0.5}


def test_logged_model_loads_without_pickle(recorded, monkeypatch, tmp_path, static_clip):
    """The trial's logged model is listed under the experiment and loads through pyfunc with unpickling made
    impossible; its predictions are the artifact's stream."""
    import mlflow

    tracker, recorder, _, _ = recorded
    exp = tracker.client.get_experiment_by_name("unit")
    models = tracker.client.search_logged_models([exp.experiment_id])
    assert {m.name for m in models} == set(TRIALS)
    model_id = recorder.models["t_input"]
    logged = tracker.client.get_logged_model(model_id)
    assert logged.source_run_id == recorder.runs["t_input"] and str(logged.status) == "READY"
    assert {m.key for m in logged.metrics} >= {"quality", "latency_ms"}

    def poisoned(*args, **kwargs):
        raise AssertionError("unpickling while loading a gatesearch model")

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, poisoned)
    import cloudpickle

    monkeypatch.setattr(cloudpickle, "load", poisoned)
    monkeypatch.setattr(cloudpickle, "loads", poisoned)
    model = mlflow.pyfunc.load_model(f"models:/{model_id}", suppress_warnings=True)
    out = model.predict(static_clip[0])
    assert len(out["density"]) == static_clip.shape[1] and out["frames"] == static_clip.shape[1]
    assert out["density"][0] == 1.0 and 0 <= out["mean_density"] <= 1


def test_register_puts_the_logged_model_in_the_registry(recorded):
    import mlflow

    tracker, recorder, _, _ = recorded
    run = tracker.client.get_run(recorder.runs["t_input"])
    version = tracker.register(run, "gated-net")
    assert version.name == "gated-net" and str(version.version) == "1"
    assert tracker.client.get_model_version("gated-net", "1").source == f"models:/{recorder.models['t_input']}"
    assert str(tracker.register(run, "gated-net").version) == "2"
    model = mlflow.pyfunc.load_model("models:/gated-net/2", suppress_warnings=True)
    assert model.metadata.flavors["gatesearch"]["format"] == "gatesearch-model/2"


def test_download_model_gives_the_artifact_folder(recorded, tmp_path, static_clip):
    from gatesearch.export import load_artifact

    tracker, recorder, _, _ = recorded
    folder = tracker.download_model(tracker.client.get_run(recorder.runs["t_input"]), tmp_path / "dl")
    art = load_artifact(folder)
    assert art.trial == TRIALS["t_input"] and art.meta["search_id"] == "s-1"
    reference = build_model(TRIALS["t_input"], 12).eval()
    with torch.inference_mode():
        assert torch.equal(art.model.stream(static_clip), reference.stream(static_clip))


def test_progress_lines_name_each_trial_with_done_and_front(recorded):
    _, _, _, lines = recorded
    assert any("t_input started: input_norm" in line for line in lines)
    finished = [line for line in lines if "-> quality" in line]
    assert len(finished) == 2 and "done 2/2" in finished[-1] and "front 2" in finished[-1]


def test_pareto_csv_is_csv_with_json_params():
    rows = [{"trial_id": "a", "gate": "input_norm", "params": {"threshold": 0.5, "block_size": 2}, "quality": 0.5},
            {"trial_id": "b", "gate": "dense", "params": {}, "quality": None}]
    parsed = list(csv.DictReader(io.StringIO(pareto_csv(rows))))
    assert [r["trial_id"] for r in parsed] == ["a", "b"]
    assert json.loads(parsed[0]["params"]) == {"block_size": 2, "threshold": 0.5}
    assert parsed[0]["quality"] == "0.5" and parsed[1]["quality"] == ""


def test_gate_colours_are_fixed():
    from gatesearch.viz.colours import gate_colour

    assert gate_colour("input_norm") == gate_colour("input_norm") != gate_colour("output_norm")
    assert gate_colour("my_plugin_gate") == gate_colour("my_plugin_gate")


def test_previews_of_the_front_go_to_the_trial_runs(recorded, tmp_path):
    """A gated trial of the front gets its mask sheet and density plot logged; the dense one, with no gate, none."""
    from gatesearch.search.previews import log_previews
    from gatesearch.spaces import EvalConfig

    tracker, recorder, _, _ = recorded
    front = [{"trial_id": t, "run_id": rid, "quality": METRICS[t]["quality"]} for t, rid in recorder.runs.items()]
    done = log_previews(tracker, front, data=DATA, evaluation=EvalConfig(frames=4), out=tmp_path)
    assert done == ["t_input"]
    logged = {t: {a.path for a in tracker.client.list_artifacts(rid, "masks")} for t, rid in recorder.runs.items()}
    assert logged == {"t_dense": set(), "t_input": {"masks/masks.png", "masks/density.png"}}
