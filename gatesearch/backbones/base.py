"""What every backbone gives, and the video model built around it.

A backbone is a per-frame 2D network in two parts: ``fine(x)`` maps a frame to a
stride-4 feature map (for the per-frame heatmap head) and ``deep(fine)`` goes on
to the last stage (for the clip head), so a heatmap task never pays for the
deep stages. Gates replace the backbone's convolutions in place
(``policies``), so backbone code never needs to know about gating.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from gatesearch.stateful import reset_state, streaming

from .temporal_shift import clip_length

TASKS = ("classification", "heatmap")


class Backbone(nn.Module):
    """Base class: a per-frame feature extractor.

    Subclasses set ``fine_channels`` and ``deep_channels`` and implement
    ``fine`` and ``deep``. ``tasks`` lists the heads the backbone supports.
    """

    tasks: ClassVar[tuple[str, ...]] = TASKS
    fine_channels: int
    deep_channels: int

    def fine(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, C', H/4, W/4)
        raise NotImplementedError

    def deep(self, fine: torch.Tensor) -> torch.Tensor:  # (N, C', H/4, W/4) -> (N, C, h, w)
        raise NotImplementedError


class Add(nn.Module):
    """``a + b`` as a layer, for residual joins: gated streams swap it for one that adds only where its inputs
    changed (``policies.stream_ops``)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


def contiguous(x: torch.Tensor) -> torch.Tensor:
    """x NCHW-contiguous, except a gated stream's live tensor (``ops.changes``), which keeps its layout: copying it
    would lose which positions changed."""
    from gatesearch.ops.changes import is_stream

    return x if is_stream(x) else x.contiguous()


def frame_pool(deep: torch.Tensor, grid: int) -> torch.Tensor:
    """(N, C, h, w) -> (N, C * grid² + C): average-pooled to a grid × grid, then max-pooled over the whole map.

    One function, which torch.fx keeps as one node (``fx.wrap`` below), so a native frame plan runs it as its last
    step (``policies.frame_step``)."""
    return torch.cat([F.adaptive_avg_pool2d(deep, grid).flatten(1), deep.amax((2, 3))], 1)


torch.fx.wrap("frame_pool")


class ClipHead(nn.Module):
    """Clip classifier over per-frame features.

    Each frame's deep features are average-pooled to a 2×2 grid (position
    survives) and max-pooled globally (sharp shape evidence survives); the mean
    over time and the mean temporal difference (which carries the motion
    direction) feed one linear layer.
    """

    grid = 2

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(2 * channels * (self.grid * self.grid + 1), num_classes)

    def pool(self, deep: torch.Tensor) -> torch.Tensor:  # (N, C, h, w) -> (N, 5C)
        return frame_pool(deep, self.grid)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, K)
        mean = pooled.mean(1)
        motion = (pooled[:, 1:] - pooled[:, :-1]).mean(1) if pooled.shape[1] > 1 else torch.zeros_like(mean)
        return self.fc(torch.cat([mean, motion], dim=1))


class VideoModel(nn.Module):
    """A backbone plus the heads of a task, run on clips.

    Both return the task's output: clip logits (B, K) for classification,
    per-frame heatmap logits (B, T, 1, H/4, W/4) for heatmaps.
    ``forward`` runs all frames of a clip as one batch (fast training, no state);
    ``stream`` runs frame by frame so that stateful gated layers reuse the
    previous frame, resetting the reference frame every ``reset_every`` frames.
    """

    def __init__(self, backbone: Backbone, *, task: str, num_classes: int) -> None:
        super().__init__()
        if task not in backbone.tasks:
            raise ValueError(
                f"backbone {type(backbone).__name__} does not support task {task!r}; "
                f"it supports {', '.join(backbone.tasks)}"
            )
        self.task = task
        self.backbone = backbone
        # only the task's head exists, so every parameter is trained
        if task == "classification":
            self.clip_head = ClipHead(backbone.deep_channels, num_classes)
        else:
            self.heat_head = nn.Conv2d(backbone.fine_channels, 1, kernel_size=1)

    #: set by a gate that can run a whole streamed frame at once (``policies.frame_step``): ``frame`` hands it
    #: each frame as ``frame_runner(model, x)``, and runs the layers itself when it answers None
    frame_runner = None

    def frame(self, x: torch.Tensor) -> torch.Tensor:
        """One frame per stream (N, 3, H, W) -> the task's per-frame output.

        classification: pooled clip features (N, D); heatmap: logits (N, 1, H/4, W/4).
        Only the head of the task runs, so latency counts what the task needs.
        """
        runner = self.frame_runner
        if runner is not None:
            out = runner(self, x)
            if out is not None:
                return out
        return self.frame_layers(x)

    def frame_layers(self, x: torch.Tensor) -> torch.Tensor:
        """``frame`` layer by layer, as written here (what a frame runner traces)."""
        fine = self.backbone.fine(x)
        if self.task == "classification":
            return self.clip_head.pool(self.backbone.deep(fine))
        return self.heat_head(fine)

    def forward(self, clip: torch.Tensor) -> torch.Tensor:  # clip: (B, T, 3, H, W)
        b, t = clip.shape[:2]
        with clip_length(self, t):  # clip-aware layers (temporal shift) find each frame's predecessor
            return self._finish(self.frame(clip.flatten(0, 1)).unflatten(0, (b, t)))

    def stream(self, clip: torch.Tensor, *, reset_every: int | None = None) -> torch.Tensor:
        """Frame-by-frame inference; state is reset at frame 0 and every ``reset_every`` frames."""
        return self._finish(self.stream_frames(clip, reset_every=reset_every))

    def stream_frames(self, clip: torch.Tensor, *, reset_every: int | None = None) -> torch.Tensor:
        """``stream``'s per-frame outputs (B, T, ...) before the clip head (see ``frame``)."""
        per_frame = []
        with streaming(self):
            for t in range(clip.shape[1]):
                if reset_every and t and t % reset_every == 0:
                    reset_state(self)
                # a gated layer's output is its state, updated in place at the next frame: copy it
                per_frame.append(self.frame(clip[:, t]).clone())
        return torch.stack(per_frame, 1)

    def _finish(self, per_frame: torch.Tensor) -> torch.Tensor:
        """classification: logits (B, K); heatmap: logits (B, T, 1, H/4, W/4)."""
        return self.clip_head(per_frame) if self.task == "classification" else per_frame
