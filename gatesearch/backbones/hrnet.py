"""A small HRNet for dense per-frame prediction.

HRNet (Sun, Xiao, Liu and Wang, "Deep High-Resolution Representation Learning
for Human Pose Estimation", CVPR 2019) keeps a stride-4 branch for the whole
depth of the network and adds lower-resolution branches beside it, exchanging
information between all of them again and again ("repeated multi-scale
fusion"). Keypoint heatmaps need that: position stays precise while the
low-resolution branches bring context. The Skip-Convolutions pose experiments
gate HRNet-W32; ``hrnet_small`` is the same design, narrower and shallower,
for CPU searches.

Layout: a stem of two stride-2 3×3 convs (stride 4), a stage of bottleneck
blocks at stride 4, then stages of ``HRModule``s, each adding one branch at
half the resolution and twice the channels. The last module fuses into the
stride-4 branch only (HRNetV1, as for pose), which is ``fine``. ``deep`` is a
short stride-2 conv path on top of it (stride 16) for the clip head, so
classification works too; the heatmap task never runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import Backbone
from .registry import BACKBONES
from .resnet import BasicBlock, Bottleneck, channels


def conv_bn(cin: int, cout: int, *, kernel_size: int = 3, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class HRModule(nn.Module):
    """Parallel branches of basic blocks, then every output branch sums all inputs.

    Fusion, for output branch i from input branch j: j = i identity; j > i (lower
    resolution) 1×1 conv + BN, then nearest upsampling by 2^(j-i); j < i (higher
    resolution) j-i stride-2 3×3 convs + BN (ReLU between them, not after the
    last). The sum goes through a ReLU. ``outputs`` < number of branches fuses
    into the first ``outputs`` branches only.
    """

    def __init__(self, widths: tuple[int, ...], *, blocks: int, outputs: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(*(BasicBlock(c, c) for _ in range(blocks))) for c in widths
        )
        self.fuse = nn.ModuleList()
        for i in range(outputs):
            row = nn.ModuleList()
            for j, c in enumerate(widths):
                if j == i:
                    row.append(nn.Identity())
                elif j > i:
                    row.append(conv_bn(c, widths[i], kernel_size=1, relu=False))
                else:
                    steps = [conv_bn(c, c, stride=2) for _ in range(i - j - 1)]
                    steps.append(conv_bn(c, widths[i], stride=2, relu=False))
                    row.append(nn.Sequential(*steps))
            self.fuse.append(row)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:  # branch j: (N, C_j, H/2^j, W/2^j)
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        out = []
        for i, row in enumerate(self.fuse):
            size = xs[i].shape[-2:]
            total = xs[i]
            for j, (path, x) in enumerate(zip(row, xs)):
                if j == i:
                    continue
                y = path(x)
                if j > i:
                    y = F.interpolate(y, size=size, mode="nearest")
                total = total + y  # out of place: a gated conv's output is its state
            out.append(self.relu(total))
        return out


@dataclass(frozen=True, kw_only=True)
class HRNetConfig:
    width: int = 32  # channels of the stride-4 branch; branch j has width·2^j
    stem: int = 64  # stem channels
    stem_blocks: int = 4  # bottleneck blocks of the first (single-branch) stage
    stage_modules: tuple[int, ...] = (1, 4, 3)  # HRModules per multi-branch stage (2, 3, 4 ... branches)
    blocks: int = 4  # basic blocks per branch in an HRModule


class HRNet(Backbone):
    """HRNetV1: the stride-4 branch's output is ``fine``; ``deep`` downsamples it for the clip head."""

    def __init__(self, cfg: HRNetConfig, *, width: float = 1.0) -> None:
        super().__init__()
        w = channels(cfg.width, width)
        stem = channels(cfg.stem, width)
        self.stem = nn.Sequential(conv_bn(3, stem, stride=2), conv_bn(stem, stem, stride=2))  # H/4
        self.layer1 = nn.Sequential(
            *(Bottleneck(stem if i == 0 else 4 * stem, stem) for i in range(cfg.stem_blocks))
        )  # (N, 4·stem, H/4, W/4)
        widths = [w]
        self.transitions = nn.ModuleList()
        self.stages = nn.ModuleList()
        prev = [4 * stem]
        for s, modules in enumerate(cfg.stage_modules):
            widths = [w * 2**j for j in range(s + 2)]
            self.transitions.append(_transition(prev, widths))
            last_stage = s == len(cfg.stage_modules) - 1
            self.stages.append(nn.Sequential(*(
                HRModule(tuple(widths), blocks=cfg.blocks,
                         outputs=1 if last_stage and m == modules - 1 else len(widths))
                for m in range(modules)
            )))
            prev = widths
        self.head = nn.Sequential(conv_bn(w, 2 * w, stride=2), conv_bn(2 * w, 4 * w, stride=2))  # H/16
        self.fine_channels, self.deep_channels = w, 4 * w
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def fine(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, w, H/4, W/4)
        xs = [self.layer1(self.stem(x))]
        for transition, stage in zip(self.transitions, self.stages):
            # new branches come from the lowest-resolution one; existing ones may change width
            xs = [t(xs[min(j, len(xs) - 1)]) for j, t in enumerate(transition)]
            for module in stage:
                xs = module(xs)
        return xs[0]

    def deep(self, fine: torch.Tensor) -> torch.Tensor:  # (N, w, H/4, W/4) -> (N, 4w, H/16, W/16)
        return self.head(fine)


def _transition(prev: list[int], widths: list[int]) -> nn.ModuleList:
    """Adapt branch widths (3×3 conv, or nothing) and open the new branch (stride-2 3×3 conv)."""
    out = nn.ModuleList()
    for j, c in enumerate(widths):
        if j < len(prev):
            out.append(nn.Identity() if prev[j] == c else conv_bn(prev[j], c))
        else:
            out.append(conv_bn(prev[-1], c, stride=2))
    return out


@BACKBONES.register("hrnet_small")
def hrnet_small(*, width: float = 1.0) -> HRNet:
    """Small HRNet (Sun et al. 2019): w=16, 3 branches, 1 module per stage, for CPU pose searches."""
    return HRNet(HRNetConfig(width=16, stem=32, stem_blocks=1, stage_modules=(1, 1), blocks=1), width=width)


@BACKBONES.register("hrnet_w32")
def hrnet_w32(*, width: float = 1.0) -> HRNet:
    """HRNet-W32 (Sun et al. 2019), the pose network of the Skip-Convolutions experiments."""
    return HRNet(HRNetConfig(), width=width)
