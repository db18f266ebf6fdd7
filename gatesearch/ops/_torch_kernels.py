"""Plain-PyTorch block-sparse step: the fallback when the C++ kernels are absent.

Same algorithm as the C++ kernels (csrc/gather_gemm.cpp, depthwise.cpp), in
eager ops: list the active blocks, gather the receptive fields of their output
positions (im2col of the active positions only, zero where the kernel reads
padding), one (batched) GEMM, and ``index_add_`` into z. Index tables depend only on the geometry and are
cached. Slower than the C++ path by the eager dispatch of ~15 ops, exact all
the same.
"""

from __future__ import annotations

import functools

import torch

from gatesearch.ops.geometry import ConvGeometry
from gatesearch.ops.packing import Kind, packed_weight


@functools.lru_cache(maxsize=256)
def _block_positions(geom: ConvGeometry) -> torch.Tensor:
    """(Hb*Wb, b*b) flat output position oy*Wo+ox of each block's cells, -1 past the edge."""
    ho, wo = geom.out_hw
    hb, wb = geom.grid
    b = geom.block
    oy = torch.arange(hb).view(hb, 1, 1, 1) * b + torch.arange(b).view(1, 1, b, 1)  # (Hb, 1, b, 1)
    ox = torch.arange(wb).view(1, wb, 1, 1) * b + torch.arange(b).view(1, 1, 1, b)  # (1, Wb, 1, b)
    oy, ox = torch.broadcast_tensors(oy, ox)  # (Hb, Wb, b, b)
    flat = oy * wo + ox
    flat = torch.where((oy < ho) & (ox < wo), flat, torch.full_like(flat, -1))
    return flat.reshape(hb * wb, b * b)


@functools.lru_cache(maxsize=256)
def _taps(geom: ConvGeometry) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For every output position, the flat input index iy*W+ix of each kernel tap.

    Returns (index (Ho*Wo, T) clamped into range, validity (Ho*Wo, T, 1) float or
    None when no tap ever reads the zero padding).
    """
    (h, w), (ho, wo) = geom.in_hw, geom.out_hw
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geom.kernel, geom.stride, geom.padding, geom.dilation
    iy = torch.arange(ho).view(ho, 1, 1, 1) * sh - ph + torch.arange(kh).view(1, 1, kh, 1) * dh  # (Ho, 1, kh, 1)
    ix = torch.arange(wo).view(1, wo, 1, 1) * sw - pw + torch.arange(kw).view(1, 1, 1, kw) * dw  # (1, Wo, 1, kw)
    iy, ix = torch.broadcast_tensors(iy, ix)  # (Ho, Wo, kh, kw)
    ok = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    index = (iy.clamp(0, h - 1) * w + ix.clamp(0, w - 1)).reshape(ho * wo, kh * kw)
    valid = None if bool(ok.all()) else ok.reshape(ho * wo, kh * kw, 1).to(torch.float32)
    return index, valid


def block_sparse_accumulate_(
    z: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, block_mask: torch.Tensor, geom: ConvGeometry, max_rows: int
) -> int:
    """z += mask ⊙ conv(r, w) on the active blocks; returns rows computed, or -1 (z untouched) past max_rows."""
    n, ci, h, w = r.shape
    co, g = geom.out_channels, geom.groups
    ho, wo = geom.out_hw
    stream, block = block_mask.reshape(n, -1).nonzero(as_tuple=True)  # (nb,), (nb,)
    if stream.numel() == 0:
        return 0
    pos = _block_positions(geom)[block]  # (nb, b*b)
    inside = pos >= 0
    pos = pos[inside]  # (M,)
    stream = stream[:, None].expand_as(inside)[inside]  # (M,)
    m = pos.numel()
    if m > max_rows:
        return -1

    index, valid = _taps(geom)
    taps = geom.taps
    src = index[pos] + (stream * (h * w))[:, None]  # (M, T)
    rows = r.permute(0, 2, 3, 1).reshape(n * h * w, ci)  # (N*H*W, Ci); a view when channels_last
    cols = rows.index_select(0, src.reshape(-1)).view(m, taps, ci)  # (M, T, Ci)
    if valid is not None:
        cols.mul_(valid[pos])
    wpack = packed_weight(weight, Kind.GEMM, g)  # (G, T*Cg, Cog)
    if g == 1:
        out = torch.mm(cols.view(m, taps * ci), wpack[0])  # (M, Co)
    else:
        cg = ci // g
        cols = cols.view(m, taps, g, cg).permute(2, 0, 1, 3).reshape(g, m, taps * cg)  # (G, M, T*Cg)
        out = torch.bmm(cols, wpack).permute(1, 0, 2).reshape(m, co)  # (M, Co)

    flat = stream * (ho * wo) + pos  # (M,) output row in (N*Ho*Wo)
    if z.is_contiguous(memory_format=torch.channels_last):
        z.permute(0, 2, 3, 1).view(n * ho * wo, co).index_add_(0, flat, out)
    else:  # NCHW: add (Co, M) into each stream's (Co, Ho*Wo) plane
        planes = z.view(n, co, ho * wo)
        for s in range(n):
            sel = stream == s if n > 1 else slice(None)
            planes[s].index_add_(1, pos[sel], out[sel].t())
    return m
