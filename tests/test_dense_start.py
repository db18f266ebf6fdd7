"""Train once, gate many, without Ray: the dense cache, the user's weights checked up front, trials from weights."""

import json

import pytest
import torch

from gatesearch.backbones import WeightsError, build
from gatesearch.search.dense import DenseCache, cache_key, plan
from gatesearch.search.trial import Baseline, run_trial
from gatesearch.spaces import DataConfig, EvalConfig, TrialConfig, parse_search_config

DATA = DataConfig(train_clips=8, val_clips=8, synthetic={"height": 32, "width": 32})
EVAL = EvalConfig(frames=4, latency_warmup=0, latency_repeats=1, latency_clips=2)


def dense_state(backbone="resnet18_tiny", seed=0):
    torch.manual_seed(seed)
    return build(backbone, task="classification", num_classes=12).state_dict()


def as_dense(gated: dict, dense: dict) -> dict:
    """The gated model's tensors under the dense names (a skip-conv keeps its conv as ``.conv``)."""
    return {k: gated[k] if k in gated else gated[k.removesuffix(".weight") + ".conv.weight"] for k in dense}


def test_norm_gate_trial_does_no_optimiser_step():
    """Its weights stay bit-identical to the dense start (ε acts at inference only), and it reports a paired drop
    and a speedup against the baseline; a Gumbel trial fine-tunes the same start (so the check can fail)."""
    start = dense_state()
    cfg = TrialConfig(backbone="resnet18_tiny", gate="input_norm", knobs={"threshold": 0.5, "block_size": 2},
                      clip_length=4, epochs=0)
    baseline = Baseline(per_clip=(1.0,) * 8, latency_ms=2.0, macs=1.0)
    out = run_trial(cfg, DATA, EVAL, start=start, baseline=baseline)
    after = as_dense(out.model.state_dict(), start)
    assert all(torch.equal(after[k], start[k]) for k in start)
    assert "train_loss" not in out.metrics and out.metrics["quality_clips"] == 8
    assert out.metrics["quality_drop"] == pytest.approx(1.0 - out.metrics["quality"])
    assert out.metrics["speedup"] == pytest.approx(2.0 / out.metrics["latency_ms"])

    gumbel = TrialConfig(backbone="resnet18_tiny", gate="gumbel", knobs={"beta": 0.1, "block_size": 2},
                         clip_length=2, epochs=1, lr=1e-3)
    tuned = as_dense(run_trial(gumbel, DATA, EVAL, start=start).model.state_dict(), start)
    assert not torch.equal(tuned["backbone.conv1.weight"], start["backbone.conv1.weight"])


def test_trials_of_a_search_train_only_gates_with_parameters_of_their_own():
    cfg = parse_search_config({"model": {"finetune_epochs": 3}, "space": {"gate": ["dense", "input_norm", "gumbel"]}})
    assert cfg.space.epochs_by_gate == {"dense": 0, "input_norm": 0, "gumbel": 3}
    cfg = parse_search_config({"model": {"from_scratch": True}, "space": {"gate": ["input_norm"], "epochs": 5}})
    assert cfg.space.epochs_by_gate is None and cfg.space.shared["epochs"].value == 5


def test_dense_cache_round_trip_and_key(tmp_path):
    cache = DenseCache(tmp_path / "dense")
    trial = TrialConfig(backbone="tiny", epochs=2)
    sig = [["w", [2]]]
    key = cache_key(trial, DATA, 12, init_source=None, prefix_map={}, signature=sig)
    assert cache.load(key) is None
    state = {"w": torch.arange(3.0)}
    entry = cache.store(key, state, {"train_loss": 1.0})
    assert torch.equal(cache.load(key)["w"], state["w"])
    assert json.loads((entry / "dense.json").read_text())["key"] == key
    assert [p.name for p in (tmp_path / "dense").iterdir()] == [entry.name]  # no temporary left behind
    # what the weights depend on changes the key; the held-out clips do not
    same = cache_key(trial, DataConfig(train_clips=8, val_clips=99, synthetic=DATA.synthetic), 12, init_source=None,
                     prefix_map={}, signature=sig)
    other = cache_key(TrialConfig(backbone="tiny", epochs=3), DATA, 12, init_source=None, prefix_map={},
                      signature=sig)
    assert same == key and other != key
    (entry / "model.safetensors").write_bytes(b"broken")
    assert cache.load(key) is None  # damaged: trained again


def search_with_weights(path, prefix_map=None, backbone="resnet18_tiny"):
    model = {"weights": str(path), **({"prefix_map": prefix_map} if prefix_map else {})}
    return parse_search_config({"model": model, "data": {"synthetic": {"height": 32, "width": 32}},
                                "space": {"backbone": backbone, "gate": "input_norm"}})


def test_plan_takes_torchvision_layout_weights_and_trains_only_the_missing_head(tmp_path):
    torchvision = {k.removeprefix("backbone."): v for k, v in dense_state().items() if k.startswith("backbone.")}
    torchvision |= {"fc.weight": torch.zeros(1000, 128), "fc.bias": torch.zeros(1000)}
    path = tmp_path / "resnet.pth"
    torch.save(torchvision, path)
    (p,) = plan(search_with_weights(path, {"fc.": None}))
    assert p.train and p.init_source["path"] == str(path) and len(p.init_source["sha256"]) == 64
    assert torch.equal(p.init["backbone.layer1.0.conv1.weight"], torchvision["layer1.0.conv1.weight"])
    whole = tmp_path / "whole.pth"
    torch.save(dense_state(seed=3), whole)
    (p,) = plan(search_with_weights(whole))
    assert not p.train and p.cache_key is None  # the head is there: used as it is


@pytest.mark.parametrize("content, message", [
    (lambda: {"conv1.weight": torch.zeros(16, 3, 7, 7), "fc.weight": torch.zeros(3, 3)},
     r"does not match ResNet: missing \d+ keys \(.*\); unexpected 1 key \(fc.weight\)"),
    (lambda: {"backbone.conv1.weight": torch.zeros(8, 3, 7, 7)}, r"shape of backbone.conv1.weight is \(8, 3, 7, 7\)"),
])
def test_plan_refuses_weights_that_do_not_match_in_one_line(tmp_path, content, message):
    path = tmp_path / "w.pth"
    torch.save(content(), path)
    with pytest.raises(WeightsError, match=message) as e:
        plan(search_with_weights(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)
