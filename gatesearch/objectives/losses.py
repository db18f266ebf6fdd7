"""Task losses used for training candidates (efficiency terms belong to their policy)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def task_loss(task: str, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if task == "classification":
        return F.cross_entropy(output, batch["label"])
    target = batch["heatmap"]  # (B, T, 1, h, w) Gaussian bumps with peak 1
    if target.shape[-2:] != output.shape[-2:]:
        target = F.interpolate(target.flatten(0, 1), size=output.shape[-2:], mode="bilinear").unflatten(
            0, target.shape[:2]
        )
    # positives are rare: weight them up so the peak is learned, not the background
    return F.binary_cross_entropy_with_logits(output, target, pos_weight=torch.tensor(20.0))
