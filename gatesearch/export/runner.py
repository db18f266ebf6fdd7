"""Run an exported gated model over a video stream, frame by frame.

This is the deployed inference path: one frame at a time, batch 1, gated
layers skipping for real; the reference frame is recomputed densely every
``reset_every`` frames (Skip-Convolutions, Table 4: T_test).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .artifact import Artifact


@dataclass(frozen=True)
class FrameStats:
    index: int
    density: float  # MAC-weighted fraction of gated work computed on this frame
    macs: float  # effective MACs of this frame
    latency_ms: float


def run_stream(
    artifact: Artifact,
    frames: Iterable[torch.Tensor],
    *,
    reset_every: int | None,
    on_frame: Callable[[FrameStats], None] | None = None,
) -> dict:
    """Stream (3, H, W) frames through the model; returns the summary ``run --json`` prints."""
    from gatesearch.objectives import MacCounter
    from gatesearch.stateful import reset_state, streaming

    model = artifact.model.eval()
    frame_shape = tuple(artifact.meta["frame_shape"])
    counter = MacCounter(model, frame_shape)
    stats: list[FrameStats] = []
    per_frame_out = []
    with torch.inference_mode(), streaming(model):
        for i, frame in enumerate(frames):
            if tuple(frame.shape) != frame_shape:
                frame = torch.nn.functional.interpolate(frame[None], size=frame_shape[1:], mode="bilinear",
                                                        antialias=True, align_corners=False)[0]
            if reset_every and i and i % reset_every == 0:
                reset_state(model)
            counter.reset()
            start = time.perf_counter()
            out = model.frame(frame[None])
            elapsed = time.perf_counter() - start
            report = counter.report()
            s = FrameStats(index=i, density=report.mean_density, macs=report.effective, latency_ms=1000 * elapsed)
            stats.append(s)
            per_frame_out.append(out.clone())  # the layer's state changes at the next frame
            if on_frame:
                on_frame(s)
    if not stats:
        raise ValueError("the stream had no frames")
    summary = {
        "frames": len(stats),
        "mean_density": statistics.fmean(s.density for s in stats),
        "macs_per_frame": statistics.fmean(s.macs for s in stats),
        "dense_macs_per_frame": counter.total,
        "latency_ms_per_frame": statistics.median(s.latency_ms for s in stats),
        "latency_ms_mean": statistics.fmean(s.latency_ms for s in stats),
        "reset_every": reset_every,
    }
    if model.task == "classification":
        with torch.inference_mode():
            logits = model.clip_head(torch.stack(per_frame_out, 1))
        summary["predicted_class"] = int(logits.argmax(1))
    return summary
