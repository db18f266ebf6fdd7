"""The cheap linear ops that rebuild what a VA-RED² alternative does not compute (Eq. 3.1, 3.3)."""

from __future__ import annotations

import torch
from torch import nn


class ChannelRebuild(nn.Module):
    """Φ^c (Eq. 3.3): the C_out − k channels not computed, each an affine map of computed channel (m − k) mod k.

    They start at 0 (weight and bias): a copy of another channel is no estimate of a channel of a trained network,
    and as the alternative opens it should add only what it computes until the maps have learned something."""

    def __init__(self, keep: int, channels: int) -> None:
        super().__init__()
        self.keep, self.channels = keep, channels
        self.weight = nn.Parameter(torch.zeros(channels - keep))
        self.bias = nn.Parameter(torch.zeros(channels - keep))
        self.register_buffer("source", torch.arange(channels - keep) % keep, persistent=False)

    def forward(self, head: torch.Tensor) -> torch.Tensor:  # (N, k, ...) -> (N, C_out, ...)
        shape = (1, -1) + (1,) * (head.dim() - 2)
        rest = head.index_select(1, self.source) * self.weight.view(shape) + self.bias.view(shape)
        return torch.cat([head, rest], 1)


class TemporalRebuild(nn.Module):
    """Φ^t (Eq. 3.1): step iR + j (0 < j < R) is an affine map (one per j, per channel) of computed step i."""

    def __init__(self, stride: int, channels: int) -> None:
        super().__init__()
        self.stride = stride
        self.weight = nn.Parameter(torch.ones(stride - 1, channels))
        self.bias = nn.Parameter(torch.zeros(stride - 1, channels))

    def forward(self, z: torch.Tensor, steps: int) -> torch.Tensor:
        """(N, C, T', H, W) -> (N, C, steps, H, W): [z[i], w_1·z[i] + b_1, ...] interleaved, cropped."""
        parts = [z] + [z * w.view(1, -1, 1, 1, 1) + b.view(1, -1, 1, 1, 1)
                       for w, b in zip(self.weight, self.bias)]
        return torch.stack(parts, 3).flatten(2, 3)[:, :, :steps]  # (N, C, T'·R, H, W) -> steps


__all__ = ["ChannelRebuild", "TemporalRebuild"]
