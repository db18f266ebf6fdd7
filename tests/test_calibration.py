"""Per-layer thresholds from one target: hit on the calibration clips, monotone, carried by exported models."""

import json

import pytest
import torch

from gatesearch.models import build_model
from gatesearch.objectives import MacCounter
from gatesearch.policies.calibration import calibrate_thresholds, layer_thresholds, set_layer_thresholds
from gatesearch.spaces import TrialConfig

STEPS = 9  # coarser than the default where the resolution does not matter, for speed: 48 octaves to 0.09


@pytest.fixture(scope="module")
def clips():
    from gatesearch.data import SyntheticConfig, make_clip

    cfg = SyntheticConfig(height=32, width=32, frames=6, seed=3)
    return torch.stack([make_clip(cfg, i, "train")["clip"] for i in range(2)])  # (2, 6, 3, 32, 32)


def gated(reference="frame", task="classification"):
    knobs = {"threshold": 1.0, "block_size": 2, "reference": reference}
    return build_model(TrialConfig(gate="input_norm", task=task, knobs=knobs), 12).eval()


@pytest.mark.parametrize("reference", ["frame", "block"])
def test_density_target_is_hit_layer_by_layer_and_overall(clips, reference):
    model = gated(reference)
    found = calibrate_thresholds(model, clips, target="density", value=0.25)
    assert len(found) == 5 and len({lt.threshold for lt in found.values()}) > 1  # one ε per layer, not one for all
    for lt in found.values():
        assert lt.measured == pytest.approx(0.25, abs=0.05)
    counter = MacCounter(model, (3, 32, 32))
    counter.reset()
    with torch.inference_mode():
        model.stream(clips)
    t = clips.shape[1]  # the reference frame is dense, the others at the target
    assert counter.report().mean_density == pytest.approx((1 + (t - 1) * 0.25) / t, abs=0.05)


def test_tighter_error_target_never_gives_a_larger_threshold(clips):
    model = gated()
    looser, tighter = (calibrate_thresholds(model, clips, target="error", value=e, steps=STEPS) for e in (0.1, 0.01))
    assert all(tighter[name].threshold <= lt.threshold for name, lt in looser.items())
    assert any(tighter[name].threshold < lt.threshold for name, lt in looser.items())  # and the target matters
    assert all(lt.measured <= 0.1 for lt in looser.values()) and all(lt.measured <= 0.01 for lt in tighter.values())


def test_heatmap_task_leaves_layers_it_never_runs(clips):
    model = gated(task="heatmap")
    found = calibrate_thresholds(model, clips, target="density", value=0.5, steps=4)
    assert set(found) < set(layer_thresholds(model))  # the deep stage is not on a heatmap's path
    assert all(layer_thresholds(model)[name] == 1.0 for name in set(layer_thresholds(model)) - set(found))


@pytest.mark.parametrize("target, value, text", [
    ("speed", 0.5, "must be one of density, error"),
    ("density", 1.5, "must be in (0, 1]"),
    ("error", 0.0, "must be in (0, inf)"),
])
def test_bad_targets(clips, target, value, text):
    with pytest.raises(ValueError, match=text.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        calibrate_thresholds(gated(), clips, target=target, value=value)


def test_set_layer_thresholds_checks_names_and_values():
    model = gated()
    with pytest.raises(ValueError, match="no norm-gated layer"):
        set_layer_thresholds(model, {"backbone.nope": 1.0})
    with pytest.raises(ValueError, match="expected a number >= 0"):
        set_layer_thresholds(model, {next(iter(layer_thresholds(model))): -1.0})


def test_exported_per_layer_thresholds_round_trip(tmp_path, clips, static_clip):
    from gatesearch.export import ArtifactError, load_artifact, save_artifact, trial_meta
    from gatesearch.spaces import DataConfig

    trial = TrialConfig(gate="input_norm", knobs={"threshold": 1.0, "block_size": 2})
    model = build_model(trial, 12).eval()
    calibrate_thresholds(model, clips, target="density", value=0.3, steps=4)
    meta = trial_meta(trial, metrics={}, data=DataConfig(), num_classes=12, frame_shape=(3, 32, 32))
    out = save_artifact(tmp_path / "art", model, meta)
    stored = json.loads((out / "gatesearch.json").read_text())["layer_thresholds"]
    assert stored == layer_thresholds(model) and len(set(stored.values())) > 1
    art = load_artifact(out)
    assert layer_thresholds(art.model) == stored
    with torch.inference_mode():
        assert torch.equal(art.model.stream(static_clip), model.stream(static_clip))
    # an artifact written before per-layer ε: every layer keeps the trial's threshold
    del stored[next(iter(stored))]
    old = json.loads((out / "gatesearch.json").read_text())
    old.pop("layer_thresholds")
    (out / "gatesearch.json").write_text(json.dumps(old))
    assert set(layer_thresholds(load_artifact(out).model).values()) == {1.0}
    old["layer_thresholds"] = {"backbone.stem.9": 0.5}
    (out / "gatesearch.json").write_text(json.dumps(old))
    with pytest.raises(ArtifactError, match="no norm-gated layer"):
        load_artifact(out)


def test_a_trial_calibrates_its_gate_and_the_search_samples_the_target():
    """The search's knob is the target: ``calibrate: density`` in the YAML makes the sampled threshold a density,
    and each trial's layers get their own ε on its training clips before evaluation."""
    import optuna

    from gatesearch.search.trial import run_trial
    from gatesearch.spaces import DataConfig, EvalConfig, parse_search_config

    cfg = parse_search_config({"space": {"gate": "input_norm", "clip_length": 4, "block_size": 2,
                                         "gates": {"input_norm": {"calibrate": "density",
                                                                  "threshold": {"low": 0.2, "high": 0.4}}}}})
    trial = cfg.space.suggest(optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3)).ask())
    assert trial.knobs["calibrate"] == "density" and 0.2 <= trial.knobs["threshold"] <= 0.4
    data = DataConfig(train_clips=8, val_clips=2, synthetic={"height": 32, "width": 32})
    out = run_trial(trial, data, EvalConfig(frames=4, latency_warmup=0, latency_repeats=1))
    thresholds = layer_thresholds(out.model)
    assert len(set(thresholds.values())) > 1 and trial.knobs["threshold"] not in thresholds.values()
    residual = [(4 * d - 1) / 3 for d in out.layer_density.values()]  # 4-frame clips, the first one dense
    assert all(abs(r - trial.knobs["threshold"]) < 0.2 for r in residual)  # held-out clips: near the target


def test_calibrate_is_one_per_search():
    from gatesearch.spaces import SpaceError, parse_search_config

    with pytest.raises(SpaceError, match="calibrate: one value, not several"):
        parse_search_config({"space": {"gate": "input_norm", "gates": {"input_norm": {"calibrate": ["off", "error"]}}}})
