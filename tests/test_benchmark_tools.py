"""The measuring instruments of benchmarks/skipconv_model.py: the position probe and per-stage overrides."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from skipconv_model import PositionProbe, apply_stages, parse_stage


def test_probe_does_not_shrink_its_intercept():
    """However large the penalty, the probe falls back to the mean centre, never toward (0, 0)."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(4, 25, 40, generator=g)
    true = torch.randn(40, 2, generator=g)
    centers = 112 + 5 * feats @ true / 40 ** 0.5
    heavy = PositionProbe.fit(feats, centers, ridge=1e9).predict(feats)
    assert torch.allclose(heavy, centers.reshape(-1, 2).mean(0).expand_as(heavy), atol=0.1)
    light = PositionProbe.fit(feats, centers, ridge=1e-3)
    assert (light.predict(feats) - centers).abs().max() < 0.1
    chosen = PositionProbe.select(feats, centers, radius=1.0)
    assert chosen.ridge in PositionProbe.RIDGES and chosen.pck(feats, centers, 1.0) > 0.9


def test_stage_overrides():
    from gatesearch.backbones import build
    from gatesearch.policies import build_policy
    from gatesearch.policies.skipconv import skip_layers

    assert parse_stage("backbone.layer4:b=2,scale=0.5") == ("backbone.layer4", {"b": 2, "scale": 0.5})
    for bad in ("layer4", "x:b=two", "x:q=1", ":b=2"):
        with pytest.raises(Exception, match="expected PREFIX:b=B,scale=S"):
            parse_stage(bad)
    model = build_policy("input_norm", threshold=0.1, block_size=4, per_value=True).apply(
        build("resnet18_tiny", task="classification", num_classes=3))
    apply_stages(model, [parse_stage("backbone.layer4:b=1,scale=0.5")])
    for layer in skip_layers(model):
        deep = layer.name.startswith("backbone.layer4")
        assert layer.block_size == (1 if deep else 4) and layer.gate.threshold == (0.05 if deep else 0.1)
    with pytest.raises(SystemExit, match="no gated layer"):
        apply_stages(model, [parse_stage("backbone.layer9:b=2")])
