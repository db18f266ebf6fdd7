"""Block-sparse Skip-Conv step: compute only the active output blocks.

Skip-Convolutions, Eq. 3 with "Structured Sparsity": z_t = z_{t-1} +
g(r_t) ⊙ (w * r_t), g constant on b×b output blocks. Multiplying a dense conv
by the mask (``accumulate_masked_dense_``) saves nothing; here the receptive
fields of the active positions are gathered (halo included), multiplied by
the weight in one GEMM, and scatter-added into z in place. Near full density
the gather costs more than it saves, so ``path="auto"`` falls back to the dense
conv above a crossover density measured on this machine (``crossover.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from gatesearch.ops import _native, _torch_kernels
from gatesearch.ops.gate import upsample_block_mask
from gatesearch.ops.geometry import ConvGeometry, Pair, check_operands, is_dense, resolve_geometry, same_dense_layout
from gatesearch.ops.packing import kernel_kind, onednn_weight, packed_weight

PATHS = ("auto", "sparse", "dense")


def accumulate_block_sparse_(
    z: torch.Tensor,
    r: torch.Tensor,
    weight: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    block_size: int,
    stride: int | Pair = 1,
    padding: int | Pair = 0,
    dilation: int | Pair = 1,
    groups: int = 1,
    path: str = "auto",
    r_prev: torch.Tensor | None = None,
) -> torch.Tensor:
    """z (N, Co, Ho, Wo) += upsample(block_mask, b) * conv2d(r, weight), computing active blocks only.

    With ``r_prev`` the residual is ``r - r_prev``, formed only where an active
    block reads it (C++ path) instead of over the whole frame.
    Same result as ``accumulate_masked_dense_`` (fp32 rounding aside). ``path``:
    "sparse" always gathers, "dense" runs the masked dense conv, "auto" picks
    per call from the mask's density and this machine's crossover. Inference
    only: with autograd recording, or off fp32 CPU, it runs the dense path.
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    geom = resolve_geometry(
        r.shape, weight.shape, stride=stride, padding=padding, dilation=dilation, groups=groups, block_size=block_size
    )
    check_operands(geom, z, r, block_mask)
    if r_prev is not None and (path == "dense" or not _native.usable(r, r_prev) or not same_dense_layout(r, r_prev)):
        r, r_prev = r - r_prev, None
    if path == "dense" or not _native.cpu_fp32_inference(z, r, weight):
        return accumulate_dense_(z, r, weight, block_mask, geom)

    r = _dense_layout(r)
    work = _dense_layout(z)
    max_rows = sparse_rows_limit(geom, r, path)

    if _native.usable(r, weight):
        kind = kernel_kind(in_per_group=geom.in_channels // geom.groups)
        wpack = packed_weight(weight, kind, geom.groups)
        rows = _native.ops().block_sparse_accumulate_(work, r, wpack, block_mask, geom.ints(), int(kind), max_rows,
                                                      r_prev, None, onednn_weight(weight, kind, geom.groups))
    else:
        rows = _torch_kernels.block_sparse_accumulate_(work, r, weight, block_mask, geom, max_rows)
    if rows < 0:  # denser than the crossover: the dense conv is faster
        return accumulate_dense_(z, r if r_prev is None else r - r_prev, weight, block_mask, geom)
    if work is not z:
        z.copy_(work)
    return z


def sparse_step(z: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, *, path: str = "auto",
                **conv) -> Callable[..., int]:
    """``accumulate_block_sparse_`` resolved once for a stream's fixed shapes, layouts and weight (``conv``: its
    geometry keywords, ``block_size`` to ``groups``).

    A skip-conv calls the same step every frame; validating the geometry,
    packing the weight and looking up the crossover once per clip leaves one
    C++ call per frame. Returns ``step(z, r, block_mask, r_prev=None) -> rows``:
    z updated in place; ``rows`` the output positions recomputed, or -1 when
    the step did not count them (dense conv above the crossover, or the
    general path, which operands that stop matching the resolved layouts take).
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    args = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, **conv}
    geom = resolve_geometry(r.shape, weight.shape, **args)
    fast = path != "dense" and _native.usable(z, r, weight) and is_dense(r) and is_dense(z)

    def general(z_, r_, mask, r_prev=None):
        accumulate_block_sparse_(z_, r_, weight, mask, path=path, r_prev=r_prev, **args)
        return -1

    if not fast:
        return general
    ops, ints = _native.ops(), geom.ints()
    kind = kernel_kind(in_per_group=geom.in_channels // geom.groups)
    wpack, onednn = packed_weight(weight, kind, geom.groups), onednn_weight(weight, kind, geom.groups)
    max_rows = sparse_rows_limit(geom, r, path)
    shapes = (tuple(z.shape), z.stride(), tuple(r.shape), r.stride())

    def step(z_, r_, mask, r_prev=None):
        if (tuple(z_.shape), z_.stride(), tuple(r_.shape), r_.stride()) != shapes or (
            r_prev is not None and r_prev.stride() != r_.stride()
        ):
            return general(z_, r_, mask, r_prev)
        rows = ops.block_sparse_accumulate_(z_, r_, wpack, mask, ints, int(kind), max_rows, r_prev, None, onednn)
        if rows < 0:  # denser than the crossover: the dense conv is faster
            accumulate_dense_(z_, r_ if r_prev is None else r_ - r_prev, weight, mask, geom)
        return rows

    return step


def sparse_rows_limit(geom: ConvGeometry, r: torch.Tensor, path: str) -> int:
    """Most output positions (over the batch) the sparse kernels take before the dense conv is faster:
    all of them for "sparse", none for "dense", this machine's crossover for "auto"."""
    total = r.shape[0] * geom.out_hw[0] * geom.out_hw[1]
    if path != "auto":
        return total if path == "sparse" else -1
    from gatesearch.ops.crossover import crossover_density

    return int(crossover_density(geom, batch=r.shape[0], channels_last=_is_channels_last(r)) * total)


def accumulate_dense_(
    z: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, block_mask: torch.Tensor, geom: ConvGeometry
) -> torch.Tensor:
    """Masked dense step, tuned: the full conv in channels_last (oneDNN's fast layout), then one add.

    The add touches only the active blocks (C++), or is one ``addcmul_`` with
    the upsampled mask (fallback).
    """
    if not bool(block_mask.any()):
        return z
    x = r.contiguous(memory_format=torch.channels_last)
    out = F.conv2d(x, weight, None, **geom.conv_args())  # (N, Co, Ho, Wo)
    if bool(block_mask.all()):
        return z.add_(out)
    if _native.usable(z, out) and is_dense(z):
        _native.ops().masked_add_(z, out, block_mask, geom.block)
        return z
    mask = upsample_block_mask(block_mask, geom.block, geom.out_hw).to(out.dtype)  # (N, 1, Ho, Wo)
    return z.addcmul_(out, mask)


def _is_channels_last(t: torch.Tensor) -> bool:
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _dense_layout(t: torch.Tensor) -> torch.Tensor:
    """t itself when NCHW- or channels_last-contiguous, else an NCHW copy."""
    return t if is_dense(t) else t.contiguous()
