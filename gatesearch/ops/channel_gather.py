"""Channel- and tile-gathered convs: the inference kernels of the D-STEP gate.

D-STEP (Raviv et al.), Eq. 1-2: between the two convs of a residual block,
only *compute* channels are produced by the first conv, *skipped* channels are
dropped as inputs of the next conv, and only the active p×p tiles of the output
are computed at all. Multiplying a dense result by masks saves nothing, so
here the weights are cut to the channels in use (one small conv instead of a
big one) and the output tiles are gathered with the Skip-Conv block-sparse
kernel (im2col of the active positions with their halo, one GEMM, scatter-add),
which is exactly "conv on active tiles" when it accumulates onto a tensor that
holds the bias there and zero elsewhere.

Eval-mode batch norm is folded into the conv once (``FoldedConv``), and the
GEMM layout of the whole weight is packed once, so a frame only gathers the
rows and columns of its channels instead of re-packing a sliced weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from gatesearch.affine import bn_affine, versions
from gatesearch.ops import _native
from gatesearch.ops.block_sparse import accumulate_block_sparse_
from gatesearch.ops.gate import block_density, upsample_block_mask
from gatesearch.ops.geometry import Pair, conv_out_size, resolve_geometry
from gatesearch.ops.packing import Kind

#: cost of laying out a fresh conv weight, in output positions of that conv (measured with one thread on
#: EPYC: 2-6 ms for a 512×256×3×3 weight at 7×7 outputs, i.e. 50-100 positions; negligible at 28² and up)
REORDER_POSITIONS = 64
#: slice a dense conv's weight only below this fraction of it: channel counts off the conv library's
#: vector width (62 of 64) lose more to padding and re-layout than the dropped channels save
SLICE_BELOW = 0.8


def layer_crossover(conv: FoldedConv, in_shape: tuple[int, int, int], tile: int) -> float:
    """Active-output fraction below which gathering tiles beats the dense conv, for this layer.

    Measured once per layer shape on this machine (``calibrate``) and cached
    in-process and on disk next to the Skip-Conv crossovers. It varies a lot:
    at high resolution the dense conv is compute-bound and gathering only pays
    below ~0.5; at 7×7 a layer is bound by its weight and gathering pays almost
    up to full density.
    """
    from gatesearch.ops import crossover as cache

    geom = resolve_geometry((1, *in_shape), tuple(conv.weight.shape), stride=conv.stride, padding=conv.padding,
                            dilation=conv.dilation, groups=1, block_size=tile)
    key = "dstep-tiles|" + cache._key(geom, 1, False)
    rho = _memo.get(key)
    if rho is None:
        rho = cache._disk_load().get(key)
        if rho is None:
            result = calibrate(conv, in_shape, tile)
            rho = result["crossover"]
            if result.get("stable", True):
                cache._disk_store(key, rho)
        _memo[key] = rho
    return rho


_memo: dict[str, float] = {}


def calibrate(conv: FoldedConv, in_shape: tuple[int, int, int], tile: int) -> dict:
    """Time the dense conv (then mask) against ``tile_conv``'s gathering at two densities, on random
    data, and solve for the crossing (``ops.crossover``'s procedure and checks)."""
    from gatesearch.ops import crossover as cal

    with torch.inference_mode(False):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, *in_shape, generator=gen)
        ho, wo = conv.out_hw(in_shape[1:])
        grid = (-(-ho // tile), -(-wo // tile))
        tiles = grid[0] * grid[1]
        masks = []
        for count in sorted({max(1, round(cal.LOW * tiles)), max(1, round(cal.HIGH * tiles))}):
            mask = torch.zeros(1, tiles, dtype=torch.bool)
            mask[0, torch.randperm(tiles, generator=gen)[:count]] = True
            masks.append(mask.view(1, *grid))
        densities = [float(block_density(m, (ho, wo), tile)) for m in masks]

        def dense():
            return _dense(x, conv, None, None, ho * wo).mul_(upsample_block_mask(masks[-1], tile, (ho, wo)))

        runs = [dense] + [lambda m=m: tile_conv(x, conv, m, tile=tile, path="sparse") for m in masks]
        with torch.no_grad():
            first, second = cal._time_interleaved(runs, cal.BUDGET_S)
    best = [min(a, b) for a, b in zip(first, second)]
    rho = cal._solve(best[0], best[1:], densities)
    stable = abs(cal._solve(first[0], first[1:], densities) - cal._solve(second[0], second[1:], densities)) <= 0.1
    stable = stable and not cal._busy()
    if not stable:
        rho = min(0.7, max(0.3, rho))
    return {"crossover": rho, "stable": stable}


@dataclass
class FoldedConv:
    """``bn(conv(x))`` of an eval-mode block as one conv: weight (Co, Ci, kh, kw), bias (Co,)."""

    weight: torch.Tensor
    bias: torch.Tensor
    stride: Pair
    padding: Pair
    dilation: Pair
    _gemm: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def fold(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> FoldedConv:
        with torch.no_grad():
            scale, bias = bn_affine(bn)  # (Co,)
            if conv.bias is not None:
                bias = bias + conv.bias * scale
            weight = (conv.weight * scale[:, None, None, None]).contiguous()
        return cls(weight=weight, bias=bias.contiguous(), stride=tuple(conv.stride), padding=tuple(conv.padding),
                   dilation=tuple(conv.dilation))

    @staticmethod
    def version_key(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple:
        """Changes whenever ``fold(conv, bn)`` would: any parameter or statistic updated in place, or the
        weight's storage swapped. Callers cache the fold under it."""
        return versions(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)

    def gemm(self) -> torch.Tensor:
        """(T, Ci, Co): the weight in the gather's (tap, channel) row order, packed once."""
        if self._gemm is None:
            co, ci, kh, kw = self.weight.shape
            self._gemm = self.weight.reshape(co, ci, kh * kw).permute(2, 1, 0).contiguous()
        return self._gemm

    def out_hw(self, in_hw) -> tuple[int, int]:
        kh, kw = self.weight.shape[-2:]
        return tuple(conv_out_size(n, k, s, p, d)
                     for n, k, s, p, d in zip(in_hw, (kh, kw), self.stride, self.padding, self.dilation))


def tile_conv(x: torch.Tensor, conv: FoldedConv, tile_mask: torch.Tensor, *, tile: int,
              out_idx: torch.Tensor | None = None, in_idx: torch.Tensor | None = None,
              density: float | None = None, crossover: float = 0.5, path: str = "auto") -> torch.Tensor:
    """conv(x) + bias for the ``out_idx`` output channels, reading the ``in_idx`` input channels
    (None: all; x holds exactly those), on the active p×p output tiles; exactly zero elsewhere.

    x (N, Ci', H, W), tile_mask bool (N, ceil(Ho/p), ceil(Wo/p)) -> (N, Co', Ho, Wo).
    ``path``: "auto" gathers tiles below a ``crossover`` active fraction (see
    ``layer_crossover``) and runs the dense conv (then masks) above it;
    "sparse" always gathers.
    """
    n = x.shape[0]
    ho, wo = conv.out_hw(x.shape[-2:])
    bias = conv.bias if out_idx is None else conv.bias.index_select(0, out_idx)
    co = bias.numel()
    if density is None:  # fraction of the outputs on active tiles (the caller may know it already)
        density = float(block_density(tile_mask, (ho, wo), tile).mean())
    if density == 0.0 or co == 0:
        return x.new_zeros(n, co, ho, wo)
    if x.shape[1] == 0:  # no input channel left: the bias alone, on the active tiles
        return upsample_block_mask(tile_mask, tile, (ho, wo)).to(x.dtype) * bias[None, :, None, None]
    if path != "sparse" and density >= crossover:
        out = _dense(x, conv, out_idx, in_idx, ho * wo)  # (N, Co', Ho, Wo)
        if density < 1.0:
            out.mul_(upsample_block_mask(tile_mask, tile, (ho, wo)))
        return out
    z = upsample_block_mask(tile_mask, tile, (ho, wo)).to(x.dtype) * bias[None, :, None, None]  # bias on active tiles
    x = x if x.is_contiguous() else x.contiguous()
    if not _native.usable(x, z):  # plain-PyTorch kernels: they take the (sliced) conv weight
        weight = conv.weight if out_idx is None else conv.weight.index_select(0, out_idx)
        weight = weight if in_idx is None else weight.index_select(1, in_idx)
        return accumulate_block_sparse_(z, x, weight, tile_mask, block_size=tile, stride=conv.stride,
                                        padding=conv.padding, dilation=conv.dilation, path="sparse")
    wpack = conv.gemm()  # (T, Ci, Co)
    if in_idx is not None:
        wpack = wpack.index_select(1, in_idx)  # whole rows: a fast copy
    wpack = wpack.reshape(-1, wpack.shape[-1])  # (T*Ci', Co)
    if out_idx is not None:  # columns: gather (index_select along the last axis is ~8× slower)
        wpack = torch.gather(wpack, 1, out_idx.expand(wpack.shape[0], -1))
    kh, kw = conv.weight.shape[-2:]
    geom = resolve_geometry(x.shape, (co, x.shape[1], kh, kw), stride=conv.stride, padding=conv.padding,
                            dilation=conv.dilation, groups=1, block_size=tile)
    wpack = wpack.reshape(1, -1, co)  # (G=1, T*Ci, Co), the layout of ops.packing
    _native.ops().block_sparse_accumulate_(z, x, wpack, tile_mask, geom.ints(), int(Kind.GEMM),
                                           n * ho * wo)
    return z


def _dense(x: torch.Tensor, conv: FoldedConv, out_idx, in_idx, positions: int) -> torch.Tensor:
    """The dense conv of the used channels: a sliced weight, or the whole (cached) one when slicing costs more.

    A weight the conv library has not seen is re-laid out on every call (the
    cost of ~``REORDER_POSITIONS`` output positions per weight), while the
    folded weight is the same tensor every frame and stays laid out; odd
    channel counts run below the library's best speed. So when most channels
    are used (``SLICE_BELOW``), or at a low resolution, computing all of them
    and dropping the extra outputs is cheaper than a fresh, smaller weight.
    """
    co_all, ci_all = conv.weight.shape[:2]
    used = (co_all if out_idx is None else out_idx.numel()) * (ci_all if in_idx is None else in_idx.numel())
    sliced = (out_idx is not None or in_idx is not None) and used < SLICE_BELOW * co_all * ci_all and (
        used * (positions + REORDER_POSITIONS) < co_all * ci_all * positions)
    if sliced:
        weight = conv.weight if out_idx is None else conv.weight.index_select(0, out_idx)
        weight = weight if in_idx is None else weight.index_select(1, in_idx)
        bias = conv.bias if out_idx is None else conv.bias.index_select(0, out_idx)
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation)
    if in_idx is not None:  # scatter the used input channels among zeros
        full = x.new_zeros(x.shape[0], ci_all, *x.shape[-2:])
        x = full.index_copy_(1, in_idx, x)
    out = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation)
    return out if out_idx is None else out.index_select(1, out_idx)


__all__ = ["REORDER_POSITIONS", "FoldedConv", "calibrate", "layer_crossover", "tile_conv"]
