"""Measured wall-clock latency of a model's real inference path.

The model streams clips frame by frame (batch 1), exactly as a deployed
gated network would, so skipped work is skipped for real. A gated model's
time depends on the content (how much of each frame changes), so latency is
taken over several held-out clips: untimed warm-up passes (allocations,
kernel selection), then repeated passes over every clip in turn, and the
median per-frame time over all of them; the spread is reported because
timings on shared machines are noisy.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LatencyStats:
    median_ms: float  # per frame, over every timed pass of every clip
    min_ms: float  # fastest and slowest timed pass (per frame)
    max_ms: float
    repeats: int  # timed passes per clip
    clips: int = 1

    @property
    def spread_ms(self) -> float:
        return self.max_ms - self.min_ms


def measure_latency(
    model: nn.Module, clips: torch.Tensor, *, reset_every: int | None, warmup: int = 1, repeats: int = 5
) -> LatencyStats:
    """Per-frame latency of ``model.stream`` over each clip of ``clips`` (N, T, 3, H, W), one at a time."""
    model.eval()
    frames = clips.shape[1]
    per_frame = []
    with torch.inference_mode():
        for _ in range(warmup):
            model.stream(clips[:1], reset_every=reset_every)
        for _ in range(repeats):  # clips in turn within a round, so a slow phase of the machine hits all alike
            for i in range(len(clips)):
                start = time.perf_counter()
                model.stream(clips[i : i + 1], reset_every=reset_every)
                per_frame.append(1000.0 * (time.perf_counter() - start) / frames)
    return LatencyStats(median_ms=statistics.median(per_frame), min_ms=min(per_frame), max_ms=max(per_frame),
                        repeats=repeats, clips=len(clips))
