"""What ``gatesearch bench`` measures, as one frozen configuration checked on construction."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gatesearch.objectives.streams import WORKERS


class BenchError(ValueError):
    """A bench that cannot run as asked; the message is one line naming the setting."""


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    # the models: a registered backbone and gate (random weights), or an exported artifact (its gate and weights)
    backbone: str = "tiny"  # backbone registry name
    gate: str = "input_norm"  # gate registry name
    knobs: dict[str, Any] = field(default_factory=dict, hash=False)  # the gate's knobs; unset ones: an example value
    width: float = 1.0  # backbone width multiplier
    task: str = "classification"  # "classification" (clip logits) or "heatmap" (per-frame heatmaps)
    artifact: Path | None = None  # an exported model instead of backbone/gate/knobs/width
    # the footage
    video: Path | None = None  # a clip to stream (None: a synthetic clip)
    frames: int = 32  # frames of the clip
    size: int = 112  # frame height and width (an artifact's own frame size wins)
    reset_every: int | None = None  # dense reference frame every N frames (None: the first only)
    # the measurement
    threads: int | None = None  # torch threads (None: every core this process may use)
    repeats: int = 10  # timed rounds
    sweep: tuple[float, ...] = ()  # thresholds to compare in one run, one gated model each (empty: knobs' own)
    plot: Path | None = None  # with a sweep: write the speed-error curve to this PNG
    streams: int | None = None  # N independent streams: frames/s of dense and gated instead of per-frame latency
    workers: str = "process"  # what runs each stream: a process (own torch threads) or a thread

    def __post_init__(self) -> None:
        for name, low in (("frames", 2), ("size", 16), ("repeats", 1), ("streams", 1), ("threads", 1)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise BenchError(f"{name} must be at least {low}, got {value}")
        if self.reset_every is not None and self.reset_every < 1:
            raise BenchError(f"reset_every must be at least 1, got {self.reset_every}")
        if self.workers not in WORKERS:
            raise BenchError(f"workers must be one of {', '.join(WORKERS)}, got {self.workers!r}")
        if self.sweep and "threshold" in self.knobs:
            raise BenchError("give either a threshold (or a target) or a sweep of them, not both")
        if self.plot is not None and not self.sweep:
            raise BenchError("a plot draws a sweep: give a sweep of thresholds too")
        if self.video is not None and not Path(self.video).is_file():
            raise BenchError(f"{self.video}: no such video file")


def parse_knobs(items: Iterable[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings -> knobs: ``true``/``false`` are booleans, numbers are numbers, the rest strings."""
    knobs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BenchError(f"{item!r} is not KEY=VALUE")
        knobs[key] = _value(value)
    return knobs


def gate_knobs(*, threshold: float | None = None, block_size: int | None = None, params: Iterable[str] = (),
               target_density: float | None = None, target_error: float | None = None) -> dict[str, Any]:
    """The gate's knobs from the bench's options: ``KEY=VALUE`` params beside the named ones. A calibration target
    becomes the norm gates' ``calibrate`` option, its value the threshold (``policies.calibration``)."""
    knobs = {k: v for k, v in (("threshold", threshold), ("block_size", block_size)) if v is not None}
    knobs.update(parse_knobs(params))
    targets = {kind: v for kind, v in (("density", target_density), ("error", target_error)) if v is not None}
    if len(targets) > 1:
        raise BenchError("give one target: a density or an error, not both")
    if targets and "threshold" in knobs:
        raise BenchError("give either a threshold or a calibration target, not both")
    for kind, value in targets.items():
        knobs.update(calibrate=kind, threshold=value)
    return knobs


def parse_values(text: str, what: str) -> tuple[float, ...]:
    """``"0.01,0.02,0.05"`` -> (0.01, 0.02, 0.05); anything else is a one-line BenchError naming ``what``."""
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise BenchError(f"{what}: {part.strip()!r} is not a number (expected comma-separated numbers)")
        values.append(value)
    if len(set(values)) != len(values):
        raise BenchError(f"{what}: repeated values in {text!r}")
    return tuple(values)


def _value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
