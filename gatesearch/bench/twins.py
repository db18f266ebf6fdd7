"""The models a bench compares: one dense network and gated versions of it with the same weights."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .config import BenchConfig, BenchError

NUM_CLASSES = 12  # classes of a registry-built model's head (the synthetic data's default)


@dataclass(frozen=True, kw_only=True)
class Twins:
    dense: nn.Module
    gated: dict[str, nn.Module]  # label (the threshold, in a sweep) -> gated model with the dense model's weights
    knobs: dict[str, dict]  # label -> the gate's knobs, for the models still to calibrate on the footage
    frame_hw: tuple[int, int]
    backbone: str
    gate: str
    task: str


def build_twins(cfg: BenchConfig) -> Twins:
    """The dense model and its gated versions: from the registry with fresh weights, or from an artifact."""
    from gatesearch.policies import POLICIES

    if cfg.artifact is not None:
        return _from_artifact(cfg)
    from gatesearch.models import build_model
    from gatesearch.spaces import TrialConfig

    dense = build_model(TrialConfig(backbone=cfg.backbone, width=cfg.width, task=cfg.task), NUM_CLASSES)
    knobs = _variants(cfg.gate, {**POLICIES.get(cfg.gate).example_knobs(), **cfg.knobs}, cfg.sweep)
    return Twins(dense=dense, gated=_gated(dense, cfg.gate, knobs), knobs=knobs, frame_hw=(cfg.size, cfg.size),
                 backbone=cfg.backbone, gate=cfg.gate, task=cfg.task)


def _from_artifact(cfg: BenchConfig) -> Twins:
    """An exported model as it is (calibrated already, if its gate is), or rebuilt with other knobs or a sweep."""
    from gatesearch.export import dense_twin, load_artifact

    art = load_artifact(cfg.artifact)
    dense, trial = dense_twin(art), art.trial
    knobs = _variants(trial.gate, {**trial.knobs, **cfg.knobs}, cfg.sweep) if cfg.sweep or cfg.knobs else {}
    return Twins(dense=dense, gated=_gated(dense, trial.gate, knobs) if knobs else {"gated": art.model}, knobs=knobs,
                 frame_hw=tuple(art.meta["frame_shape"][1:]), backbone=trial.backbone, gate=trial.gate, task=trial.task)


def _variants(gate: str, knobs: dict, sweep: tuple[float, ...]) -> dict[str, dict]:
    """label -> knobs: one per swept threshold, or ``knobs`` as they are."""
    from gatesearch.policies import POLICIES

    if sweep and "threshold" not in POLICIES.get(gate).takes():
        raise BenchError(f"sweep: gate {gate!r} has no threshold to sweep")
    return {f"{v:g}": {**knobs, "threshold": v} for v in sweep} if sweep else {"gated": knobs}


def _gated(dense: nn.Module, gate: str, variants: dict[str, dict]) -> dict[str, nn.Module]:
    """A gated copy of ``dense`` per variant."""
    from gatesearch.policies import build_policy

    try:
        return {label: build_policy(gate, **k).apply(copy.deepcopy(dense)) for label, k in variants.items()}
    except ValueError as e:  # a knob the gate does not take, or a value it cannot take
        raise BenchError(str(e)) from None


def calibrate(twins: Twins, clip: torch.Tensor, *, reset_every: int | None) -> dict[str, dict]:
    """Let each gate set what it takes from data on the footage (``Policy.calibrate``: per-layer thresholds);
    label -> what was set, for the gates that set something."""
    from gatesearch.policies import build_policy

    found = {label: build_policy(twins.gate, **knobs).calibrate(twins.gated[label], clip, reset_every=reset_every)
             for label, knobs in twins.knobs.items()}
    return {label: record for label, record in found.items() if record is not None}
