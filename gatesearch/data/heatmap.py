"""Per-frame object-centre heatmaps, shared by the synthetic data and annotated videos."""

from __future__ import annotations

import numpy as np


def render_heatmap(centres: np.ndarray, size: tuple[int, int], stride: int, sigma: float) -> np.ndarray:
    """(T, 2) centres (x, y) in frame pixels -> (T, 1, h, w) Gaussians, each frame's maximum 1.

    Heatmap cell k covers frame pixels [k*s, (k+1)*s) and sits at k*s + (s-1)/2.
    """
    hh, hw = size
    cx = (centres[:, 0] - (stride - 1) / 2) / stride  # heatmap coordinates
    cy = (centres[:, 1] - (stride - 1) / 2) / stride
    gx = np.exp(-((np.arange(hw)[None, :] - cx[:, None]) ** 2) / (2 * sigma**2))
    gy = np.exp(-((np.arange(hh)[None, :] - cy[:, None]) ** 2) / (2 * sigma**2))
    heat = gy[:, :, None] * gx[:, None, :]  # (T, h, w), separable
    heat /= np.maximum(heat.max(axis=(1, 2), keepdims=True), 1e-12)
    return heat[:, None].astype(np.float32)
