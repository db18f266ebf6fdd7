"""Task quality: top-1 accuracy for clips, PCK for per-frame object centres."""

from __future__ import annotations

import torch

PCK_ALPHA = 0.2  # α of PCK@α (Skip-Convolutions Section 4.2)
OBJECT_SCALE = 0.25  # reference size: the synthetic objects' diameter as a fraction of the frame side


def top1_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, K), (B,) -> bool (B,)."""
    return logits.argmax(1) == labels


def pck_radius(frame_hw: tuple[int, int]) -> float:
    """The PCK hit radius in frame pixels: α × the reference size."""
    return PCK_ALPHA * OBJECT_SCALE * min(frame_hw)


def heatmap_peaks(heat_logits: torch.Tensor, *, stride: int) -> torch.Tensor:
    """(B, T, 1, h, w) heatmap logits -> (B, T, 2) frame-pixel (x, y) of each frame's peak.

    Heatmap cell k covers frame pixels [k*s, (k+1)*s) and sits at k*s + (s-1)/2.
    """
    b, t, _, h, w = heat_logits.shape
    flat = heat_logits.reshape(b, t, h * w).argmax(-1)
    ys, xs = flat // w, flat % w
    return torch.stack([xs, ys], -1).float() * stride + (stride - 1) / 2


def pck_correct(heat_logits: torch.Tensor, centers: torch.Tensor, *, stride: int, radius_px: float) -> torch.Tensor:
    """Per-frame hits of the heatmap's peak within ``radius_px`` of the true centre.

    PCK as in Skip-Convolutions Section 4.2: a keypoint is correct when it lies
    within α × reference size of the ground truth. heat_logits (B, T, 1, h, w),
    centers (B, T, 2) in frame pixels -> bool (B, T).
    """
    return (heatmap_peaks(heat_logits, stride=stride) - centers).norm(dim=-1) <= radius_px
