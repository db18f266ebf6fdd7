"""Conv geometry shared by the gate, the reference and the block-sparse kernels.

Skip-Convolutions, "Structured Sparsity" (Sec. 3.2.2): a gate decides per b×b
block of OUTPUT positions; edge blocks are partial when Ho or Wo is not a
multiple of b. Every kernel here needs the same numbers (output size, block
grid, which input rows/cols an output block reads), so they are resolved once,
validated once, and cached per shape.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

Pair = tuple[int, int]


def pair(value: int | tuple[int, ...] | list[int], name: str) -> Pair:
    """Normalise an int-or-tuple conv argument (as ``nn.Conv2d`` takes them) to a pair."""
    if type(value) is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        return value  # what nn.Conv2d stores: the per-frame fast path
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(v) for v in value)
    if len(value) == 1:
        return (value[0], value[0])
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {value!r}")
    return value  # type: ignore[return-value]


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def conv_out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a zero-padded conv along one axis (PyTorch's formula)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv_out_shape(conv, in_size) -> tuple[int, ...]:
    """Output size of a conv module with numeric padding (``Conv2d``: (Ho, Wo), ``Conv3d``: (To, Ho, Wo)) for an
    input of ``in_size`` (its sizes after the channels)."""
    return tuple(conv_out_size(n, k, s, p, d)
                 for n, k, s, p, d in zip(in_size, conv.kernel_size, conv.stride, conv.padding, conv.dilation))


@dataclass(frozen=True)
class ConvGeometry:
    """Every size a block-sparse conv step needs; hashable, so it keys caches."""

    in_channels: int
    out_channels: int
    groups: int
    in_hw: Pair
    out_hw: Pair
    kernel: Pair
    stride: Pair
    padding: Pair
    dilation: Pair
    block: int

    @property
    def grid(self) -> Pair:
        """Block grid (ceil(Ho/b), ceil(Wo/b))."""
        return (ceil_div(self.out_hw[0], self.block), ceil_div(self.out_hw[1], self.block))

    @property
    def taps(self) -> int:
        return self.kernel[0] * self.kernel[1]

    def conv_args(self) -> dict:
        """Keyword arguments for ``torch.nn.functional.conv2d``."""
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)

    def ints(self) -> list[int]:
        """The flat integer list the C++ kernels take (order fixed here; csrc/kernels.h: Geometry::parse reads it)."""
        return [
            self.kernel[0], self.kernel[1], self.stride[0], self.stride[1],
            self.padding[0], self.padding[1], self.dilation[0], self.dilation[1],
            self.groups, self.block, self.out_hw[0], self.out_hw[1],
        ]


@functools.lru_cache(maxsize=4096)
def _resolve(in_shape, w_shape, stride, padding, dilation, groups, block) -> ConvGeometry:
    _, ci, h, w = in_shape
    co, cig, kh, kw = w_shape
    if groups < 1 or ci % groups or co % groups:
        raise ValueError(f"groups={groups} must divide in_channels={ci} and out_channels={co}")
    if cig * groups != ci:
        raise ValueError(f"weight expects {cig * groups} input channels (groups={groups}), residual has {ci}")
    if block < 1:
        raise ValueError(f"block_size must be >= 1, got {block}")
    out_hw = tuple(
        conv_out_size(n, k, s, p, d)
        for n, k, s, p, d in zip((h, w), (kh, kw), stride, padding, dilation)
    )
    if min(out_hw) < 1:
        raise ValueError(f"conv output would be empty for input {h}x{w}, kernel {kh}x{kw}")
    return ConvGeometry(
        in_channels=ci, out_channels=co, groups=groups, in_hw=(h, w), out_hw=out_hw,
        kernel=(kh, kw), stride=stride, padding=padding, dilation=dilation, block=block,
    )


def resolve_geometry(r_shape, weight_shape, *, stride, padding, dilation, groups, block_size) -> ConvGeometry:
    """Validated geometry of ``conv2d(r, weight, ...)`` with b×b output blocks (cached)."""
    if len(r_shape) != 4 or len(weight_shape) != 4:
        raise ValueError(f"expected 4-D residual and weight, got {tuple(r_shape)} and {tuple(weight_shape)}")
    return _resolve(
        tuple(r_shape), tuple(weight_shape), pair(stride, "stride"), pair(padding, "padding"),
        pair(dilation, "dilation"), int(groups), int(block_size),
    )


def is_dense(t: torch.Tensor) -> bool:
    """NCHW- or channels_last-contiguous: the two layouts the C++ kernels take."""
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def same_dense_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The C++ kernels read a residual pair (x, x_prev) with one set of strides."""
    return is_dense(a) and a.shape == b.shape and a.stride() == b.stride()


def check_operands(geom: ConvGeometry, z: torch.Tensor, r: torch.Tensor, block_mask: torch.Tensor) -> None:
    """Fail with one clear line when z, r or the mask do not fit the conv."""
    n = r.shape[0]
    expect_z = (n, geom.out_channels, *geom.out_hw)
    if tuple(z.shape) != expect_z:
        raise ValueError(f"z has shape {tuple(z.shape)}, the conv gives {expect_z}")
    expect_m = (n, *geom.grid)
    if tuple(block_mask.shape) != expect_m or block_mask.dtype != torch.bool:
        raise ValueError(
            f"block_mask must be bool {expect_m} for block_size={geom.block}, "
            f"got {block_mask.dtype} {tuple(block_mask.shape)}"
        )
