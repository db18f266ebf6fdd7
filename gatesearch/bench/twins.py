"""The models a bench compares: one dense network and gated versions of it with the same weights."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from .config import BenchConfig, BenchError

NUM_CLASSES = 12  # classes of a registry-built model's head (the synthetic data's default)


@dataclass(frozen=True, kw_only=True)
class Twins:
    dense: nn.Module
    gated: dict[str, nn.Module]  # label (the threshold, in a sweep) -> gated model with the dense model's weights
    frame_hw: tuple[int, int]
    backbone: str
    gate: str
    task: str


def build_twins(cfg: BenchConfig) -> Twins:
    """The dense model and its gated versions: from the registry with fresh weights, or from an artifact."""
    if cfg.artifact is not None:
        return _from_artifact(cfg)
    from gatesearch.search.trial import build_model
    from gatesearch.spaces import TrialConfig

    dense = build_model(TrialConfig(backbone=cfg.backbone, width=cfg.width, task=cfg.task), NUM_CLASSES)
    return Twins(dense=dense, gated=_gated(dense, cfg.gate, _with_examples(cfg.gate, cfg.knobs), cfg.sweep),
                 frame_hw=(cfg.size, cfg.size), backbone=cfg.backbone, gate=cfg.gate, task=cfg.task)


def _from_artifact(cfg: BenchConfig) -> Twins:
    from gatesearch.export import dense_twin, load_artifact

    art = load_artifact(cfg.artifact)
    dense = dense_twin(art)
    trial = art.trial
    gated = _gated(dense, trial.gate, {**trial.gate_knobs(), **cfg.knobs}, cfg.sweep) if cfg.sweep or cfg.knobs \
        else {"gated": art.model}
    return Twins(dense=dense, gated=gated, frame_hw=tuple(art.meta["frame_shape"][1:]), backbone=trial.backbone,
                 gate=trial.gate, task=trial.task)


def _gated(dense: nn.Module, gate: str, knobs: dict, sweep: tuple[float, ...]) -> dict[str, nn.Module]:
    """One gated copy of ``dense`` per swept threshold (or one with ``knobs`` as they are)."""
    from gatesearch.policies import build_policy

    if sweep and "threshold" not in _takes(gate):
        raise BenchError(f"sweep: gate {gate!r} has no threshold to sweep")
    variants = {f"{v:g}": {**knobs, "threshold": v} for v in sweep} if sweep else {"gated": knobs}
    try:
        return {label: build_policy(gate, **k).apply(copy.deepcopy(dense)) for label, k in variants.items()}
    except ValueError as e:  # a knob the gate does not take, or a value it cannot take
        raise BenchError(str(e)) from None


def _takes(gate: str) -> list[str]:
    from gatesearch.policies import POLICIES

    policy = POLICIES.get(gate)
    return [*policy.params, *policy.options]


def _with_examples(gate: str, knobs: dict) -> dict:
    """``knobs`` checked by name, the unset ones at the low end of the gate's default range."""
    from gatesearch.policies import POLICIES

    takes = _takes(gate)
    for key in knobs:
        if key not in takes:
            raise BenchError(f"gate {gate!r} does not take {key!r} (it takes {', '.join(takes) or 'nothing'})")
    out = dict(knobs)
    for key, default in POLICIES.get(gate).params.items():
        out.setdefault(key, default["low"] if isinstance(default, dict)
                       else default[0] if isinstance(default, list) else default)
    return out
