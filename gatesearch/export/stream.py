"""``gatesearch.load(DIR)``: an exported model as a stream a program feeds one frame at a time.

This is the deployed inference path: batch 1, gated layers skipping for real, the reference frame recomputed
densely every ``reset_every`` frames (Skip-Convolutions, Table 4: T_test). Each step also says what the frame
cost: the MAC-weighted density of the gated work, the effective MACs and the wall-clock.

A clip-level model (3D convs, ``ClipModel``) cannot run one frame alone: frames are buffered into
non-overlapping windows of ``reset_every`` frames (default: the trial's clip length); a window runs when it is
full, and each of its frames reports the window's density, MACs and latency per frame.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .artifact import Artifact, load_artifact


@dataclass(frozen=True)
class FrameStats:
    index: int  # frame number since the stream (or its last ``reset()``) began
    density: float  # MAC-weighted fraction of gated work computed on this frame
    macs: float  # effective MACs of this frame
    latency_ms: float
    reference: bool = False  # a reference frame: computed densely (per-frame models)
    dense_latency_ms: float | None = None  # the dense twin's latency on the same frame, when it runs beside
    layer_density: dict[str, float] = field(default_factory=dict)  # each gated layer's density on this frame


def load(folder: str | Path, *, reset_every: int | None = None) -> Stream:
    """Open an exported model folder (``gatesearch export``) as a ``Stream``.

    ``reset_every``: recompute the reference frame densely every this many frames (default: the trial's clip
    length, the period it was trained and measured with; 0: only the first frame).
    """
    return Stream(load_artifact(Path(folder)), reset_every=reset_every)


class Stream:
    """``step(frame)`` -> what the model emits after that frame; ``last`` (also ``density``, ``macs``) -> what the
    frame cost.

    Frames are (3, H, W) float tensors in [0, 1], (H, W, 3) uint8 arrays (what ``av.VideoFrame.to_ndarray``
    gives) or PyAV frames, resized to the model's frame size. Outputs (as ``objectives.fidelity`` compares
    them): for classification the clip logits (K,) of the frames seen so far, for heatmaps the frame's heatmap
    logits (1, h, w); a clip-level model returns its window's logits (K,) when a window completes and None for
    the frames it buffers.
    """

    def __init__(self, artifact: Artifact, *, reset_every: int | None = None) -> None:
        from gatesearch.backbones import ClipModel
        from gatesearch.objectives import MacCounter
        from gatesearch.stateful import stateful_layers

        self.artifact = artifact
        self.model = artifact.model.eval()
        self.task = self.model.task
        self.frame_shape = tuple(artifact.meta["frame_shape"])  # (3, H, W)
        self.reset_every = artifact.trial.clip_length if reset_every is None else int(reset_every)
        self.windowed = isinstance(self.model, ClipModel)
        self.window = self.reset_every or artifact.trial.clip_length  # clip models: frames per window
        if self.windowed:
            self.model.window = self.window  # MACs are counted per frame of a window of this length
        self._counter = MacCounter(self.model, self.frame_shape)
        self._layers = stateful_layers(self.model)
        self._closed = False
        for m in self._layers:
            m.streaming = not self.windowed  # a clip model runs whole windows, statelessly
        self.reset()

    # -- the stream ---------------------------------------------------------------------------------------------
    def step(self, frame: Any) -> torch.Tensor | None:
        if self._closed:
            raise RuntimeError("step() on a closed stream")
        x = self.last_frame = to_frame(frame, self.frame_shape)
        if self.windowed:
            self._buffer.append(x)
            return self._run_window() if len(self._buffer) == self.window else None
        from gatesearch.stateful import reset_state

        i = len(self.stats)
        reference = i == 0 or bool(self.reset_every and i % self.reset_every == 0)
        if reference and i:
            reset_state(self.model)
        self._counter.reset()
        with torch.inference_mode():
            start = time.perf_counter()
            y = self.model.frame(x[None])
            elapsed = time.perf_counter() - start
            y = y.clone()  # a gated layer's output is its state, changed in place at the next frame
        report = self._counter.report()
        self.stats.append(FrameStats(index=i, density=report.mean_density, macs=report.effective,
                                     latency_ms=1000 * elapsed, reference=reference,
                                     layer_density=_layer_density(report)))
        if self.task != "classification":
            return y[0]
        self._pooled.append(y)
        with torch.inference_mode():
            return self.model.clip_head(torch.stack(self._pooled, 1))[0]

    def run(self, frames: Iterable[Any], *, on_frame: Callable[[FrameStats], None] | None = None,
            after_step: Callable[[Stream], None] | None = None) -> dict[str, Any]:
        """Step through ``frames`` (then flush); ``on_frame`` gets each frame's statistics as they are known,
        ``after_step`` the stream after each step. Returns ``summary()``."""
        shown = 0
        for frame in frames:
            self.step(frame)
            if after_step:
                after_step(self)
            shown = self._show(on_frame, shown)
        self.flush()
        self._show(on_frame, shown)
        return self.summary()

    def _show(self, on_frame, shown: int) -> int:
        if on_frame:
            for s in self.stats[shown:]:
                on_frame(s)
        return len(self.stats)

    def flush(self) -> torch.Tensor | None:
        """Run a clip model's last, shorter window (None when nothing is buffered or the model is per-frame)."""
        return self._run_window() if self.windowed and self._buffer else None

    def reset(self) -> None:
        """A new video starts: state, frame count and statistics cleared; the next frame is a reference frame."""
        from gatesearch.stateful import reset_state

        reset_state(self.model)
        self.stats: list[FrameStats] = []
        self.last_frame: torch.Tensor | None = None  # the last frame stepped, as the model saw it (3, H, W)
        self._pooled: list[torch.Tensor] = []  # classification: per-frame pooled features (1, D)
        self._buffer: list[torch.Tensor] = []  # clip models: the frames of the window being filled
        self._windows: list[tuple[int, torch.Tensor]] = []  # clip models: (frames, logits (K,)) per window

    def close(self) -> None:
        """Leave streaming mode (layers back to plain batched layers, state dropped)."""
        if self._closed:
            return
        for m in self._layers:
            m.streaming = False
            m.reset_state()
        self._closed = True

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- what the frames cost -----------------------------------------------------------------------------------
    @property
    def last(self) -> FrameStats | None:
        return self.stats[-1] if self.stats else None

    @property
    def density(self) -> float | None:
        return self.last.density if self.stats else None

    @property
    def macs(self) -> float | None:
        return self.last.macs if self.stats else None

    def gated_layers(self) -> list[str]:
        """The layers whose work a gate decides (their density is in each frame's ``layer_density``)."""
        return list(self._counter.layers)

    def masks_available(self) -> list[str]:
        """The gated layers that can say where they computed (Skip-Conv layers), in model order."""
        return [name for name, m in self._counter.layers.items() if hasattr(m, "computed_positions")]

    def masks(self) -> dict[str, torch.Tensor]:
        """Where each of those layers computed on the last frame: bool (Ho, Wo), True where computed (all True on
        a reference frame). Its mean is the layer's density on that frame."""
        out = {}
        for name in self.masks_available():
            mask = self._counter.layers[name].computed_positions()
            if mask is not None:
                out[name] = mask[0]
        return out

    def summary(self) -> dict[str, Any]:
        """What the frames so far add up to (the ``--json`` summary of ``gatesearch run``)."""
        if not self.stats:
            raise ValueError("the stream had no frames")
        stats = self.stats
        out = {
            "frames": len(stats),
            "mean_density": statistics.fmean(s.density for s in stats),
            "macs_per_frame": statistics.fmean(s.macs for s in stats),
            "dense_macs_per_frame": self._counter.total,
            "latency_ms_per_frame": statistics.median(s.latency_ms for s in stats),
            "latency_ms_mean": statistics.fmean(s.latency_ms for s in stats),
            "reset_every": self.window if self.windowed else self.reset_every or None,
        }
        if self.windowed:
            logits = sum(n * y for n, y in self._windows) / sum(n for n, _ in self._windows)
            out["predicted_class"] = int(logits.argmax())
        elif self.task == "classification":
            with torch.inference_mode():
                out["predicted_class"] = int(self.model.clip_head(torch.stack(self._pooled, 1)).argmax(1))
        return out

    def _run_window(self) -> torch.Tensor:
        clip = torch.stack(self._buffer)[None]  # (1, w, 3, H, W)
        self._counter.reset()
        with torch.inference_mode():
            start = time.perf_counter()
            y = self.model(clip)[0]  # (K,)
            per_frame_ms = 1000 * (time.perf_counter() - start) / len(self._buffer)
        report = self._counter.report()
        for _ in self._buffer:
            self.stats.append(FrameStats(index=len(self.stats), density=report.mean_density, macs=report.effective,
                                         latency_ms=per_frame_ms, layer_density=_layer_density(report)))
        self._windows.append((len(self._buffer), y))
        self._buffer = []
        return y


def _layer_density(report) -> dict[str, float]:
    return {name: lm.density for name, lm in report.layers.items()}


def to_frame(frame: Any, frame_shape: tuple[int, ...]) -> torch.Tensor:
    """A frame as the model takes it: (3, H, W) float32 in [0, 1] at the model's frame size."""
    if hasattr(frame, "to_ndarray"):  # a PyAV VideoFrame
        frame = frame.to_ndarray(format="rgb24")
    if not isinstance(frame, torch.Tensor):
        frame = torch.as_tensor(frame)
    if frame.dim() != 3:
        raise ValueError(f"a frame is (3, H, W) or (H, W, 3), got shape {tuple(frame.shape)}")
    if frame.shape[0] != 3 and frame.shape[-1] == 3:
        frame = frame.permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    if frame.dtype == torch.uint8:
        frame = frame.float().div_(255.0)
    frame = frame.float()
    if tuple(frame.shape) == frame_shape:
        return frame
    return torch.nn.functional.interpolate(frame[None], size=frame_shape[1:], mode="bilinear",
                                           antialias=True, align_corners=False)[0]


__all__ = ["FrameStats", "Stream", "load", "to_frame"]
