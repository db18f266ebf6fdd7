"""Conv weights re-laid out for the block-sparse GEMMs, cached per weight tensor.

The gather writes the active positions' receptive fields in the order that
makes its reads contiguous for the residual's memory format; the weight has to
be permuted to the same order. A layer calls the kernel every frame with the
same weight, so the permuted copy is kept until the weight changes (in-place
update bumps ``_version``; ``.data =`` swaps the storage) or is freed.
"""

from __future__ import annotations

import enum
import functools
import os
import weakref

import torch


class Kind(enum.IntEnum):
    """Kernel variants of the C++ conv step (values shared with csrc/register.cpp: Kind)."""

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


_cache: dict[tuple, tuple[weakref.ref, int, int, torch.Tensor | None]] = {}


def packed_weight(weight: torch.Tensor, kind: Kind, groups: int) -> torch.Tensor:
    """``pack`` with a per-weight cache (identity + version + storage checked)."""
    return _cached(weight, (int(kind), groups), lambda: pack(weight, kind, groups))


def onednn_weight(weight: torch.Tensor, kind: Kind, groups: int) -> torch.Tensor | None:
    """The GEMM weight (K, Co) reordered for oneDNN's linear, which the C++ gather then multiplies with instead
    of at::mm (faster at the few rows of deep layers); None for grouped or depthwise kernels, or without oneDNN."""
    if kind != Kind.GEMM or groups != 1 or not _has_onednn_linear():
        return None
    return _cached(weight, ("onednn",), lambda: torch.ops.mkldnn._reorder_linear_weight(
        pack(weight, kind, 1)[0].t().contiguous(), None))


def _cached(weight: torch.Tensor, variant: tuple, make):
    key = (id(weight), *variant)
    hit = _cache.get(key)
    version = _version(weight)
    if hit is not None and hit[0]() is weight and hit[1] == version and hit[2] == weight.data_ptr():
        return hit[3]
    packed = make()
    ref = weakref.ref(weight, lambda _ref, key=key: _cache.pop(key, None))
    _cache[key] = (ref, version, weight.data_ptr(), packed)
    return packed


@functools.lru_cache(maxsize=1)
def _has_onednn_linear() -> bool:
    if os.environ.get("GATESEARCH_ONEDNN", "1") == "0" or not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(2, 3), None)
        return bool(torch.ops.mkldnn._linear_pointwise(torch.ones(1, 3), w, None, "none", [], "").sum() == 6)
    except (AttributeError, RuntimeError):
        return False


def _version(weight: torch.Tensor) -> int:
    """In-place update counter; tensors made under ``torch.inference_mode`` have none (-1)."""
    return -1 if weight.is_inference() else weight._version
