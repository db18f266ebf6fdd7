"""Video ResNets over whole clips: the 3D ResNet family and the builder R(2+1)D shares.

Tran, Wang, Torresani, Ray, LeCun and Paluri, "A Closer Look at
Spatiotemporal Convolutions for Action Recognition" (CVPR 2018): a ResNet whose
convolutions span time. ``VideoResNet`` takes the block's convolution as a
callable (a full 3×3×3 conv here, a (2+1)D factorisation in ``r2plus1d``), so
both families are one layout. Module names follow torchvision's ``VideoResNet``
(``stem``, ``layer1``..``layer4``, ``conv1.0``, ``downsample.0/1``) so that a
torchvision-style state dict loads with ``load_weights``.

Stages 2-4 halve time, height and width; the stem halves height and width only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .clip3d import BatchNorm3d, ClipBackbone, Conv3d
from .registry import BACKBONES

#: conv_builder(cin, cout, mid, stride) -> module; ``mid`` only matters to factorised convs
ConvBuilder = Callable[[int, int, int, int], nn.Module]


def channels(base: int, width: float) -> int:
    """``base`` scaled by the width multiplier, at least 4 channels."""
    return max(4, round(base * width))


def conv3x3x3(cin: int, cout: int, mid: int, stride: int = 1) -> Conv3d:
    """A full spatiotemporal 3×3×3 conv (the 3D ResNet block conv); ``mid`` is unused."""
    return Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False)


def mid_channels(cin: int, cout: int) -> int:
    """Hidden width of a (2+1)D conv: the 3×3×3 conv's parameter count, spread over 1×3×3 + 3×1×1
    (Tran et al., Sec. 3.5)."""
    return (cin * cout * 27) // (cin * 9 + 3 * cout)


class BasicBlock3d(nn.Module):
    """Two block convs with BN, and an identity (1×1×1 conv + BN when the shape changes)."""

    def __init__(self, cin: int, planes: int, *, conv: ConvBuilder, stride: int = 1) -> None:
        super().__init__()
        mid = mid_channels(cin, planes)  # torchvision uses the first conv's value for both convs
        self.conv1 = nn.Sequential(conv(cin, planes, mid, stride), BatchNorm3d(planes), nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(conv(planes, planes, mid, 1), BatchNorm3d(planes))
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(Conv3d(cin, planes, 1, stride=stride, bias=False), BatchNorm3d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, Cin, T, H, W) -> (B, planes, T/s, H/s, W/s)
        identity = x if self.downsample is None else self.downsample(x)
        out = self.conv2(self.conv1(x))
        return self.relu(out + identity)


def basic_stem(width: float) -> nn.Sequential:
    """3D ResNet stem: one 3×7×7 conv, stride (1, 2, 2)."""
    c = channels(64, width)
    return nn.Sequential(
        Conv3d(3, c, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
        BatchNorm3d(c),
        nn.ReLU(inplace=True),
    )


class VideoResNet(ClipBackbone):
    """Stem, then four stages of ``BasicBlock3d`` at 64/128/256/512 × width channels."""

    def __init__(self, *, stem: nn.Module, conv: ConvBuilder, layers: Sequence[int], width: float) -> None:
        super().__init__()
        self.stem = stem
        cin = channels(64, width)
        for i, (base, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            planes = channels(base, width)
            stride = 1 if i == 0 else 2
            stage = [BasicBlock3d(cin, planes, conv=conv, stride=stride)]
            stage += [BasicBlock3d(planes, planes, conv=conv) for _ in range(blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            cin = planes
        self.deep_channels = cin

    def forward_clip(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, T, H, W) -> (B, C, T/8, H/16, W/16)
        x = self.stem(x)  # (B, 64w, T, H/2, W/2)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def resnet3d(*, layers: Sequence[int], width: float) -> VideoResNet:
    return VideoResNet(stem=basic_stem(width), conv=conv3x3x3, layers=layers, width=width)


@BACKBONES.register("resnet3d_small")
def resnet3d_small(*, width: float = 1.0) -> VideoResNet:
    """Small 3D ResNet (3×3×3 convs, one block per stage, 16-128 channels) for quick searches."""
    return resnet3d(layers=(1, 1, 1, 1), width=0.25 * width)


__all__ = ["BasicBlock3d", "VideoResNet", "basic_stem", "channels", "conv3x3x3", "mid_channels", "resnet3d"]
