"""MobileNetV2 as a per-frame backbone.

MobileNetV2 (Sandler, Howard, Zhu, Zhmoginov and Chen, "MobileNetV2: Inverted
Residuals and Linear Bottlenecks", CVPR 2018): each block expands a thin
tensor with a 1×1 conv, filters it with a cheap depthwise 3×3 and projects it
back linearly (no activation, so the thin bottleneck loses no information);
the residual joins the thin ends. It is the usual mobile baseline, and its
depthwise convs put the gates on a very different cost profile from ResNet's.

Module names follow torchvision (``features.0`` .. ``features.18``, blocks as
``conv.0.0`` / ``conv.1`` ...) so that a torchvision state dict loads (without
its ``classifier.`` keys). ``fine`` = ``features[:4]`` (stride 4, 24 channels
at width 1), ``deep`` = the rest (stride 32, 1280 channels).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import Backbone
from .registry import BACKBONES

# (expansion t, output channels c, repeats n, first stride s) per stage: Table 2 of the paper
SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round to a multiple of ``divisor`` without going more than 10% down (as the reference code)."""
    out = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * v else out


class ConvBNReLU6(nn.Sequential):
    """conv, BN, ReLU6 (torchvision's Conv2dNormActivation layout: keys .0 / .1)."""

    def __init__(self, cin: int, cout: int, *, kernel_size: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """1×1 expand (skipped when t = 1), depthwise 3×3, linear 1×1 project; residual when shapes match."""

    def __init__(self, cin: int, cout: int, *, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNReLU6(cin, hidden, kernel_size=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),  # depthwise
            nn.Conv2d(hidden, cout, 1, bias=False),  # linear bottleneck: no activation
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, Cin, H, W) -> (N, Cout, H/s, W/s)
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(Backbone):
    """MobileNetV2 trunk without its classifier; ``fine`` ends after the first stride-4 stage."""

    def __init__(self, *, width: float = 1.0, repeats: Sequence[int] | None = None,
                 last_channels: int = 1280) -> None:
        super().__init__()
        repeats = repeats or [n for _, _, n, _ in SETTINGS]
        cin = make_divisible(32 * width)
        features: list[nn.Module] = [ConvBNReLU6(3, cin, stride=2)]  # H/2
        fine_end = None
        for (t, c, _, s), n in zip(SETTINGS, repeats):
            cout = make_divisible(c * width)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, stride=s if i == 0 else 1, expand=t))
                cin = cout
            if fine_end is None and s == 2:  # end of the first stride-2 stage: H/4
                fine_end, self.fine_channels = len(features), cout
        last = make_divisible(last_channels * max(1.0, width))
        features.append(ConvBNReLU6(cin, last, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.fine_end = fine_end
        self.deep_channels = last
        _init(self)

    def fine(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, 24w, H/4, W/4)
        return self.features[: self.fine_end](x)

    def deep(self, fine: torch.Tensor) -> torch.Tensor:  # -> (N, last, H/32, W/32)
        return self.features[self.fine_end :](fine)


def _init(model: nn.Module) -> None:
    """torchvision's initialisation: He-normal convs (fan-out), unit-gain BN."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@BACKBONES.register("mobilenet_v2")
def mobilenet_v2(*, width: float = 1.0) -> MobileNetV2:
    """MobileNetV2 (Sandler et al. 2018): inverted residuals, depthwise convs, 1280-d last stage."""
    return MobileNetV2(width=width)


@BACKBONES.register("mobilenet_v2_tiny")
def mobilenet_v2_tiny(*, width: float = 1.0) -> MobileNetV2:
    """MobileNetV2 at width 0.25, one block per stage and a 128-d last stage, for CPU searches."""
    return MobileNetV2(width=0.25 * width, repeats=(1,) * len(SETTINGS), last_channels=128)
