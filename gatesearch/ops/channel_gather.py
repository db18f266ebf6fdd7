"""Channel- and tile-gathered convs: the inference kernels of the D-STEP gate.

D-STEP (Raviv et al.), Eq. 1-2: between the two convs of a residual block,
only *compute* channels are produced by the first conv, *skipped* channels are
dropped as inputs of the next conv, and only the active p×p tiles of the output
are computed at all. Multiplying a dense result by masks saves nothing, so
here the weights are sliced to the channels that are used (one small dense
conv instead of a big one) and the output tiles are gathered with the
Skip-Conv block-sparse kernel (``accumulate_block_sparse_``: im2col of the
active positions with their halo, one GEMM, scatter), which is exactly "conv on
active tiles" when accumulated onto a tensor that holds the bias there.

Eval-mode batch norm is folded into the conv first, so one gathered conv gives
the normalised output and inactive tiles stay exactly zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gatesearch.ops.block_sparse import accumulate_block_sparse_
from gatesearch.ops.gate import block_density, upsample_block_mask

#: active-output fraction above which the dense (channel-sliced) conv beats gathering tiles, by tile size:
#: one GEMM row per position costs the same whatever p, but p = 1 gathers the most halo per output.
#: Measured on EPYC cores for ResNet-18 layer shapes (64@56² … 512@7², 3×3): sparse wins below ~0.6
#: for p >= 2 and below ~0.4 for p = 1.
TILE_CROSSOVER = {1: 0.4}
DEFAULT_CROSSOVER = 0.6


def crossover(tile: int) -> float:
    return TILE_CROSSOVER.get(int(tile), DEFAULT_CROSSOVER)


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of ``bn(conv(x))`` as one conv, for eval-mode batch norm."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (Co,)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return conv.weight * scale[:, None, None, None], bias


def select_channels(weight: torch.Tensor, bias: torch.Tensor, out_idx: torch.Tensor | None,
                    in_idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight (Co, Ci, kh, kw) and bias (Co,) cut to the used output and input channels (None: all)."""
    if out_idx is not None:
        weight, bias = weight.index_select(0, out_idx), bias.index_select(0, out_idx)
    if in_idx is not None:
        weight = weight.index_select(1, in_idx)
    return weight, bias


def tile_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, tile_mask: torch.Tensor, *, tile: int,
              stride, padding, dilation, path: str = "auto") -> torch.Tensor:
    """conv2d(x, weight) + bias on the active p×p output tiles, exactly zero elsewhere.

    x (N, Ci, H, W), weight (Co, Ci, kh, kw), bias (Co,), tile_mask bool
    (N, ceil(Ho/p), ceil(Wo/p)) -> (N, Co, Ho, Wo). ``path``: "auto" gathers
    tiles below ``crossover(tile)`` active fraction and runs the dense conv (then
    masks) above it; "sparse" always gathers; "dense" never does.
    """
    geometry = dict(stride=stride, padding=padding, dilation=dilation)
    n = x.shape[0]
    ho = (x.shape[2] + 2 * padding[0] - dilation[0] * (weight.shape[2] - 1) - 1) // stride[0] + 1
    wo = (x.shape[3] + 2 * padding[1] - dilation[1] * (weight.shape[3] - 1) - 1) // stride[1] + 1
    density = float(block_density(tile_mask, (ho, wo), tile).mean())
    if density == 0.0 or weight.shape[0] == 0:
        return x.new_zeros(n, weight.shape[0], ho, wo)
    if weight.shape[1] == 0:  # no input channel left: the bias alone, on the active tiles
        return upsample_block_mask(tile_mask, tile, (ho, wo)).to(x.dtype) * bias[None, :, None, None]
    if path == "dense" or (path == "auto" and density >= crossover(tile)):
        out = F.conv2d(x, weight, bias, **geometry)  # (N, Co, Ho, Wo)
        if density < 1.0:
            out.mul_(upsample_block_mask(tile_mask, tile, (ho, wo)))
        return out
    mask = upsample_block_mask(tile_mask, tile, (ho, wo)).to(x.dtype)  # (N, 1, Ho, Wo)
    z = mask * bias[None, :, None, None]  # (N, Co, Ho, Wo): the bias on active tiles, zero elsewhere
    return accumulate_block_sparse_(z, x, weight, tile_mask, block_size=tile, path="sparse", **geometry)


__all__ = ["TILE_CROSSOVER", "crossover", "fold_bn", "select_channels", "tile_conv"]
