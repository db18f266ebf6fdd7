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

import contextvars
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from gatesearch.affine import bn_affine

DEFAULT_WINDOW = 8  # frames per window until the model has streamed a window of its own

# Video frames per sample of the clip being run. Gated layers count their cost per frame with it. A
# context variable rather than ``temporal_shift.clip_length``: walking every module at every window
# costs as much as a small conv.
_WINDOW_FRAMES: contextvars.ContextVar[int | None] = contextvars.ContextVar("window_frames", default=None)


def window_frames() -> int | None:
    """Frames per sample of the clip a ``ClipModel`` is running now (None outside one)."""
    return _WINDOW_FRAMES.get()


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation,
           groups: int = 1) -> torch.Tensor:
    """``F.conv3d``, with the two factorised shapes of (2+1)D convs routed to faster CPU kernels.

    PyTorch runs a small batch-1 3D conv through an im2col path whose cost
    hardly falls with fewer filters or time steps. Here features stay
    frames-major in memory, (N, T, C, H, W) viewed as (N, C, T, H, W): a 1×k×k
    conv is a 2D conv over the frames (a temporal stride just skips frames),
    and a k×1×1 conv is, per tap, a GEMM over the frames. Both do the same
    multiply-adds, and their time follows the work, which is what VA-RED²'s
    savings need. Dense and gated layers call this same function.
    """
    kt, kh, kw = weight.shape[2:]
    if groups == 1 and tuple(dilation) == (1, 1, 1):
        if kt == 1 and padding[0] == 0:
            return _frames_conv(x[:, :, :: stride[0]], weight, bias, stride[1:], padding[1:])
        if kh == kw == 1 and tuple(stride[1:]) == (1, 1) and tuple(padding[1:]) == (0, 0):
            if torch.is_grad_enabled() or torch.jit.is_tracing():  # autograd / MAC counting: no out= ops
                return _time_gemm(x, weight, bias, stride[0], padding[0])
            return _time_taps(x, weight, bias, stride[0], padding[0])
    return F.conv3d(x, weight, bias, stride, padding, dilation, groups)


def _frames_conv(x, weight, bias, stride, padding):  # (N, C, T, H, W), 1×k×k -> (N, Co, T, Ho, Wo) frames-major
    n, c, t, h, w = x.shape
    y = F.conv2d(x.transpose(1, 2).reshape(n * t, c, h, w), weight[:, :, 0], bias, stride, padding)
    return y.view(n, t, *y.shape[1:]).transpose(1, 2)


def _time_gemm(x, weight, bias, stride, pad):  # k×1×1, differentiable: one GEMM over k shifted copies
    n, c, t, h, w = x.shape
    k = weight.shape[2]
    steps = (t + 2 * pad - k) // stride + 1
    if pad:
        x = F.pad(x, (0, 0, 0, 0, pad, pad))
    span = (steps - 1) * stride + 1
    cols = torch.stack([x[:, :, i : i + span : stride] for i in range(k)], 2)  # (N, C, k, To, H, W)
    w2 = weight.reshape(weight.shape[0], c * k)  # (Co, C·k); bmm: matmul takes a slow path for few rows
    y = torch.bmm(w2.expand(n, *w2.shape), cols.view(n, c * k, -1))  # (N, Co, To·H·W)
    if bias is not None:
        y = y + bias.view(1, -1, 1)
    return y.view(n, -1, steps, h, w)


def _time_taps(x, weight, bias, stride, pad):  # k×1×1 for inference: per tap, a batched GEMM over frames
    n, c, t, h, w = x.shape
    co, k = weight.shape[0], weight.shape[2]
    steps = (t + 2 * pad - k) // stride + 1
    frames = x.transpose(1, 2).reshape(n, t, c, h * w)  # a view when frames-major
    out = x.new_empty(n, steps, co, h * w)  # frames-major
    for j in sorted(range(k), key=lambda j: abs(j - pad)):  # the centre tap first: it covers every step
        lo = max(0, -((j - pad) // stride))  # output steps whose input step i·s + j − pad is inside the clip
        hi = min(steps, (t - 1 - j + pad) // stride + 1)
        if lo >= hi:
            continue
        start = lo * stride + j - pad
        w_j = weight[:, :, j, 0, 0].expand(hi - lo, co, c)
        for b in range(n):
            src = frames[b, start : start + (hi - lo - 1) * stride + 1 : stride]  # (hi − lo, C, H·W)
            if j == pad:
                torch.bmm(w_j, src, out=out[b, lo:hi])
            else:
                out[b, lo:hi].baddbmm_(w_j, src)
    if bias is not None:
        out += bias.view(1, 1, -1, 1)
    return out.view(n, steps, co, h, w).transpose(1, 2)


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` computed by ``conv3d`` (same parameters, names and numbers; faster kernels)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super().forward(x)
        return conv3d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class BatchNorm3d(nn.BatchNorm3d):
    """``nn.BatchNorm3d`` whose inference is one per-channel affine map that keeps the input's memory layout.

    PyTorch's CPU batch norm makes frames-major features channel-major again,
    at four times the cost of the map itself.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or torch.is_grad_enabled() or torch.jit.is_tracing() or self.running_var is None:
            return super().forward(x)
        scale, shift = bn_affine(self)
        # multiply, then add in place: addcmul with a broadcast first operand is 3× slower on CPU
        return torch.mul(x, scale.view(1, -1, 1, 1, 1)).add_(shift.view(1, -1, 1, 1, 1))


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
        token = _WINDOW_FRAMES.set(clip.shape[1])
        try:
            feats = self.backbone.forward_clip(clip.transpose(1, 2))  # (B, 3, T, H, W) -> (B, C, t, h, w)
        finally:
            _WINDOW_FRAMES.reset(token)
        return self.fc(feats.mean((2, 3, 4)))  # global average pool

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
        return sum(w * logit for w, logit in zip(weights, logits)) / t

    def mac_probe(self, frame_shape: tuple[int, int, int]) -> tuple[nn.Module, torch.Tensor, int]:
        """What MAC counting traces: one window of ``self.window`` frames (see ``objectives.macs._probe``)."""
        return self, torch.zeros(1, self.window, *frame_shape), self.window


def is_clip_model(model: nn.Module) -> bool:
    return isinstance(model, ClipModel)


__all__ = ["BatchNorm3d", "ClipBackbone", "ClipModel", "Conv3d", "DEFAULT_WINDOW", "conv3d", "is_clip_model",
           "window_frames"]
