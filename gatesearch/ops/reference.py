"""The masked dense Skip-Conv step: the specification the fast kernels must match.

Skip-Convolutions, Eq. 3:  z_t = z_{t-1} + g(r_t) ⊙ (w * r_t),  with the gate
structured in b×b blocks ("Structured Sparsity"). The residual conv carries no
bias: the bias already lives in z (Eq. 2). This computes the full conv and
multiplies by the mask, so it costs more than the dense layer; it is the
reference, and the "dense" path when nearly every block is active.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gatesearch.ops.gate import upsample_block_mask
from gatesearch.ops.geometry import Pair, check_operands, resolve_geometry


def accumulate_masked_dense_(
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
) -> torch.Tensor:
    """z (N, Co, Ho, Wo) += upsample(block_mask, b) * conv2d(r, weight); in place, returns z."""
    geom = resolve_geometry(
        r.shape, weight.shape, stride=stride, padding=padding, dilation=dilation, groups=groups, block_size=block_size
    )
    check_operands(geom, z, r, block_mask)
    out = F.conv2d(r, weight, None, **geom.conv_args())  # (N, Co, Ho, Wo)
    mask = upsample_block_mask(block_mask, geom.block, geom.out_hw).to(out.dtype)  # (N, 1, Ho, Wo)
    return z.addcmul_(out, mask)
