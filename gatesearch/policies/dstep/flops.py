"""D-STEP's FLOPs (Eq. 2), written once for the loss, the inference statistics and the reports.

A block's FLOPs for one frame are those of its gated convs under the frame's
decisions plus the policy networks' own cost: conv1 computes the "compute"
channels on active tiles, conv2 reads the non-skipped channels (reused ones
cost nothing to produce) on active tiles, later convs run on active tiles.
F_S is the same sum for the static network. Training differentiates F
(``frame_flops`` on straight-through decisions); streaming records each
conv's share for ``MacCounter`` (``record_frame``), and the model-level
ratios of ``dstep`` read those records back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from ..base import FrameAverages

if TYPE_CHECKING:
    from .tiles import TileLevel


class FrameChoice(NamedTuple):
    """What the gate of one block chose for a frame: floats for one stream, or (N,) tensors for a batch."""

    areas: Sequence  # per conv: the fraction of its outputs on active tiles
    skip: float | torch.Tensor  # fractions of conv1's output channels skipped, reused, computed
    reuse: float | torch.Tensor
    compute: float | torch.Tensor


class FrameFlops(NamedTuple):
    """One training frame's record for the loss (Eq. 3), both (N,) and differentiable."""

    flops: torch.Tensor  # F of Eq. 2
    density: torch.Tensor  # the spatial density: active fraction of conv1's outputs


def conv_shares(choice: FrameChoice) -> list:
    """Eq. 2 per conv of the branch: the fraction of its dense MACs the frame spends."""
    return [area * (choice.compute if i == 0 else 1.0 - choice.skip if i == 1 else 1.0)
            for i, area in enumerate(choice.areas)]


def frame_flops(choice: FrameChoice, levels: Sequence[TileLevel], policy_macs: torch.Tensor) -> torch.Tensor:
    """F of Eq. 2: the policy networks' MACs plus each conv's share of its dense MACs."""
    return sum((share * level.dense_macs for share, level in zip(conv_shares(choice), levels)), policy_macs)


def record_frame(convs: Sequence[GatedConv], levels: Sequence[TileLevel], choice: FrameChoice,
                 policy_macs: float) -> None:
    """One stream's frame for MacCounter: each conv's share, the policy networks' cost charged to conv1."""
    for i, (share, level, conv) in enumerate(zip(conv_shares(choice), levels, convs)):
        conv.record(share, policy_macs if i == 0 else 0.0, level.dense_macs)
    convs[0].record_decisions(choice.areas[0], choice.skip, choice.reuse, choice.compute)


def dense_conv_macs(conv: nn.Conv2d, out_hw: tuple[int, int]) -> float:
    """A branch conv's MACs per frame in the static network (groups 1: the block protocol's)."""
    kh, kw = conv.kernel_size
    return float(conv.out_channels * conv.in_channels * kh * kw * out_hw[0] * out_hw[1])


def static_flops(convs: Sequence[GatedConv]) -> float:
    """F_S of a block: its gated convs' dense MACs per frame, at the size last streamed."""
    return sum(conv.dense_macs for conv in convs)


def spent_flops(convs: Sequence[GatedConv]) -> float:
    """F of a block per frame, averaged over the frames streamed since the last ``reset_stats``."""
    return sum(conv.dense_macs * conv.density + conv.gate_macs for conv in convs)


class GatedConv(FrameAverages, nn.Conv2d):
    """A block conv whose work D-STEP decides; reports it in MacCounter's protocol.

    ``density`` is the fraction of the dense conv's MACs spent (channels times
    tiles, Eq. 2) and ``gate_macs`` the policy networks' own cost (charged to
    ``conv1``), both averaged over streamed frames. It keeps the conv's
    parameters, so state-dict names stay the dense network's.
    """

    @classmethod
    def adopt(cls, conv: nn.Conv2d) -> GatedConv:
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                  dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                  padding_mode=conv.padding_mode, device="meta")
        new.weight = conv.weight
        new.bias = conv.bias
        new.train(conv.training)
        new.reset_stats()
        return new

    def reset_stats(self) -> None:
        super().reset_stats()
        self.dense_macs = 0.0  # MACs of the dense conv per frame, at the size last seen
        self.decision_sum = [0.0, 0.0, 0.0, 0.0]  # conv1 only: Σ over frames of (tiles, skip, reuse, compute)

    def record(self, share: float, gate_macs: float, dense_macs: float) -> None:
        """One frame of one stream: the fraction of the dense MACs spent, the gate's own MACs."""
        d = self.__dict__  # plain numbers: nn.Module.__setattr__'s checks cost more than the sums (every frame, conv)
        d["frames"] += 1
        d["density_sum"] += share
        d["gate_macs_sum"] += gate_macs
        d["dense_macs"] = dense_macs

    def record_decisions(self, tiles: float, skip: float, reuse: float, compute: float) -> None:
        for i, value in enumerate((tiles, skip, reuse, compute)):
            self.decision_sum[i] += value

    @property
    def decisions(self) -> dict[str, float]:
        """Mean active-tile fraction and channel-choice fractions over the frames streamed (conv1)."""
        mean = [v / max(1, self.frames) for v in self.decision_sum]
        return dict(zip(("tiles", "skip", "reuse", "compute"), mean))


__all__ = ["FrameChoice", "FrameFlops", "GatedConv", "conv_shares", "dense_conv_macs", "frame_flops", "record_frame",
           "spent_flops", "static_flops"]
