"""Clip-level backbones (3D and (2+1)D convs) and the model that runs them on clips.

A per-frame backbone (``base.Backbone``) sees one frame at a time; a clip
backbone convolves over time as well, so it needs a window of frames at once.
``ClipModel`` gives such a backbone the public surface trials expect of
``VideoModel``: ``forward(clip)`` for training, ``stream(clip, reset_every)``
for the deployed path, ``task`` and ``mac_probe`` for MAC counting. Deployed,
a clip model classifies non-overlapping windows of ``reset_every`` frames as
they fill up and averages their logits (the K-clip testing of VA-RED², Section
4.3, restricted to the past).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .temporal_shift import clip_length

DEFAULT_WINDOW = 8  # frames per window until the model has streamed a window of its own


class ClipBackbone(nn.Module):
    """Base class: a network over whole clips.

    Subclasses set ``deep_channels`` and implement ``forward_clip``. Only clip
    classification is supported: there is no per-frame stride-4 output for a
    heatmap head.
    """

    tasks: ClassVar[tuple[str, ...]] = ("classification",)
    deep_channels: int

    def forward_clip(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, T, H, W) -> (B, C, t, h, w)
        raise NotImplementedError


class ClipModel(nn.Module):
    """A clip backbone plus a classifier: global average pool over (t, h, w), one linear layer.

    ``window`` is the number of frames per window last streamed (``stream``
    sets it); MAC counts are taken over one window of that length, because a
    3D network's cost per frame depends on it (temporal strides round up).
    """

    def __init__(self, backbone: ClipBackbone, *, task: str, num_classes: int) -> None:
        super().__init__()
        if task not in backbone.tasks:
            raise ValueError(f"backbone {type(backbone).__name__} does not support task {task!r}; "
                             f"it supports {', '.join(backbone.tasks)}")
        self.task = task
        self.backbone = backbone
        self.fc = nn.Linear(backbone.deep_channels, num_classes)
        self.window = DEFAULT_WINDOW

    def forward(self, clip: torch.Tensor) -> torch.Tensor:  # (B, T, 3, H, W) -> (B, K)
        x = clip.transpose(1, 2)  # (B, 3, T, H, W)
        with clip_length(self, clip.shape[1]):  # gated layers count their cost per video frame
            feats = self.backbone.forward_clip(x)  # (B, C, t, h, w)
        return self.fc(F.adaptive_avg_pool3d(feats, 1).flatten(1))

    def stream(self, clip: torch.Tensor, *, reset_every: int | None = None) -> torch.Tensor:
        """Logits averaged over non-overlapping windows of ``reset_every`` frames (the whole clip when None).

        Windows run one after the other, as they would arrive from a camera;
        a last, shorter window is run as it is.
        """
        t = clip.shape[1]
        step = reset_every or t
        self.window = step
        logits = [self(clip[:, s : s + step]) for s in range(0, t, step)]
        weights = [min(step, t - s) for s in range(0, t, step)]  # frames each window covers
        return sum(w * l for w, l in zip(weights, logits)) / t

    def mac_probe(self, frame_shape: tuple[int, int, int]) -> tuple[nn.Module, torch.Tensor, int]:
        """What MAC counting traces: one window of ``self.window`` frames (see ``objectives.macs._probe``)."""
        return self, torch.zeros(1, self.window, *frame_shape), self.window


def is_clip_model(model: nn.Module) -> bool:
    return isinstance(model, ClipModel)


__all__ = ["ClipBackbone", "ClipModel", "DEFAULT_WINDOW", "is_clip_model"]
