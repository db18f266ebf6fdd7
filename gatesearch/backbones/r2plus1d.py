"""R(2+1)D: a video ResNet whose 3×3×3 convs are factorised into a 1×3×3 spatial and a 3×1×1 temporal conv.

Tran et al., "A Closer Look at Spatiotemporal Convolutions for Action
Recognition" (CVPR 2018), Section 3.5. The hidden width between the two convs
keeps the parameter count of the 3×3×3 conv, and the extra BN + ReLU between
them doubles the nonlinearities. R(2+1)D-18 is the base model of the VA-RED²
experiments (Tables 4.1-4.12); the layout and names are torchvision's
``r2plus1d_18`` so its weights load with ``load_weights``.
"""

from __future__ import annotations

from torch import nn

from .clip3d import BatchNorm3d, Conv3d
from .registry import BACKBONES
from .resnet3d import VideoResNet, channels


class Conv2Plus1D(nn.Sequential):
    """1×3×3 conv (space, stride s in H and W), BN, ReLU, 3×1×1 conv (time, stride s in T)."""

    def __init__(self, cin: int, cout: int, mid: int, stride: int = 1) -> None:
        super().__init__(
            Conv3d(cin, mid, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1), bias=False),
            BatchNorm3d(mid),
            nn.ReLU(inplace=True),
            Conv3d(mid, cout, (3, 1, 1), stride=(stride, 1, 1), padding=(1, 0, 0), bias=False),
        )


def r2plus1d_stem(width: float) -> nn.Sequential:
    """(2+1)D stem: 1×7×7 conv to 45w channels (stride (1, 2, 2)), then 3×1×1 conv to 64w."""
    mid, c = channels(45, width), channels(64, width)
    return nn.Sequential(
        Conv3d(3, mid, (1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False),
        BatchNorm3d(mid),
        nn.ReLU(inplace=True),
        Conv3d(mid, c, (3, 1, 1), stride=1, padding=(1, 0, 0), bias=False),
        BatchNorm3d(c),
        nn.ReLU(inplace=True),
    )


def r2plus1d(*, layers: tuple[int, ...], width: float) -> VideoResNet:
    return VideoResNet(stem=r2plus1d_stem(width), conv=Conv2Plus1D, layers=layers, width=width)


@BACKBONES.register("r2plus1d_18")
def r2plus1d_18(*, width: float = 1.0) -> VideoResNet:
    """R(2+1)D-18 (Tran et al. 2018), torchvision layout: 2 blocks per stage, 64-512 channels."""
    return r2plus1d(layers=(2, 2, 2, 2), width=width)


@BACKBONES.register("r2plus1d_tiny")
def r2plus1d_tiny(*, width: float = 1.0) -> VideoResNet:
    """Tiny R(2+1)D (one block per stage, 16-128 channels) that trains in seconds on CPU."""
    return r2plus1d(layers=(1, 1, 1, 1), width=0.25 * width)


__all__ = ["Conv2Plus1D", "r2plus1d", "r2plus1d_stem"]
