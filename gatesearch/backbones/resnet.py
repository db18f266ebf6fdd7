"""ResNet-18/34/50, optionally with online temporal shift (TSM), as per-frame backbones.

ResNet (He, Zhang, Ren and Sun, "Deep Residual Learning for Image Recognition",
CVPR 2016) is the backbone the Skip-Convolutions and D-STEP experiments gate.
Module names follow torchvision (``conv1``, ``bn1``, ``layer1``..``layer4``,
``downsample.0/1``) so that a user's torchvision-style state dict loads with
``load_weights`` (drop its ``fc.`` keys: heads belong to the task).

TSM variants (Lin et al., ICCV 2019) put an online temporal shift on the
residual branch of every block, before ``conv1`` ("residual shift", Section
3.2): the identity path keeps the frame's own features, so spatial features are
not damaged while the branch mixes in the previous frame.

The split for the heads: ``fine`` = stem + ``layer1`` (stride 4; the heatmap
head), ``deep`` = ``layer2``..``layer4`` (stride 32; the clip head).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import Add, Backbone, contiguous
from .registry import BACKBONES
from .temporal_shift import TemporalShift


def channels(base: int, width: float) -> int:
    """``base`` scaled by the width multiplier, at least 4 channels."""
    return max(4, round(base * width))


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3×3 convs and an identity (ResNet-18/34)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, *, stride: int = 1, shift: bool = False) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.shift = TemporalShift(cin) if shift else nn.Identity()
        self.conv1 = conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = _downsample(cin, cout, stride)
        self.add = Add()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, Cin, H, W) -> (N, Cout, H/s, W/s)
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(self.shift(x))))
        out = self.bn2(self.conv2(out))
        return self.relu(self.add(out, identity))  # out of place: gated convs' outputs are their state


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (carries the stride, as torchvision's v1.5), 1×1 expand ×4 (ResNet-50)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, *, stride: int = 1, shift: bool = False) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.shift = TemporalShift(cin) if shift else nn.Identity()
        self.conv1 = conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, cout)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, cout, stride)
        self.add = Add()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, Cin, H, W) -> (N, 4·planes, H/s, W/s)
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(self.shift(x))))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(self.add(out, identity))


def _downsample(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    """Projection shortcut when the shape changes (torchvision names: downsample.0 / .1)."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))


class ResNet(Backbone):
    """A ResNet trunk without its classifier; ``fine`` ends at layer1 (stride 4)."""

    def __init__(
        self,
        *,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        base_width: int = 64,
        width: float = 1.0,
        temporal_shift: bool = False,
    ) -> None:
        super().__init__()
        planes = [channels(base_width * 2**i, width) for i in range(4)]  # per stage
        stem = channels(base_width, width)
        self.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = stem
        for i, (p, n) in enumerate(zip(planes, layers)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, p, stride=2 if i > 0 and j == 0 else 1, shift=temporal_shift))
                cin = p * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.fine_channels = planes[0] * block.expansion
        self.deep_channels = planes[3] * block.expansion
        _init(self)

    def fine(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, C1, H/4, W/4)
        # the stem runs channels_last, oneDNN's fast layout: 2.5× faster at 224² on this CPU, max-pool 17×
        x = self.maxpool(self.relu(self.bn1(self.conv1(x.contiguous(memory_format=torch.channels_last)))))
        return self.layer1(contiguous(x))  # (N, stem, H/4, W/4)

    def deep(self, fine: torch.Tensor) -> torch.Tensor:  # (N, C1, H/4, W/4) -> (N, C4, H/32, W/32)
        return self.layer4(self.layer3(self.layer2(fine)))


def _init(model: nn.Module) -> None:
    """torchvision's initialisation: He-normal convs (fan-out), unit-gain BN."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def resnet(*, depth: int, width: float = 1.0, base_width: int = 64, layers: Sequence[int] | None = None,
           temporal_shift: bool = False) -> ResNet:
    """The one builder the named variants call: ``depth`` picks block type and default stage depths."""
    block, default_layers = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)),
                             50: (Bottleneck, (3, 4, 6, 3))}[depth]
    return ResNet(block=block, layers=layers or default_layers, base_width=base_width, width=width,
                  temporal_shift=temporal_shift)


@BACKBONES.register("resnet18")
def resnet18(*, width: float = 1.0) -> ResNet:
    """ResNet-18 (He et al. 2016), 64-512 channels, 11.2M parameters at width 1."""
    return resnet(depth=18, width=width)


@BACKBONES.register("resnet34")
def resnet34(*, width: float = 1.0) -> ResNet:
    """ResNet-34 (He et al. 2016), 64-512 channels, basic blocks (3, 4, 6, 3)."""
    return resnet(depth=34, width=width)


@BACKBONES.register("resnet50")
def resnet50(*, width: float = 1.0) -> ResNet:
    """ResNet-50 (He et al. 2016), bottleneck blocks, 256-2048 channels."""
    return resnet(depth=50, width=width)


@BACKBONES.register("resnet18_tiny")
def resnet18_tiny(*, width: float = 1.0) -> ResNet:
    """ResNet-18 layout cut to one block per stage and 16-128 channels, for CPU searches."""
    return resnet(depth=18, width=width, base_width=16, layers=(1, 1, 1, 1))


@BACKBONES.register("tsm_resnet18")
def tsm_resnet18(*, width: float = 1.0) -> ResNet:
    """ResNet-18 with an online temporal shift in every block (TSM, Lin et al. 2019)."""
    return resnet(depth=18, width=width, temporal_shift=True)


@BACKBONES.register("tsm_resnet50")
def tsm_resnet50(*, width: float = 1.0) -> ResNet:
    """ResNet-50 with an online temporal shift in every block (TSM, Lin et al. 2019)."""
    return resnet(depth=50, width=width, temporal_shift=True)


@BACKBONES.register("tsm_resnet18_tiny")
def tsm_resnet18_tiny(*, width: float = 1.0) -> ResNet:
    """Tiny ResNet-18 (one block per stage, 16-128 channels) with online temporal shift."""
    return resnet(depth=18, width=width, base_width=16, layers=(1, 1, 1, 1), temporal_shift=True)
