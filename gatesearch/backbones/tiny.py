"""A tiny 2D CNN that trains in seconds on 2 CPU cores: the default for searching."""

from __future__ import annotations

from torch import nn

from .base import Backbone
from .registry import BACKBONES


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class TinyNet(Backbone):
    """Four conv stages; the stride-4 stage feeds the heatmap head."""

    def __init__(self, *, width: float = 1.0) -> None:
        super().__init__()
        c = max(4, round(16 * width))
        self.stem = conv_bn_relu(3, c, stride=2)                                 # H/2
        self.stage1 = nn.Sequential(conv_bn_relu(c, 2 * c, 2), conv_bn_relu(2 * c, 2 * c))  # H/4
        self.stage2 = nn.Sequential(conv_bn_relu(2 * c, 4 * c, 2), conv_bn_relu(4 * c, 4 * c))  # H/8
        self.fine_channels, self.deep_channels = 2 * c, 4 * c

    def fine(self, x):  # (N, 3, H, W) -> (N, 2c, H/4, W/4)
        return self.stage1(self.stem(x))

    def deep(self, fine):  # -> (N, 4c, H/8, W/8)
        return self.stage2(fine)


@BACKBONES.register("tiny")
def tiny(*, width: float = 1.0) -> TinyNet:
    """Tiny 5-conv CNN (16-64 channels) for quick searches on CPU."""
    return TinyNet(width=width)
