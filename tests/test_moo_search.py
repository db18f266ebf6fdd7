"""A small search with early stopping, budgets, warm start and named objectives, read back from both stores."""

import json

import pytest
import yaml
from click.testing import CliRunner

from gatesearch.cli import main

pytestmark = pytest.mark.slow

CONFIG = {
    "name": "moo",
    "trials": 3,
    "max_concurrent": 1,  # the trials reach the rung in the order they were enqueued
    "seed": 0,
    "objective": "macs",
    "model": {"from_scratch": True},  # trials train from random weights for space.epochs: rungs to stop at
    "data": {"train_clips": 32, "val_clips": 16, "synthetic": {"height": 32, "width": 32}},
    "evaluation": {"frames": 8, "latency_repeats": 2},
    "space": {"gate": ["dense", "input_norm"], "clip_length": 2, "epochs": 3, "block_size": 2,
              "lr": {"low": 1e-6, "high": 0.02, "log": True},
              "gates": {"input_norm": {"threshold": {"low": 1e-4, "high": 50.0, "log": True}}}},
    # one rung, at epoch 2 (the next, 6, is past the last epoch, 3)
    "early_stopping": {"kind": "dominance", "grace_period": 2, "reduction_factor": 3, "probe_clips": 16},
    "warm_start": [
        {"gate": "dense", "lr": 0.01},  # first at the rung, goes on; over the MAC budget
        # trains as dense does (norm gates train batched), skips nothing at this ε, and pays for its gates:
        # the same quality as the first for more MACs, so it is dominated at the rung
        {"gate": "input_norm", "lr": 0.01, "threshold": 1e-4},
        {"gate": "input_norm", "lr": 0.01, "threshold": 50.0},  # far fewer MACs: nothing dominates it
    ],
}


def test_search_prunes_dominated_trials_and_keeps_the_front_within_budget(tmp_path, monkeypatch, ray_session):
    import optuna
    from mlflow.tracking import MlflowClient

    from gatesearch.data.source import num_classes
    from gatesearch.models import build_model
    from gatesearch.objectives import dense_macs
    from gatesearch.search.hypervolume import Reference, hypervolume
    from gatesearch.spaces import DataConfig, TrialConfig

    dense, _ = dense_macs(build_model(TrialConfig(), num_classes(DataConfig(**CONFIG["data"]))), (3, 32, 32))
    config = {**CONFIG, "constraints": {"max_macs": 0.9 * dense}}
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(config))
    runner = CliRunner()
    address = ray_session.get_runtime_context().gcs_address
    r = runner.invoke(main, ["search", "s.yaml", "--json", "--ray-address", address])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert (summary["trials_completed"], summary["trials_pruned"], summary["trials_failed"]) == (2, 1, 0), r.output
    assert summary["trials_infeasible"] == 1

    # Optuna: warm start in order, metric names, the pruned trial, constraints on the finished ones
    study = optuna.load_study(study_name=summary["search_id"], storage=summary["optuna_storage"])
    assert study.metric_names == ["quality", "macs"]
    trials = sorted(study.trials, key=lambda t: t.number)
    assert [(t.params["gate"], t.params.get("input_norm.threshold")) for t in trials] == \
        [("dense", None), ("input_norm", 1e-4), ("input_norm", 50.0)]
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                                         optuna.trial.TrialState.COMPLETE]
    assert trials[1].user_attrs["stopped_at_epoch"] == 2 and trials[1].values is None
    assert trials[0].constraints["max_macs"] > 0 >= trials[2].constraints["max_macs"]
    ids = [t.user_attrs["tune_trial_id"] for t in trials]

    # the front holds the feasible trial only; the hypervolume is that of the front from the dense reference
    assert [row["trial_id"] for row in summary["pareto"]] == [ids[2]]
    gated = summary["pareto"][0]
    assert summary["hypervolume_reference"] == {"quality": 0.0, "cost": pytest.approx(dense)}
    assert summary["hypervolume"] == pytest.approx(hypervolume([(gated["quality"], gated["macs"])],
                                                               Reference(0.0, dense)))

    # MLflow: the pruned trial's run is KILLED and tagged with its rung; the parent carries the hypervolume per step
    client = MlflowClient(summary["tracking_uri"])
    runs = {x.data.tags.get("gatesearch.trial_id"): x for x in
            client.search_runs([client.get_experiment_by_name("moo").experiment_id])}
    assert runs[ids[1]].info.status == "KILLED" and runs[ids[1]].data.tags["gatesearch.stopped_at_epoch"] == "2"
    assert [runs[i].data.tags["gatesearch.feasible"] for i in (ids[0], ids[2])] == ["false", "true"]
    assert [t.user_attrs["mlflow_run_id"] for t in trials] == [runs[i].info.run_id for i in ids]
    parent = runs[None]
    history = client.get_metric_history(parent.info.run_id, "hypervolume")
    assert [m.step for m in history] == [1, 2] and history[-1].value == pytest.approx(summary["hypervolume"])

    # gatesearch pareto: the same budget as a flag gives the same front; a looser one lets the dense trial in
    r = runner.invoke(main, ["pareto", "--json", "--max-macs", str(0.9 * dense)])
    assert r.exit_code == 0 and [row["trial_id"] for row in json.loads(r.stdout)["pareto"]] == [ids[2]]
    r = runner.invoke(main, ["pareto", "--json", "--max-macs", str(2 * dense)])
    front = {row["trial_id"] for row in json.loads(r.stdout)["pareto"]}
    assert ids[2] in front and ids[1] not in front
