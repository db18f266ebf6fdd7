"""The policy (gate family) contract and its registry.

A policy turns a dense ``VideoModel`` into a gated one *in place*
(``apply``), may add a training loss term (``loss``), and declares the
joint-space parameters it takes with their default search domains
(``params``), so the space only samples what the chosen gate uses.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from gatesearch.registry import Registry

POLICIES: Registry[type[Policy]] = Registry(
    "gate",
    "Contract: each entry is a Policy subclass; its docstring's first line is shown by `gatesearch list`.",
)


class Policy:
    """Base class of a gate family."""

    #: joint-space parameters this gate takes -> default search domain (YAML form)
    params: ClassVar[dict[str, Any]] = {}
    #: optional knobs (not searched) -> default value
    options: ClassVar[dict[str, Any]] = {}
    #: True when the gate has trainable parameters, so training must stream frames through it
    trains_gates: ClassVar[bool] = False

    def __init__(self, **knobs: Any) -> None:
        unknown = set(knobs) - set(self.params) - set(self.options)
        if unknown:
            raise ValueError(f"gate {self.name!r} does not take {sorted(unknown)[0]!r}")
        missing = set(self.params) - set(knobs)
        if missing:
            raise ValueError(f"gate {self.name!r} needs {sorted(missing)[0]!r}")
        self.knobs = {**self.options, **knobs}

    @property
    def name(self) -> str:
        return getattr(type(self), "registered_name", type(self).__name__)

    def apply(self, model: nn.Module) -> nn.Module:
        """Convert ``model`` in place and return it."""
        return model

    def loss(self, model: nn.Module, *, output: torch.Tensor | None = None,
             batch: dict | None = None) -> torch.Tensor | None:
        """Extra training loss term after a forward pass (None: nothing to add); ``output`` and ``batch`` are that
        pass's model output and training batch, for terms that depend on the prediction (VA-RED²'s μ0)."""
        return None

    def on_epoch(self, model: nn.Module, epoch: int, epochs: int) -> None:
        """Called at the start of each training epoch (schedules such as warm-ups)."""

    def streams(self, epoch: int, epochs: int) -> bool:
        """Whether this epoch trains frame by frame through the gates (else: frames as one batch)."""
        return self.trains_gates


class FrameAverages:
    """MacCounter's layer protocol (``density``, ``gate_macs``) as averages over the frames a gated layer
    has streamed; the layer adds to ``frames``, ``density_sum`` and ``gate_macs_sum``."""

    def reset_stats(self) -> None:
        self.frames = 0  # frames seen while streaming (summed over streams)
        self.density_sum = 0.0  # Σ over frames of the fraction of the dense MACs spent
        self.gate_macs_sum = 0.0  # Σ over frames of the gate's own MACs

    @property
    def density(self) -> float:
        return self.density_sum / self.frames if self.frames else 1.0

    @property
    def gate_macs(self) -> float:
        return self.gate_macs_sum / self.frames if self.frames else 0.0


def register_policy(name: str):
    """``@register_policy("input_norm")``: register a Policy subclass under ``name``."""

    def deco(cls: type[Policy]) -> type[Policy]:
        cls.registered_name = name
        return POLICIES.register(name)(cls)

    return deco


def describe(name: str) -> str:
    doc = POLICIES.get(name).__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""
