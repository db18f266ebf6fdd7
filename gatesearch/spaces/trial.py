"""One point of the joint space: everything needed to build, train and run a candidate."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, kw_only=True)
class TrialConfig:
    backbone: str = "tiny"  # backbone registry name
    width: float = 1.0  # channel-width multiplier of the backbone
    task: str = "classification"  # "classification" (top-1) or "heatmap" (PCK)
    gate: str = "dense"  # policy registry name
    threshold: float | None = None  # ε of the norm gates (Skip-Conv Eq. 5, 7)
    beta: float | None = None  # Gumbel β (Skip-Conv Eq. 9)
    target_flops_ratio: float | None = None  # D: D-STEP's target F/F_S (Eq. 3)
    block_size: int | None = None  # b: masks are constant on b×b blocks
    reference: str | None = None  # norm gates: "frame" (Eq. 3) or "block" (ops.block_ref); None: the gate's default
    per_value: bool | None = None  # norm gates: ε per input value; None: the gate's default (off)
    search_space_size: int | None = None  # S: VA-RED² alternatives per dimension (Eq. 3.5)
    lambda_e: float | None = None  # λ_e: VA-RED²'s efficiency-loss weight (Section 3.4)
    clip_length: int = 4  # T: frames per training clip; reference-frame reset period at inference
    lr: float = 3e-3  # AdamW learning rate
    epochs: int = 3  # passes over the training clips
    batch_size: int = 8  # clips per optimisation step
    seed: int = 0  # weight init and data order

    def gate_knobs(self) -> dict[str, Any]:
        """The knobs the chosen gate takes: its declared parameters, and the options this trial sets."""
        from gatesearch.policies import POLICIES

        policy = POLICIES.get(self.gate)
        knobs = {name: getattr(self, name) for name in policy.params}
        knobs.update({name: getattr(self, name) for name in policy.options if getattr(self, name, None) is not None})
        return knobs

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown trial parameter {unknown[0]!r}")
        return cls(**d)
