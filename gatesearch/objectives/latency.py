"""Measured wall-clock latency of a model's real inference path.

The model streams a clip frame by frame (batch 1), exactly as a deployed
gated network would, so skipped work is skipped for real. One untimed warm-up
pass (allocations, kernel selection), then the median of repeated passes; the
spread is reported because timings on shared machines are noisy.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LatencyStats:
    median_ms: float  # per frame
    min_ms: float
    max_ms: float
    repeats: int

    @property
    def spread_ms(self) -> float:
        return self.max_ms - self.min_ms


def measure_latency(
    model: nn.Module, clip: torch.Tensor, *, reset_every: int | None, warmup: int = 1, repeats: int = 5
) -> LatencyStats:
    """Per-frame latency of ``model.stream`` over ``clip`` (1, T, 3, H, W)."""
    model.eval()
    frames = clip.shape[1]
    per_frame = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            model.stream(clip, reset_every=reset_every)
            elapsed = time.perf_counter() - start
            if i >= warmup:
                per_frame.append(1000.0 * elapsed / frames)
    return LatencyStats(
        median_ms=statistics.median(per_frame), min_ms=min(per_frame), max_ms=max(per_frame), repeats=repeats
    )
