"""One point of the joint space: everything needed to build, train and run a candidate."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, kw_only=True)
class TrialConfig:
    """The gate's knobs are one mapping checked by the gate's own policy (``Policy.check_knobs``), so a new gate
    or knob changes nothing here. ``to_dict`` is flat (the knobs beside the other fields): that is the Ray Tune
    config, the MLflow params and the ``trial`` of an exported ``gatesearch.json``."""

    backbone: str = "tiny"  # backbone registry name
    width: float = 1.0  # channel-width multiplier of the backbone
    task: str = "classification"  # "classification" (top-1) or "heatmap" (PCK)
    gate: str = "dense"  # policy registry name
    knobs: dict[str, Any] = field(default_factory=dict, hash=False)  # the gate's params, and the options set
    clip_length: int = 4  # T: frames per training clip; reference-frame reset period at inference
    lr: float = 3e-3  # AdamW learning rate
    epochs: int = 3  # passes over the training clips
    batch_size: int = 8  # clips per optimisation step
    seed: int = 0  # weight init and data order

    def __post_init__(self) -> None:
        from gatesearch.policies import POLICIES

        object.__setattr__(self, "knobs", POLICIES.get(self.gate).check_knobs(self.knobs))

    @classmethod
    def shared_fields(cls) -> tuple[str, ...]:
        """The fields every trial has, whatever its gate (no knob may take one of these names)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "knobs")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "knobs":
                out.update(self.knobs)
            else:
                out[f.name] = getattr(self, f.name)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialConfig:
        """The inverse of ``to_dict``. Files written before knobs were one mapping list every gate's knobs, null
        where the trial's gate does not take them: a null knob is not set."""
        shared = set(cls.shared_fields())
        knobs = {k: v for k, v in d.items() if k not in shared and v is not None}
        return cls(**{k: v for k, v in d.items() if k in shared}, knobs=knobs)
