"""A gate that lives in this file alone goes through the whole flow: the contract, space sampling (Optuna), a
one-trial search (Ray Tune, MLflow), export and ``gatesearch run``. Nothing else in the tree names it, which is
the promise to anyone who writes a gate: one file.

The toy gate scales every per-frame convolution's output by a knob ``gain`` (its own ``Param``); ``gain = 1``
is the dense network. It is registered by a fixture and taken out again, so no other test sees it.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from gate_contract import (
    check_backward,
    check_export,
    check_fine_tunes,
    check_forward,
    check_keep_all,
    check_macs,
    make_batch,
)
from torch import nn

from gatesearch.policies import POLICIES, Policy, register_policy
from gatesearch.policies.base import FrameAverages
from gatesearch.policies.structure import FRAME_CONVS
from gatesearch.spaces import Param, SpaceError, TrialConfig, parse_search_config

NAME = "toy_scale"
pytestmark = pytest.mark.usefixtures("toy_gate")


class ScaledConv2d(FrameAverages, nn.Module):
    """``gain · conv(x)``; computes everything, and says so to the MAC counter (density 1, no gate MACs)."""

    def __init__(self, conv: nn.Conv2d, gain: float) -> None:
        super().__init__()
        self.conv, self.gain = conv, gain
        self.force_open = False  # open: the plain conv
        self.reset_stats()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            self.frames, self.density_sum = self.frames + 1, self.density_sum + 1.0
        out = self.conv(x)
        return out if self.force_open else out * self.gain


class ToyScale(Policy):
    """Toy gate: scales every per-frame conv's output by ``gain``."""

    params = (Param(name="gain", kind=float, low=0.0, high=2.0, default={"low": 0.5, "high": 1.5},
                    doc="factor on every conv's output"),)
    requires = (FRAME_CONVS,)

    @classmethod
    def keep_all(cls) -> dict:
        return {"gain": 1.0}

    def apply(self, model: nn.Module) -> nn.Module:
        for parent in list(model.backbone.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Conv2d:
                    setattr(parent, name, ScaledConv2d(child, self.knobs["gain"]))
        return model


@pytest.fixture(scope="module")
def toy_gate():
    register_policy(NAME)(ToyScale)
    try:
        yield ToyScale
    finally:
        POLICIES.unregister(NAME)
    assert NAME not in POLICIES


@pytest.fixture(scope="module")
def batch():
    return make_batch(clips=2, frames=3, size=32)


@pytest.mark.parametrize("check", [check_forward, check_backward, check_keep_all, check_macs, check_fine_tunes])
def test_contract(check, batch):
    check("tiny", NAME, batch)


def test_export_round_trip(batch, tmp_path):
    check_export("tiny", NAME, batch, tmp_path)


def test_space_samples_its_param_and_checks_its_knobs():
    import optuna

    gain = {"low": 0.8, "high": 1.2}
    cfg = parse_search_config({"space": {"gate": ["dense", NAME], "gates": {NAME: {"gain": gain}}}})
    assert cfg.space.gate_params[NAME] == {"gain": ToyScale.params[0].domain(gain, "")}
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        tc = cfg.space.suggest(trial)
        seen.add(tc.gate)
        if tc.gate == NAME:
            assert 0.8 <= tc.knobs["gain"] <= 1.2 and trial.params[f"{NAME}.gain"] == tc.knobs["gain"]
            assert TrialConfig.from_dict(tc.to_dict()) == tc and tc.to_dict()["gain"] == tc.knobs["gain"]
    assert seen == {"dense", NAME}
    # the default domain when the YAML names nothing; refusals name the gate and the knob
    assert parse_search_config({"space": {"gate": NAME}}).space.gate_params[NAME]["gain"].to_yaml()["low"] == 0.5
    for raw, message in [
        ({"gate": NAME, "gain": 3.0}, r"^space.gain: must be <= 2.0, got 3.0$"),
        ({"gate": NAME, "gates": {NAME: {"gian": 1.0}}}, rf"^space.gates.{NAME}.gian: gate '{NAME}' does not take"),
        ({"gate": NAME, "backbone": "r2plus1d_tiny"}, rf"cannot take gate '{NAME}': gate '{NAME}' needs per-frame"),
    ]:
        with pytest.raises(SpaceError, match=message):
            parse_search_config({"space": raw})
    with pytest.raises(SpaceError, match=rf"^gate '{NAME}' needs 'gain'$"):
        TrialConfig(gate=NAME)


@pytest.mark.slow
def test_search_export_and_run(tmp_path, monkeypatch, ray_session):
    """One real trial through Ray Tune, Optuna and MLflow, then ``gatesearch export`` and ``gatesearch run``."""
    from click.testing import CliRunner
    from ray import cloudpickle

    from gatesearch.cli import main
    from gatesearch.search.engine import RunOptions, run_search

    # pytest imported this file under a name Ray's workers cannot import: send its classes by value, as a
    # script's __main__ would be sent
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = parse_search_config({
        "name": "toy", "trials": 1, "max_concurrent": 1,
        "data": {"train_clips": 8, "val_clips": 4, "synthetic": {"height": 32, "width": 32}},
        "evaluation": {"frames": 4, "latency_warmup": 0, "latency_repeats": 1},
        "model": {"train": {"epochs": 1}},
        "space": {"gate": NAME, "gates": {NAME: {"gain": 0.9}}, "clip_length": 2},
    })
    try:
        summary = run_search(cfg, RunOptions(workdir=tmp_path / "runs"), echo=lambda line: None)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert summary["trials_completed"] == 1 and summary["trials_failed"] == 0, summary
    (row,) = summary["pareto"]
    assert row["gate"] == NAME and row["params"]["gain"] == 0.9

    runner = CliRunner()
    r = runner.invoke(main, ["export", row["trial_id"], "--out", "model", "--workdir", "runs"])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "model" / "gatesearch.json").read_text())
    assert meta["trial"]["gate"] == NAME and meta["trial"]["gain"] == 0.9
    r = runner.invoke(main, ["run", "model", "--frames", "4", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["frames"] == 4 and out["mean_density"] == 1.0
