"""Task quality: top-1 accuracy for clips, PCK for per-frame object centres, and a trial's drop against dense."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class QualityDrop:
    """Dense quality minus the trial's, paired on the same held-out clips, with a bootstrap interval."""

    drop: float  # mean over clips of (dense − trial); > 0: the trial is worse
    low: float  # 95 % interval of the drop (percentile bootstrap over clips)
    high: float
    clips: int  # number of held-out clips both were scored on

    def as_metrics(self) -> dict[str, float]:
        return {"quality_drop": self.drop, "quality_drop_ci_low": self.low, "quality_drop_ci_high": self.high,
                "quality_clips": self.clips}


def quality_drop(dense: torch.Tensor, trial: torch.Tensor, *, seed: int, resamples: int = 2000,
                 level: float = 0.95) -> QualityDrop:
    """Paired drop of per-clip quality (clip top-1 as 0/1, or a clip's mean PCK) and its bootstrap interval.

    Pairing removes the variance the two models share: the difficulty of each clip. The interval resamples
    clips with replacement (``resamples`` times, seeded, so a search reports the same interval every time) and
    takes the percentiles of the mean difference. dense, trial: (N,) per-clip quality on the same clips.
    """
    if dense.shape != trial.shape or dense.ndim != 1 or not len(dense):
        raise ValueError(f"per-clip qualities must be two (N,) vectors of the same clips, got "
                         f"{tuple(dense.shape)} and {tuple(trial.shape)}")
    diff = dense.double() - trial.double()  # (N,)
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(diff), (resamples, len(diff)), generator=gen)  # (resamples, N)
    means = diff[picks].mean(1)
    tail = (1.0 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1.0 - tail], dtype=means.dtype)).tolist()
    return QualityDrop(drop=float(diff.mean()), low=low, high=high, clips=len(diff))
