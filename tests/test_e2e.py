"""One real search end to end: Ray Tune + Optuna + MLflow, then export and run."""

import json

import pytest
import yaml
from click.testing import CliRunner

from gatesearch.cli import main

pytestmark = pytest.mark.slow

CONFIG = """
name: e2e
trials: 4
max_concurrent: 2
seed: 1
model: {train: {epochs: 1}}
data: {train_clips: 24, val_clips: 8, synthetic: {height: 32, width: 32}}
evaluation: {frames: 8, latency_repeats: 2}
space:
  gate: [dense, input_norm, output_norm]
  clip_length: [2, 4]
  block_size: [2, 4]
"""


def test_search_records_pareto_then_export_and_run(tmp_path, monkeypatch, ray_session):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "s.yaml").write_text(CONFIG)
    runner = CliRunner()
    # --ray-address joins the session's Ray instead of starting one
    address = ray_session.get_runtime_context().gcs_address
    r = runner.invoke(main, ["search", "s.yaml", "--json", "--ray-address", address])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["trials_completed"] + summary["trials_failed"] == 4
    assert summary["trials_completed"] >= 3 and summary["pareto"]
    for key in ("search_id", "tracking_uri", "wall_s"):
        assert key in summary
    front = summary["pareto"]
    assert all({"trial_id", "gate", "params", "quality", "latency_ms", "macs"} <= set(row) for row in front)
    # every trial is judged against the dense network of this search: paired drop, its interval, speedup
    dense = summary["dense"]["tiny@1"]
    assert dense["quality_clips"] == 8 and dense["weights"]["trained"] is True
    for row in front:
        assert row["quality_clips"] == 8 and row["speedup"] > 0
        low, high = row["quality_drop_ci"]
        assert low <= row["quality_drop"] <= high
        assert row["quality_drop"] == pytest.approx(dense["quality"] - row["quality"])

    client = MlflowClient(summary["tracking_uri"])
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id])
    parents = [x for x in runs if x.data.tags.get("gatesearch.kind") == "search"]
    children = [x for x in runs if x.data.tags.get("gatesearch.kind") == "trial"]
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert all("quality" in c.data.metrics and "latency_ms" in c.data.metrics
               for c in children if c.info.status == "FINISHED")
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"pareto.json", "pareto.csv", "search_config.json", "pareto.png"} <= artifacts
    assert {c.data.tags["gatesearch.pareto"] for c in children} <= {"true", "false"}  # on every trial
    tagged = {c.data.tags["gatesearch.trial_id"] for c in children if c.data.tags["gatesearch.pareto"] == "true"}
    assert tagged == {row["trial_id"] for row in front}
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    for c in children:
        if c.info.status != "FINISHED":
            continue
        m = c.data.metrics
        # the run spans the trial: opened when it started, closed when it ended
        assert c.info.end_time - c.info.start_time >= 1000 * (m["data_s"] + m["train_s"] + m["eval_s"])
        assert not {"pid", "timestamp", "time_this_iter_s", "training_iteration", "epoch"} & set(m)
        # a loss per epoch trained: none here (norm gates and dense start from the trained dense network)
        epochs = int(c.data.params["epochs"])
        assert [h.step for h in client.get_metric_history(c.info.run_id, "train_loss")] == list(range(1, epochs + 1))
        gate_knobs = {"dense": set(), "input_norm": {"threshold", "block_size"},
                      "output_norm": {"threshold", "block_size"}}[c.data.params["gate"]]
        assert set(c.data.params) == {"backbone", "width", "task", "gate", "clip_length", "lr", "epochs",
                                      "batch_size", "seed"} | gate_knobs
    for row in front:  # a mask preview on every Pareto-optimal trial with a gate
        logged = {a.path for a in client.list_artifacts(row["run_id"], "masks")}
        expected = {"masks/density.png", "masks/masks.png"} if row["gate"] != "dense" else set()
        assert logged == expected
    models = client.search_logged_models([exp.experiment_id])
    assert {lm.source_run_id for lm in models} == {c.info.run_id for c in children if c.info.status == "FINISHED"}

    r = runner.invoke(main, ["pareto", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["pareto"] == json.loads(json.dumps(front))
    r = runner.invoke(main, ["pareto", summary["search_id"], "--min-quality", "2"])
    assert r.exit_code == 0 and "no Pareto-optimal trials" in r.output

    best = max(front, key=lambda row: row["quality"])
    r = runner.invoke(main, ["export", best["trial_id"], "--out", "model"])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "model" / "gatesearch.json").read_text())
    assert meta["trial_id"] == best["trial_id"] and meta["metrics"]["quality"] == best["quality"]
    assert meta["trial"]["gate"] == best["gate"] and meta["gatesearch_version"]
    assert meta["search_id"] == summary["search_id"]
    r = runner.invoke(main, ["export", best["trial_id"], "--register", "e2e-best"])
    assert r.exit_code == 0 and "e2e-best version 1" in r.output, r.output
    r = runner.invoke(main, ["run", "model", "--frames", "8", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["frames"] == 8 and {"mean_density", "macs_per_frame", "latency_ms_per_frame"} <= set(out)


FOLDER_CONFIG = """
name: folder-{task}
trials: 1
max_concurrent: 1
model: {{train: {{epochs: 1}}}}
data:
  kind: video_folder
  train_clips: 16
  val_clips: 8
  folder: {{root: vf, height: 32, width: 32}}
evaluation: {{frames: 4, latency_repeats: 2}}
space:
  backbone: {backbone}
  task: {task}
  gate: input_norm
  threshold: 1.0
  block_size: 2
  clip_length: 4
"""


@pytest.mark.parametrize("backbone, task", [("resnet18_tiny", "classification"), ("hrnet_small", "heatmap")])
def test_search_on_video_folder_with_a_corrupt_file(tmp_path, monkeypatch, ray_session, backbone, task):
    """Issue 5: the synthetic data written as mp4 files, a corrupt one among them, searched through the CLI."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runner = CliRunner()
    r = runner.invoke(main, ["data", "synth", "vf", "--clips-per-class", "3", "--frames", "8", "--height", "32",
                             "--width", "32", "--shapes", "2", "--directions", "2"])
    assert r.exit_code == 0, r.output
    (tmp_path / "vf" / "disk-left" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x17" * 4000)
    (tmp_path / "s.yaml").write_text(FOLDER_CONFIG.format(backbone=backbone, task=task))
    address = ray_session.get_runtime_context().gcs_address
    r = runner.invoke(main, ["search", "s.yaml", "--json", "--ray-address", address])
    assert r.exit_code == 0, r.output
    assert "broken.mp4" in r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["trials_completed"] == 1 and summary["trials_failed"] == 0
    assert 0.0 <= summary["pareto"][0]["quality"] <= 1.0


FAMILY_CONFIG = """
name: family-{gate}
trials: 2
max_concurrent: 2
model: {{train: {{epochs: 1}}, finetune_epochs: 2}}
data: {{train_clips: 16, val_clips: 8, synthetic: {{height: 32, width: 32}}}}
evaluation: {{frames: 8, latency_repeats: 2}}
space:
  backbone: {backbone}
  gate: {gate}
  clip_length: 4
  gates: {{{gate}: {knobs}}}
"""


@pytest.mark.parametrize("backbone, gate, knobs", [
    ("resnet18_tiny", "dstep", "{target_flops_ratio: {low: 0.3, high: 0.8}, block_size: [2, 4]}"),
    ("r2plus1d_tiny", "vared2", "{search_space_size: [2, 3], lambda_e: {low: 0.1, high: 3.0, log: true}}"),
])
def test_dstep_and_vared2_search_through_the_cli(tmp_path, monkeypatch, ray_session, backbone, gate, knobs):
    """Issues 6 and 7: each family's knobs are sampled from YAML and its trials complete with MACs recorded."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "s.yaml").write_text(FAMILY_CONFIG.format(backbone=backbone, gate=gate, knobs=knobs))
    address = ray_session.get_runtime_context().gcs_address
    r = CliRunner().invoke(main, ["search", "s.yaml", "--json", "--ray-address", address])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["trials_completed"] == 2 and summary["trials_failed"] == 0
    row = summary["pareto"][0]
    assert row["gate"] == gate and set(row["params"]) >= set(yaml.safe_load(knobs))
    assert row["macs"] > 0 and row["dense_macs"] > 0
    r = CliRunner().invoke(main, ["export", row["trial_id"], "--out", "model"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["bench", "--artifact", "model", "--frames", "8", "--repeats", "1", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert (out["backbone"], out["gate"]) == (backbone, gate)  # the artifact's, not the option defaults
    assert out["max_abs_diff"] <= 1e-4
