"""The tile geometry of a D-STEP block: where each conv's outputs fall on the p×p tile grid of S_t.

D-STEP (Raviv et al.), Section 3.1. The spatial policy decides on a grid of
p×p tiles of the first conv's output; later convs of the branch (a stride-2
conv2, a bottleneck's conv3) see the same decisions on their own, possibly
smaller, tiles. Edge tiles are partial: the areas here weigh them by what
they cover, so the FLOPs of Eq. 2 count exactly the outputs computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from gatesearch.ops.geometry import conv_out_shape

from .flops import dense_conv_macs

if TYPE_CHECKING:
    from .nets import DStepPolicy


@dataclass(frozen=True)
class TileLevel:
    """One conv of the branch: its output size, tile size there and the tile grid map from S."""

    out_hw: tuple[int, int]
    tile: int  # q: output tile side at this resolution
    rows: torch.Tensor  # (Gq_h,) row of S each output tile takes its decision from
    cols: torch.Tensor  # (Gq_w,)
    area: torch.Tensor  # (Gq_h, Gq_w) fraction of the output each tile covers
    dense_macs: float  # the dense conv's MACs per frame


@dataclass(frozen=True)
class TileGeometry:
    """Everything about a block that depends on its input size only (cached per size by the block)."""

    in_hw: tuple[int, int]
    grid: tuple[int, int]  # (Gh, Gw) = ceil(conv1 output / p)
    in_tile: int  # p·stride(conv1): tile side on the block input
    in_area: torch.Tensor  # (Gh, Gw) input pixels per tile (edge tiles are partial)
    levels: tuple[TileLevel, ...]  # conv1, conv2, ...
    policy_macs: float  # the policy networks' MACs per frame


def tile_geometry(convs: list[nn.Conv2d], tile: int, in_hw: tuple[int, int], policy: DStepPolicy) -> TileGeometry:
    """The tile grid of S (on conv1's output) and its map onto every conv of the branch for ``in_hw`` inputs."""
    p = tile
    h_hw = conv_out_shape(convs[0], in_hw)
    grid = (-(-h_hw[0] // p), -(-h_hw[1] // p))
    in_tile = p * convs[0].stride[0]
    hp, wp = min(in_hw[0], grid[0] * in_tile), min(in_hw[1], grid[1] * in_tile)
    in_area = (edge_sizes(hp, in_tile)[:, None] * edge_sizes(wp, in_tile)[None, :]).reshape(grid)
    levels, hw, stride = [], in_hw, 1
    for i, conv in enumerate(convs):
        out_hw = conv_out_shape(conv, hw)
        if i > 0:
            stride *= conv.stride[0]
        q = max(p // stride, 1)
        gq = (-(-out_hw[0] // q), -(-out_hw[1] // q))
        rows = ((torch.arange(gq[0]) * q * stride) // p).clamp_(max=grid[0] - 1)
        cols = ((torch.arange(gq[1]) * q * stride) // p).clamp_(max=grid[1] - 1)
        area = edge_sizes(out_hw[0], q)[:, None] * edge_sizes(out_hw[1], q)[None, :] / (out_hw[0] * out_hw[1])
        levels.append(TileLevel(out_hw=out_hw, tile=q, rows=rows, cols=cols, area=area,
                                dense_macs=dense_conv_macs(conv, out_hw)))
        hw = out_hw
    return TileGeometry(in_hw=in_hw, grid=grid, in_tile=in_tile, in_area=in_area, levels=tuple(levels),
                        policy_macs=policy.macs(convs[0].in_channels, in_hw, grid))


def edge_sizes(length: int, tile: int) -> torch.Tensor:
    """(ceil(length / tile),): the side of each tile along one axis, the last one partial."""
    count = -(-length // tile)
    sizes = torch.full((count,), float(tile))
    sizes[-1] = length - (count - 1) * tile
    return sizes


def tile_mask_at(S: torch.Tensor, level: TileLevel) -> torch.Tensor:
    """S on the conv1-output tile grid (N, Gh, Gw) -> the same decisions on this conv's output tiles."""
    if S.shape[-2] == level.rows.numel() and S.shape[-1] == level.cols.numel():
        return S
    return S.index_select(1, level.rows).index_select(2, level.cols)


def active_areas(S: torch.Tensor, geo: TileGeometry) -> list[torch.Tensor]:
    """(N,) per conv: the fraction of its outputs on active tiles of S (N, Gh, Gw), 0/1 or bool."""
    first = geo.levels[0]
    areas = [(S * first.area).sum((1, 2))]
    for level in geo.levels[1:]:
        same = level.out_hw == first.out_hw and level.tile == first.tile
        areas.append(areas[0] if same else (tile_mask_at(S, level) * level.area).sum((1, 2)))
    return areas


def upsample_tiles(S: torch.Tensor, tile: int, out_hw: tuple[int, int]) -> torch.Tensor:
    """(N, Gh, Gw) -> (N, 1, Ho, Wo): nearest upsample by the tile side, cropped (differentiable)."""
    m = S.unsqueeze(1)
    if tile > 1:
        m = m.repeat_interleave(tile, dim=2).repeat_interleave(tile, dim=3)
    return m[..., : out_hw[0], : out_hw[1]]


def tile_sums(x: torch.Tensor, tile: int, grid: tuple[int, int]) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, Gh, Gw): sum of x over each input tile (edge tiles partial, zero-padded).

    Rows are summed as a middle-axis reduction and columns by strided adds,
    which is 2-5× faster than ``avg_pool2d`` for these small windows on CPU.
    """
    if tile == 1:
        return x
    n, c, h, w = x.shape
    hp, wp = grid[0] * tile, grid[1] * tile
    if (h, w) != (hp, wp):
        x = F.pad(x[..., :hp, :wp], (0, max(0, wp - w), 0, max(0, hp - h)))
    rows = x.reshape(n, c, grid[0], tile, wp).sum(3)  # (N, C, Gh, W)
    cols = rows[..., 0::tile]
    for j in range(1, tile):
        cols = cols + rows[..., j::tile]
    return cols  # (N, C, Gh, Gw)


__all__ = ["TileGeometry", "TileLevel", "active_areas", "tile_geometry", "tile_mask_at", "tile_sums", "upsample_tiles"]
