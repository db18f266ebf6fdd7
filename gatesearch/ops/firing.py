"""Frames that fire chosen blocks of a gated conv: what the layer bench and the plan's crossover calibration feed it.

With ε = 0 and block references (Skip-Convolutions, Eq. 3 with per-block references), frames alternating A, B,
A, B, ... make every residual frame recompute the blocks whose input halo differs between A and B. B = A +
``firing_residual`` differs from A on the input pixels that the chosen output blocks alone read, so exactly those
blocks fire. A block with no such pixel (b < k, or strides and dilation that share every pixel with a neighbour)
gets one pixel under its centre instead, which also wakes the neighbours that read it: callers count the density
the gate reports, not the one they asked for.
"""

from __future__ import annotations

import torch

from .geometry import ConvGeometry


def chosen_blocks(geom: ConvGeometry, count: int, gen: torch.Generator) -> list[int]:
    """``count`` distinct cells of the block grid (row-major), drawn from ``gen``."""
    hb, wb = geom.grid
    return torch.randperm(hb * wb, generator=gen)[:count].tolist()


def firing_residual(geom: ConvGeometry, cells: list[int], gen: torch.Generator) -> torch.Tensor:
    """(1, C_in, H, W): noise on each chosen block's own input pixels (see the module doc), zero elsewhere."""
    r = torch.zeros(1, geom.in_channels, *geom.in_hw)
    wb = geom.grid[1]
    for cell in cells:
        ys, xs = (_own_inputs(geom, axis, index * geom.block) for axis, index in enumerate(divmod(cell, wb)))
        r[:, :, ys, xs] = torch.randn(1, geom.in_channels, ys.stop - ys.start, xs.stop - xs.start, generator=gen)
    return r


def _own_inputs(geom: ConvGeometry, axis: int, start: int) -> slice:
    """Input rows (axis 0) or columns (1) read by the block's outputs [start, start + b) and by no other output."""
    k, s, p, d = geom.kernel[axis], geom.stride[axis], geom.padding[axis], geom.dilation[axis]
    n_in, n_out = geom.in_hw[axis], geom.out_hw[axis]
    end = min(start + geom.block, n_out)
    lo = max(0, (start - 1) * s - p + (k - 1) * d + 1)  # past the last input the output before the block reads
    hi = min(n_in - 1, end * s - p - 1)  # before the first input the output after the block reads
    if lo > hi:  # none: the pixel under the block's centre tap
        centre = min(start + (end - start) // 2, n_out - 1) * s - p + k // 2 * d
        centre = min(max(centre, 0), n_in - 1)
        return slice(centre, centre + 1)
    return slice(lo, hi + 1)


__all__ = ["chosen_blocks", "firing_residual"]
