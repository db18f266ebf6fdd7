"""What ``gatesearch run`` does with a ``Stream`` (``export.stream``): the frames through it, optionally with its
dense twin stepped beside it on every frame, or many streams at once for throughput.

Beside the dense twin (``export.dense_twin``: the same weights without the gate), each frame runs through the
gated model, then through the twin; the summary adds the twin's latency, the speedup over the stream and the
gated output's distance from the dense one (``objectives.fidelity``) on what each emits after every frame.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Iterable

import torch

from .artifact import Artifact
from .stream import FrameStats, Stream, to_frame


def run_stream(stream: Stream, frames: Iterable[torch.Tensor], *, on_frame: Callable[[FrameStats], None] | None = None,
               after_step: Callable[[Stream], None] | None = None, dense: torch.nn.Module | None = None) -> dict:
    """Step ``frames`` through ``stream`` (``Stream.run``); with ``dense``, its twin beside it. Returns the summary
    ``run --json`` prints; ``on_frame`` gets each frame's statistics (with the twin's latency when it runs)."""
    if dense is None:
        return stream.run(frames, on_frame=on_frame, after_step=after_step)
    twin = Stream(dataclasses.replace(stream.artifact, model=dense.eval()), reset_every=stream.reset_every)
    outputs: tuple[list, list] = ([], [])  # what the gated model and the twin emit, per frame (per window)
    shown = 0

    def show() -> int:
        for s, d in zip(stream.stats[shown:], twin.stats[shown:]):
            if on_frame:
                on_frame(dataclasses.replace(s, dense_latency_ms=d.latency_ms))
        return len(stream.stats)

    with twin:
        for frame in frames:
            for s, out in zip((stream, twin), outputs):
                out.append(s.step(frame))
            if after_step:
                after_step(stream)
            shown = show()
        for s, out in zip((stream, twin), outputs):
            out.append(s.flush())
        show()
        gated_out, dense_out = (torch.stack([y for y in out if y is not None])[None] for out in outputs)
        summary = stream.summary()
        dense_ms = [d.latency_ms for d in twin.stats]
    from gatesearch.objectives.fidelity import fidelity

    summary.update({
        "dense_latency_ms_per_frame": statistics.median(dense_ms),
        # Medians, as printed beside it: a sum lets the first frames (planning, cold caches) decide the ratio.
        "speedup": statistics.median(dense_ms) / statistics.median(s.latency_ms for s in stream.stats),
        **fidelity(dense_out, gated_out, task=stream.task, frame_hw=stream.frame_shape[1:]).to_dict(),
    })
    return summary


def run_streams(artifact: Artifact, frames: Iterable[torch.Tensor], *, streams: int, reset_every: int | None,
                workers: str = "process", repeats: int = 3) -> dict:
    """Throughput of ``streams`` independent streams of the frames (offsets of one clip), gated and dense twin side
    by side (``objectives.streams``); returns the summary ``run --streams --json`` prints."""
    from gatesearch.objectives.streams import compare_throughput, offset_streams

    from .artifact import dense_twin

    frame_shape = tuple(artifact.meta["frame_shape"])
    frames = [to_frame(f, frame_shape) for f in frames]
    if len(frames) < 2:
        raise ValueError(f"the stream had {len(frames)} frames; many streams need at least 2")
    clip = torch.stack(frames)[None]  # (1, T, 3, H, W)
    row = compare_throughput(dense_twin(artifact), {"gated": artifact.model}, offset_streams(clip, streams),
                             reset_every=reset_every, workers=workers, repeats=repeats)["gated"]
    return {"streams": streams, "workers": workers, "frames_per_stream": clip.shape[1], "reset_every": reset_every,
            **row}


__all__ = ["FrameStats", "run_stream", "run_streams"]
