"""Conv weights re-laid out for the block-sparse GEMMs, cached per weight tensor.

The gather writes the active positions' receptive fields in the order that
makes its reads contiguous for the residual's memory format; the weight has to
be permuted to the same order. A layer calls the kernel every frame with the
same weight, so the permuted copy is kept until the weight changes (in-place
update bumps ``_version``; ``.data =`` swaps the storage) or is freed.
"""

from __future__ import annotations

import enum
import weakref

import torch


class Kind(enum.IntEnum):
    """Kernel variants of csrc/skip_conv.cpp (values shared with its enum)."""

    GEMM = 0  # im2col of active positions (G, M, T*Cg) @ weight (G, T*Cg, Cog)
    DEPTHWISE = 1  # one input channel per group: direct loops, weight (T, Co)


def kernel_kind(*, in_per_group: int) -> Kind:
    """One input channel per group (depthwise and friends) skips the GEMM entirely."""
    return Kind.DEPTHWISE if in_per_group == 1 else Kind.GEMM


def pack(weight: torch.Tensor, kind: Kind, groups: int) -> torch.Tensor:
    """(Co, Cg, kh, kw) -> the layout ``kind`` multiplies with (contiguous fp32)."""
    co, cg, kh, kw = weight.shape
    w = weight.detach().to(torch.float32)
    taps = kh * kw
    if kind == Kind.GEMM:
        # (G, Cog, Cg, T) -> (G, T, Cg, Cog): rows follow the gather's (tap, channel) order
        w = w.reshape(groups, co // groups, cg, taps).permute(0, 3, 2, 1)
        return w.reshape(groups, taps * cg, co // groups).contiguous()
    return w.reshape(co, taps).t().contiguous()  # (T, Co)


_cache: dict[tuple[int, int, int], tuple[weakref.ref, int, int, torch.Tensor]] = {}


def packed_weight(weight: torch.Tensor, kind: Kind, groups: int) -> torch.Tensor:
    """``pack`` with a per-weight cache (identity + version + storage checked)."""
    key = (id(weight), int(kind), groups)
    hit = _cache.get(key)
    version = _version(weight)
    if hit is not None and hit[0]() is weight and hit[1] == version and hit[2] == weight.data_ptr():
        return hit[3]
    packed = pack(weight, kind, groups)
    ref = weakref.ref(weight, lambda _ref, key=key: _cache.pop(key, None))
    _cache[key] = (ref, version, weight.data_ptr(), packed)
    return packed


def _version(weight: torch.Tensor) -> int:
    """In-place update counter; tensors made under ``torch.inference_mode`` have none (-1)."""
    return -1 if weight.is_inference() else weight._version
