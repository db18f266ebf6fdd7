"""Structured norm gates and block bookkeeping.

Skip-Convolutions, Eq. 5 (input-norm gate) and Eq. 7 (output-norm gate) with
p = 1: a position is recomputed iff  scale * sum_{support} |r_t| > eps, where the
support is every input channel times the (dilated) k×k window the conv reads
(zero padding, same stride). ``round(sigmoid(s - eps))`` is 1 exactly when
s > eps, so the gate is a plain comparison at inference. "Structured Sparsity"
(Sec. 3.2.2) then max-pools the position mask over b×b blocks. The gate runs on
every frame of every layer, so it has to be much cheaper than the conv: one
channel-sum of |r|, a box filter, a comparison and a max-pool.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from gatesearch.ops import _native
from gatesearch.ops.geometry import Pair, ceil_div, conv_out_size, is_dense, pair, same_dense_layout


def norm_gate_block_mask(
    r: torch.Tensor,
    *,
    kernel_size: int | Pair,
    stride: int | Pair = 1,
    padding: int | Pair = 0,
    dilation: int | Pair = 1,
    block_size: int = 1,
    threshold: float,
    scale: float = 1.0,
    out_hw: Pair | None = None,
    r_prev: torch.Tensor | None = None,
) -> torch.Tensor:
    """Residual (N, Ci, H, W) -> bool block mask (N, ceil(Ho/b), ceil(Wo/b)).

    ``scale=1`` is the input-norm gate (Eq. 5); ``scale=||w||_1`` the
    output-norm gate (Eq. 7). ``threshold=0`` keeps exactly the blocks whose
    outputs see a non-zero residual (lossless Skip-Conv, Eq. 2). ``out_hw``
    overrides the conv's output size (defaults to PyTorch's formula). With
    ``r_prev`` the residual is ``r - r_prev``, subtracted on the fly (C++ path).
    """
    kernel, stride, padding, dilation = (
        pair(kernel_size, "kernel_size"), pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    )
    if r.dim() != 4:
        raise ValueError(f"residual must be (N, C, H, W), got shape {tuple(r.shape)}")
    if out_hw is None:
        out_hw = tuple(conv_out_size(n, *a) for n, a in zip(r.shape[-2:], zip(kernel, stride, padding, dilation)))
    out_hw = (int(out_hw[0]), int(out_hw[1]))
    b = int(block_size)
    if r_prev is not None and not (_native.usable(r, r_prev) and same_dense_layout(r, r_prev)):
        r, r_prev = r - r_prev, None
    if _native.usable(r) and is_dense(r):
        ints = [*kernel, *stride, *padding, *dilation, 1, b, *out_hw]  # ConvGeometry.ints(), groups 1
        return _native.ops().gate_block_mask(r, ints, float(threshold), float(scale), r_prev)
    return _gate_torch(r, kernel, stride, padding, dilation, b, float(threshold), float(scale), out_hw)


def norm_gate(r: torch.Tensor, *, out_hw: Pair, **gate) -> Callable[..., torch.Tensor]:
    """``norm_gate_block_mask`` (same keywords) resolved once for a stream's fixed shape and layout:
    ``gate(r, r_prev=None) -> mask``."""
    kw = {"stride": 1, "padding": 0, "dilation": 1, "block_size": 1, "scale": 1.0, **gate,
          "out_hw": (int(out_hw[0]), int(out_hw[1]))}

    def general(r_, r_prev=None):
        return norm_gate_block_mask(r_, r_prev=r_prev, **kw)

    if not (_native.usable(r) and is_dense(r) and r.dim() == 4):
        return general
    ops = _native.ops()
    ints = [*(v for name in ("kernel_size", "stride", "padding", "dilation") for v in pair(kw[name], name)),
            1, int(kw["block_size"]), *kw["out_hw"]]  # ConvGeometry.ints(), groups 1
    shape, threshold, scale = (tuple(r.shape), r.stride()), float(kw["threshold"]), float(kw["scale"])

    def resolved(r_, r_prev=None):
        if (tuple(r_.shape), r_.stride()) != shape or (r_prev is not None and r_prev.stride() != shape[1]):
            return general(r_, r_prev)
        return ops.gate_block_mask(r_, ints, threshold, scale, r_prev)

    return resolved


def _gate_torch(r, kernel, stride, padding, dilation, block, threshold, scale, out_hw) -> torch.Tensor:
    """Plain-PyTorch gate: channel-sum of |r|, ones-kernel conv (box filter), compare, max-pool."""
    a = r.abs().sum(dim=1, keepdim=True)  # (N, 1, H, W)
    # zero-pad so the box filter yields at least out_hw positions (out_hw may exceed the formula)
    extra = [
        max(0, (o - 1) * s + d * (k - 1) + 1 - (n + 2 * p))
        for o, s, d, k, n, p in zip(out_hw, stride, dilation, kernel, a.shape[-2:], padding)
    ]
    a = F.pad(a, (padding[1], padding[1] + extra[1], padding[0], padding[0] + extra[0]))
    ones = a.new_ones(1, 1, *kernel)
    score = F.conv2d(a, ones, None, stride, 0, dilation)[..., : out_hw[0], : out_hw[1]]  # (N, 1, Ho, Wo)
    active = ((score * scale) > threshold).to(r.dtype if r.is_floating_point() else torch.float32)
    return pool_block_mask(active, block)


def pool_block_mask(position_mask: torch.Tensor, block: int) -> torch.Tensor:
    """(N, 1, Ho, Wo) 0/1 float -> bool (N, ceil(Ho/b), ceil(Wo/b)): max-pool b, partial edge blocks kept."""
    if block > 1:
        position_mask = F.max_pool2d(position_mask, block, block, ceil_mode=True)
    return position_mask.squeeze(1) > 0


def upsample_block_mask(block_mask: torch.Tensor, block: int, out_hw: Pair) -> torch.Tensor:
    """bool (N, Hb, Wb) -> bool (N, 1, Ho, Wo): nearest upsample by b, cropped to the output."""
    n, hb, wb = block_mask.shape
    up = block_mask[:, None, :, None, :, None].expand(n, 1, hb, block, wb, block)
    return up.reshape(n, 1, hb * block, wb * block)[..., : out_hw[0], : out_hw[1]]


@functools.lru_cache(maxsize=256)
def _block_areas(out_hw: Pair, block: int) -> torch.Tensor:
    ho, wo = out_hw
    hb, wb = ceil_div(ho, block), ceil_div(wo, block)
    rows = torch.full((hb,), float(block))
    cols = torch.full((wb,), float(block))
    rows[-1] = ho - (hb - 1) * block
    cols[-1] = wo - (wb - 1) * block
    return rows[:, None] * cols[None, :] / float(ho * wo)  # (Hb, Wb), sums to 1


def active_positions(block_mask: torch.Tensor, out_hw: Pair, block_size: int) -> int:
    """Output positions the mask recomputes over the whole batch (partial edge blocks by their real size)."""
    ho, wo = int(out_hw[0]), int(out_hw[1])
    if _native.usable() and block_mask.device.type == "cpu" and block_mask.dtype == torch.bool:
        return int(_native.ops().active_positions(block_mask, int(block_size), ho, wo))
    return round(float(block_density(block_mask, out_hw, block_size).sum()) * ho * wo)


def block_density(block_mask: torch.Tensor, out_hw: Pair, block_size: int) -> torch.Tensor:
    """Fraction of OUTPUT positions each stream recomputes, (N,) float32.

    Partial edge blocks count by their real size, so density times the dense
    MACs is the work the block-sparse kernel does.
    """
    areas = _block_areas((int(out_hw[0]), int(out_hw[1])), int(block_size)).to(block_mask.device)
    if tuple(block_mask.shape[-2:]) != tuple(areas.shape):
        raise ValueError(f"block_mask grid {tuple(block_mask.shape[-2:])} does not match {tuple(areas.shape)}")
    return (block_mask.to(torch.float32) * areas).sum(dim=(-2, -1))
