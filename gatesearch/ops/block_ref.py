"""Skip-Conv with a per-block reference: residuals against each block's last computed input.

Skip-Convolutions, Eq. 3 takes r_t = x_t - x_{t-1}: a change the gate skips
is never seen again, so slow changes (an object edge creeping one sub-pixel
per frame, a drifting camera) are dropped frame after frame and the output
drifts away from the dense one over a long stream (the paper resets the
reference frame every few frames, Table 4). Here every output block keeps the
input halo it was last computed from; its residual is x_t minus that halo,
so skipped changes accumulate until the gate (Eq. 5 / 7 on that residual)
fires: "process information whenever the accumulated differences exceed some
threshold" (Skip-Convolutions, Section 1). The invariant z[block] = conv(its
reference)[block] holds exactly, so the error of every output stays bounded
by the gate instead of growing with the stream.

Memory: (b-1)s + (k-1)d + 1 squared halo floats per block and channel, about
2.25x the input for 3x3 convs in 4x4 blocks. The C++ kernels keep the halos
channel-minor and read x channels_last (whole channel vectors; streams run in
that layout); the PyTorch fallback keeps ``unfold``'s layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gatesearch.ops import _native, changes
from gatesearch.ops.gate import upsample_block_mask
from gatesearch.ops.geometry import ConvGeometry, is_dense
from gatesearch.ops.packing import kernel_kind, onednn_weight, packed_weight


def halo(geom: ConvGeometry) -> tuple[int, int]:
    """Input rows and columns one full output block reads."""
    b = geom.block
    return tuple((b - 1) * s + (k - 1) * d + 1 for k, s, d in zip(geom.kernel, geom.stride, geom.dilation))


class BlockReference:
    """The per-block input references of one layer's stream, filled from the clip's reference frame."""

    def __init__(self, x: torch.Tensor, geom: ConvGeometry, *, seen: int | None = None) -> None:
        """``seen``: the update of the stream tensor x (``ops.changes``) the references are filled from."""
        self.geom = geom
        self.seen = seen
        self.native = _native.usable(x) and is_dense(x)
        if self.native:
            x = self._layout(x)
            hb, wb = geom.grid
            ph, pw = halo(geom)
            self.ref = torch.zeros(x.shape[0] * hb * wb * ph * pw * x.shape[1])
            _native.ops().refresh_block_ref_(self.ref, x, None, geom.ints())
        else:
            self.ref = self._halos(x)  # (N, C*Ph*Pw, Hb*Wb)

    # -- gate -------------------------------------------------------------
    def gate(self, x: torch.Tensor, *, threshold: float, scale: float = 1.0) -> torch.Tensor:
        """Bool (N, Hb, Wb): blocks with an output whose scale * ||x - reference||_1 over its support > threshold.

        When x is a stream tensor that says which positions changed since the last call, blocks whose halo
        holds none of them are not read: their residual is last frame's, which did not fire (or was zeroed).
        """
        changed, self.seen = changes.since(x, self.seen), changes.step(x)
        if self.native:
            return _native.ops().gate_block_ref(self._layout(x), self.ref, self.geom.ints(), float(threshold),
                                                float(scale), changed)
        g = self.geom
        d = (self._halos(x) - self.ref).abs()  # (N, C*Ph*Pw, L)
        n, _, blocks = d.shape
        ph, pw = halo(g)
        a = d.view(n, g.in_channels, ph * pw, blocks).sum(1).transpose(1, 2).reshape(n * blocks, 1, ph, pw)
        s = F.conv2d(a, a.new_ones(1, 1, *g.kernel), None, g.stride, 0, g.dilation)  # (N*L, 1, b, b)
        s = s.view(n, *g.grid, g.block, g.block).permute(0, 1, 3, 2, 4).reshape(n, 1, g.grid[0] * g.block, -1)
        s = s[..., : g.out_hw[0], : g.out_hw[1]]  # outputs past the edge do not exist
        active = (s * scale > threshold).float()
        return F.max_pool2d(active, g.block, g.block, ceil_mode=True).squeeze(1) > 0

    # -- conv step --------------------------------------------------------
    def step(self, z: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             mask: torch.Tensor, *, max_rows: int) -> int:
        """z[active] += conv(x - reference)[active], references of active blocks <- x; returns the positions
        recomputed, or -1 when it ran the dense conv instead (more than ``max_rows``; the result is the same)."""
        g = self.geom
        if self.native and _native.usable(z, x, weight) and is_dense(z):
            x = self._layout(x)
            kind = kernel_kind(in_per_group=g.in_channels // g.groups)
            rows = _native.ops().block_sparse_accumulate_(
                z, x, packed_weight(weight, kind, g.groups), mask, g.ints(), int(kind), max_rows, None, self.ref,
                onednn_weight(weight, kind, g.groups))
            if rows >= 0:
                return rows
        self.recompute(z, x, weight, bias, mask)
        return -1

    def recompute(self, z: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  mask: torch.Tensor) -> None:
        """The masked dense formulation: z[active] = conv(x)[active] (the invariant makes it equal to the
        residual update), references of active blocks <- x."""
        g = self.geom
        out = F.conv2d(x, weight, bias, **g.conv_args())
        if self.native and _native.usable(z, out) and is_dense(z) and is_dense(out):
            _native.ops().masked_add_(z, out, mask, g.block, True)
        else:
            z.copy_(torch.where(upsample_block_mask(mask, g.block, g.out_hw), out, z))
        if self.native:  # the references keep their C++ layout even when the operands were off the fast path
            _native.ops().refresh_block_ref_(self.ref, self._layout(x), mask, g.ints())
        else:
            self.ref = torch.where(mask.flatten(1)[:, None, :], self._halos(x), self.ref)

    # -- helpers ----------------------------------------------------------
    @staticmethod
    def _layout(x: torch.Tensor) -> torch.Tensor:
        """x channels_last, as the C++ halos are channel-minor (a no-op for streams, which run channels_last)."""
        return x.contiguous(memory_format=torch.channels_last)

    def _halos(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C*Ph*Pw, Hb*Wb): every block's halo, zeros where the conv reads padding."""
        g = self.geom
        (ph, pw), (hb, wb), b = halo(g), g.grid, g.block
        bottom = max(0, (hb - 1) * b * g.stride[0] + ph - x.shape[2] - g.padding[0])
        right = max(0, (wb - 1) * b * g.stride[1] + pw - x.shape[3] - g.padding[1])
        xp = F.pad(x, (g.padding[1], right, g.padding[0], bottom))
        return F.unfold(xp, (ph, pw), stride=(b * g.stride[0], b * g.stride[1]))
