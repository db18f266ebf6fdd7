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

import contextlib
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
    dense_latency_ms: float | None = None  # the dense twin's latency on the same frame, when it runs beside


def run_stream(
    artifact: Artifact,
    frames: Iterable[torch.Tensor],
    *,
    reset_every: int | None,
    on_frame: Callable[[FrameStats], None] | None = None,
    dense: torch.nn.Module | None = None,
) -> dict:
    """Stream (3, H, W) frames through the model; returns the summary ``run --json`` prints.

    With ``dense`` (the artifact's dense twin, ``export.dense_twin``), each frame also runs through it right after
    the gated model, and the summary adds its latency, the speedup over the stream and the gated output's distance
    from the dense one (``objectives.fidelity``).
    """
    from gatesearch.backbones import ClipModel
    from gatesearch.objectives import MacCounter
    from gatesearch.stateful import reset_state, streaming

    model = artifact.model.eval()
    frame_shape = tuple(artifact.meta["frame_shape"])
    if isinstance(model, ClipModel):
        return _run_windows(model, frames, frame_shape, window=reset_every or artifact.trial.clip_length,
                            on_frame=on_frame, dense=dense)
    twins = [model] if dense is None else [model, dense.eval()]
    counter = MacCounter(model, frame_shape)
    stats: list[FrameStats] = []
    outputs: list[list[torch.Tensor]] = [[] for _ in twins]  # per model, per frame
    with torch.inference_mode(), contextlib.ExitStack() as stack:
        for m in twins:
            stack.enter_context(streaming(m))
        for i, frame in enumerate(frames):
            frame = _fit(frame, frame_shape)
            if reset_every and i and i % reset_every == 0:
                for m in twins:
                    reset_state(m)
            counter.reset()
            latency = []
            for m, out in zip(twins, outputs):
                start = time.perf_counter()
                y = m.frame(frame[None])
                latency.append(1000 * (time.perf_counter() - start))
                out.append(y.clone())  # a gated layer's state changes at the next frame
            report = counter.report()
            s = FrameStats(index=i, density=report.mean_density, macs=report.effective, latency_ms=latency[0],
                           dense_latency_ms=latency[1] if dense is not None else None)
            stats.append(s)
            if on_frame:
                on_frame(s)
    summary = _summary(stats, counter, reset_every)
    per_frame = [torch.stack(out, 1) for out in outputs]  # (1, T, ...)
    if model.task == "classification":
        with torch.inference_mode():
            summary["predicted_class"] = int(model.clip_head(per_frame[0]).argmax(1))
    if dense is not None:
        from gatesearch.objectives.fidelity import task_outputs

        with torch.inference_mode():
            gated_out, dense_out = (task_outputs(m, out) for m, out in zip(twins, per_frame))
        summary.update(_compared(stats, dense_out, gated_out, model.task, frame_shape[1:]))
    return summary


def run_streams(artifact: Artifact, frames: Iterable[torch.Tensor], *, streams: int, reset_every: int | None,
                workers: str = "process", repeats: int = 3) -> dict:
    """Throughput of ``streams`` independent streams of the frames (offsets of one clip), gated and dense twin side
    by side (``objectives.streams``); returns the summary ``run --streams --json`` prints."""
    from gatesearch.objectives.streams import compare_throughput, offset_streams

    from .artifact import dense_twin

    frame_shape = tuple(artifact.meta["frame_shape"])
    frames = [_fit(f, frame_shape) for f in frames]
    if len(frames) < 2:
        raise ValueError(f"the stream had {len(frames)} frames; many streams need at least 2")
    clip = torch.stack(frames)[None]  # (1, T, 3, H, W)
    row = compare_throughput(dense_twin(artifact), {"gated": artifact.model}, offset_streams(clip, streams),
                             reset_every=reset_every, workers=workers, repeats=repeats)["gated"]
    return {"streams": streams, "workers": workers, "frames_per_stream": clip.shape[1], "reset_every": reset_every,
            **row}


def _fit(frame: torch.Tensor, frame_shape: tuple[int, ...]) -> torch.Tensor:
    """A (3, H, W) frame resized to the model's frame shape."""
    if tuple(frame.shape) == frame_shape:
        return frame
    return torch.nn.functional.interpolate(frame[None], size=frame_shape[1:], mode="bilinear",
                                           antialias=True, align_corners=False)[0]


def _run_windows(model, frames: Iterable[torch.Tensor], frame_shape: tuple[int, ...], *, window: int,
                 on_frame: Callable[[FrameStats], None] | None, dense: torch.nn.Module | None) -> dict:
    """Clip-window mode: windows of ``window`` frames, run as they fill; logits averaged over frames. Beside a
    dense twin, each window's logits are one output of the comparison."""
    from gatesearch.objectives import MacCounter

    model.window = window  # MAC counts are per frame of a window of this length
    twins = [model] if dense is None else [model, dense.eval()]
    counter = MacCounter(model, frame_shape)
    stats: list[FrameStats] = []
    logits: list[list[torch.Tensor]] = [[] for _ in twins]  # per model, per window
    sizes: list[int] = []  # frames per window
    buffer: list[torch.Tensor] = []

    def flush() -> None:
        clip = torch.stack(buffer)[None]  # (1, w, 3, H, W)
        counter.reset()
        per_frame_ms = []
        for m, out in zip(twins, logits):
            start = time.perf_counter()
            out.append(m(clip)[0])  # (K,)
            per_frame_ms.append(1000 * (time.perf_counter() - start) / len(buffer))
        report = counter.report()
        sizes.append(len(buffer))
        for _ in buffer:
            s = FrameStats(index=len(stats), density=report.mean_density, macs=report.effective,
                           latency_ms=per_frame_ms[0], dense_latency_ms=per_frame_ms[1] if dense else None)
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
    summary = _summary(stats, counter, window)
    summary["predicted_class"] = int((sum(n * out for n, out in zip(sizes, logits[0])) / len(stats)).argmax())
    if dense is not None:
        gated_out, dense_out = (torch.stack(out)[None] for out in logits)  # (1, windows, K)
        summary.update(_compared(stats, dense_out, gated_out, model.task, frame_shape[1:]))
    return summary


def _compared(stats: list[FrameStats], dense_out: torch.Tensor, gated_out: torch.Tensor, task: str,
              frame_hw) -> dict:
    """The dense twin's side of the summary: its latency, the speedup over the stream, the output's distance."""
    from gatesearch.objectives.fidelity import fidelity

    dense_ms = [s.dense_latency_ms for s in stats]
    return {
        "dense_latency_ms_per_frame": statistics.median(dense_ms),
        "speedup": sum(dense_ms) / sum(s.latency_ms for s in stats),
        **fidelity(dense_out, gated_out, task=task, frame_hw=tuple(frame_hw)).to_dict(),
    }


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
