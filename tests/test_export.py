"""The artifact format: round trip, and refusal of missing, foreign or broken folders."""

import json

import pytest
import torch

from gatesearch.export import ArtifactError, load_artifact, save_artifact, trial_meta
from gatesearch.export.runner import run_stream
from gatesearch.export.stream import Stream
from gatesearch.models import build_model
from gatesearch.spaces import DataConfig, TrialConfig

TRIAL = TrialConfig(gate="input_norm", knobs={"threshold": 0.3, "block_size": 2}, clip_length=4)
DATA = DataConfig(synthetic={"height": 32, "width": 32})


def make(tmp_path, name="art"):
    model = build_model(TRIAL, 12).eval()
    meta = trial_meta(TRIAL, metrics={"quality": 0.5}, data=DATA, num_classes=12, frame_shape=(3, 32, 32),
                      trial_id="abc")
    return model, save_artifact(tmp_path / name, model, meta)


def test_round_trip_same_outputs(tmp_path, static_clip):
    model, out = make(tmp_path)
    art = load_artifact(out)
    assert art.trial == TRIAL and art.meta["metrics"] == {"quality": 0.5}
    assert json.loads((out / "gatesearch.json").read_text())["gatesearch_version"]
    with torch.inference_mode():
        assert torch.equal(art.model.stream(static_clip), model.stream(static_clip))
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no temporary folder left behind


def test_gate_options_travel_with_the_artifact(tmp_path, static_clip):
    """A trial with the block reference and per-value ε exports and reloads as that gate, not the paper's default."""
    trial = TrialConfig(gate="input_norm",
                        knobs={"threshold": 0.02, "block_size": 2, "reference": "block", "per_value": True})
    model = build_model(trial, 12).eval()
    meta = trial_meta(trial, metrics={}, data=DATA, num_classes=12, frame_shape=(3, 32, 32))
    art = load_artifact(save_artifact(tmp_path / "opt", model, meta))
    assert art.trial == trial
    from gatesearch.policies.skipconv import skip_layers

    layers = skip_layers(art.model)
    assert layers and all(layer.reference == "block" and layer.gate.per_value for layer in layers)
    with torch.inference_mode():
        assert torch.equal(art.model.stream(static_clip), model.stream(static_clip))


#: the ``trial`` of a gatesearch.json as written before a trial's knobs were one mapping: every gate's knobs, null
#: where the trial's gate does not take them
OLD_FORM_TRIAL = {
    "backbone": "tiny", "width": 1.0, "task": "classification", "gate": "input_norm", "threshold": 0.3, "beta": None,
    "target_flops_ratio": None, "block_size": 2, "reference": None, "per_value": None, "search_space_size": None,
    "lambda_e": None, "clip_length": 4, "lr": 0.003, "epochs": 3, "batch_size": 8, "seed": 0,
}


def test_artifacts_written_in_the_old_form_still_load(tmp_path, static_clip):
    model, out = make(tmp_path)
    meta = json.loads((out / "gatesearch.json").read_text())
    meta["trial"] = OLD_FORM_TRIAL
    (out / "gatesearch.json").write_text(json.dumps(meta))
    art = load_artifact(out)
    assert art.trial == TRIAL and art.trial.knobs == {"threshold": 0.3, "block_size": 2}
    with torch.inference_mode():
        assert torch.equal(art.model.stream(static_clip), model.stream(static_clip))


@pytest.mark.parametrize("change, message", [
    ({"beta": 1.0}, "gate 'input_norm' does not take 'beta'"),
    ({"threshold": -1.0}, "gate 'input_norm': threshold: must be >= 0.0"),
    ({"threshold": None}, "gate 'input_norm' needs 'threshold'"),
    ({"gate": "gumbal"}, "unknown gate 'gumbal'"),
])
def test_bad_knobs_in_an_artifact_are_one_line_errors(tmp_path, change, message):
    _, out = make(tmp_path)
    meta = json.loads((out / "gatesearch.json").read_text())
    meta["trial"].update(change)
    (out / "gatesearch.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=f"bad configuration \\({message}") as e:
        load_artifact(out)
    assert "\n" not in str(e.value)


def test_refuses_to_overwrite(tmp_path):
    make(tmp_path)
    with pytest.raises(ArtifactError, match="already exists"):
        make(tmp_path)


@pytest.mark.parametrize("breakage, message", [
    (lambda d: (d / "gatesearch.json").unlink(), "not a gatesearch artifact"),
    (lambda d: (d / "model.safetensors").unlink(), "incomplete artifact"),
    (lambda d: (d / "gatesearch.json").write_text('{"format": "other/2"}'), "foreign format 'other/2'"),
    (lambda d: (d / "gatesearch.json").write_text("{nope"), "not valid JSON"),
    (lambda d: (d / "model.safetensors").write_bytes(b"garbage"), "unreadable weights"),
])
def test_broken_artifacts_are_refused(tmp_path, breakage, message):
    _, out = make(tmp_path)
    breakage(out)
    with pytest.raises(ArtifactError, match=message) as e:
        load_artifact(out)
    assert "\n" not in str(e.value)


def test_weights_of_another_model_are_refused(tmp_path):
    _, out = make(tmp_path)
    meta = json.loads((out / "gatesearch.json").read_text())
    meta["trial"]["width"] = 2.0
    (out / "gatesearch.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="do not match"):
        load_artifact(out)


def test_missing_folder(tmp_path):
    with pytest.raises(ArtifactError, match="no such artifact folder"):
        load_artifact(tmp_path / "nope")


def test_run_stream_summary(tmp_path, static_clip):
    _, out = make(tmp_path)
    seen = []
    summary = run_stream(Stream(load_artifact(out), reset_every=8), iter(static_clip[0]), on_frame=seen.append)
    assert summary["frames"] == 16 == len(seen)
    assert seen[0].density == 1.0 and seen[8].density == 1.0  # reference frames
    assert 0 <= summary["mean_density"] <= 1
    assert summary["macs_per_frame"] <= summary["dense_macs_per_frame"] * 1.1
    assert summary["latency_ms_per_frame"] > 0 and "predicted_class" in summary


def as_format_1(out):
    meta = json.loads((out / "gatesearch.json").read_text())
    meta["format"] = "gatesearch-model/1"
    (out / "gatesearch.json").write_text(json.dumps(meta))


def test_an_output_norm_artifact_of_format_1_keeps_its_decisions(tmp_path):
    """Format /1 bounded ‖w‖₁·‖r‖₁ summed over the output channels; read per channel, each layer's ε is ε / C_out."""
    from gatesearch.policies.calibration import norm_layers

    trial = TrialConfig(gate="output_norm", knobs={"threshold": 40.0, "block_size": 1}, clip_length=4)
    model = build_model(trial, 12).eval()
    out = save_artifact(tmp_path / "old", model, trial_meta(trial, metrics={}, data=DATA, num_classes=12,
                                                            frame_shape=(3, 32, 32)))
    now = {name: layer.gate.threshold for name, layer in norm_layers(load_artifact(out).model).items()}
    assert set(now.values()) == {40.0}
    as_format_1(out)
    then = norm_layers(load_artifact(out).model)
    assert {name: layer.gate.threshold for name, layer in then.items()} == {
        name: 40.0 / layer.conv.out_channels for name, layer in then.items()}


def test_a_gumbel_artifact_of_format_1_is_refused_in_one_line(tmp_path):
    trial = TrialConfig(gate="gumbel", knobs={"beta": 0.1, "block_size": 1}, clip_length=4)
    model = build_model(trial, 12).eval()
    out = save_artifact(tmp_path / "old", model, trial_meta(trial, metrics={}, data=DATA, num_classes=12,
                                                            frame_shape=(3, 32, 32)))
    load_artifact(out)
    as_format_1(out)
    with pytest.raises(ArtifactError, match="Gumbel gate exported in gatesearch-model/1.*search again") as e:
        load_artifact(out)
    assert "\n" not in str(e.value)
