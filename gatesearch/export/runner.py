"""Run an exported gated model over a video stream, frame by frame.

This is the deployed inference path: one frame at a time, batch 1, gated
layers skipping for real; the reference frame is recomputed densely every
``reset_every`` frames (Skip-Convolutions, Table 4: T_test).

A clip-level model (3D convs, ``ClipModel``) cannot run one frame alone: frames
are buffered into non-overlapping windows of ``reset_every`` frames (default:
the trial's clip length), each window runs when it is full, and every frame of
it reports the window's density, MACs and latency per frame.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

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
    from gatesearch.backbones import ClipModel
    from gatesearch.objectives import MacCounter
    from gatesearch.stateful import reset_state, streaming

    model = artifact.model.eval()
    frame_shape = tuple(artifact.meta["frame_shape"])
    if isinstance(model, ClipModel):
        return _run_windows(model, frames, frame_shape, window=reset_every or artifact.trial.clip_length,
                            on_frame=on_frame)
    counter = MacCounter(model, frame_shape)
    stats: list[FrameStats] = []
    per_frame_out = []
    with torch.inference_mode(), streaming(model):
        for i, frame in enumerate(frames):
            frame = _fit(frame, frame_shape)
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
    summary = _summary(stats, counter, reset_every)
    if model.task == "classification":
        with torch.inference_mode():
            logits = model.clip_head(torch.stack(per_frame_out, 1))
        summary["predicted_class"] = int(logits.argmax(1))
    return summary


def _fit(frame: torch.Tensor, frame_shape: tuple[int, ...]) -> torch.Tensor:
    """A (3, H, W) frame resized to the model's frame shape."""
    if tuple(frame.shape) == frame_shape:
        return frame
    return torch.nn.functional.interpolate(frame[None], size=frame_shape[1:], mode="bilinear",
                                           antialias=True, align_corners=False)[0]


def _run_windows(model, frames: Iterable[torch.Tensor], frame_shape: tuple[int, ...], *, window: int,
                 on_frame: Callable[[FrameStats], None] | None) -> dict:
    """Clip-window mode: windows of ``window`` frames, run as they fill; logits averaged over frames."""
    from gatesearch.objectives import MacCounter

    model.window = window  # MAC counts are per frame of a window of this length
    counter = MacCounter(model, frame_shape)
    stats: list[FrameStats] = []
    logits: list[torch.Tensor] = []
    buffer: list[torch.Tensor] = []

    def flush() -> None:
        clip = torch.stack(buffer)[None]  # (1, w, 3, H, W)
        counter.reset()
        start = time.perf_counter()
        out = model(clip)  # (1, K)
        per_frame_ms = 1000 * (time.perf_counter() - start) / len(buffer)
        report = counter.report()
        logits.append(out[0] * len(buffer))
        for _ in buffer:
            s = FrameStats(index=len(stats), density=report.mean_density, macs=report.effective,
                           latency_ms=per_frame_ms)
            stats.append(s)
            if on_frame:
                on_frame(s)
        buffer.clear()

    with torch.inference_mode():
        for frame in frames:
            buffer.append(_fit(frame, frame_shape))
            if len(buffer) == window:
                flush()
        if buffer:  # a last, shorter window
            flush()
    return {**_summary(stats, counter, window), "predicted_class": int((sum(logits) / len(stats)).argmax())}


def _summary(stats: list, counter, reset_every) -> dict:
    """What a stream's frames add up to (the ``--json`` summary of ``gatesearch run``)."""
    if not stats:
        raise ValueError("the stream had no frames")
    return {
        "frames": len(stats),
        "mean_density": statistics.fmean(s.density for s in stats),
        "macs_per_frame": statistics.fmean(s.macs for s in stats),
        "dense_macs_per_frame": counter.total,
        "latency_ms_per_frame": statistics.median(s.latency_ms for s in stats),
        "latency_ms_mean": statistics.fmean(s.latency_ms for s in stats),
        "reset_every": reset_every,
    }
