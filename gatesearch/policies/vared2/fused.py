"""The fused inference pass of a VA-RED² layer: rebuilds, V-weighting and the next BN in one write.

The cheap rebuilds Φ^c and Φ^t, the V-weighting of Eq. 3.5 and the eval BN
that follows the conv are all per-channel affine maps of computed features,
so inference composes them once (``FusedMaps``, cached per parameter version)
and applies them while writing the output: with one alternative per
dimension open, a multiply and an add, what the BN alone takes in the dense
network. The BN then sees an output marked as normalised already and passes
it through (``FusedBatchNorm2d`` / ``FusedBatchNorm3d``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from gatesearch.affine import bn_affine
from gatesearch.backbones.clip3d import BatchNorm3d


class _PassesFusedOutput:
    """A BN right after a ``DynamicConv``: at inference that layer applies it in ``fused_output``, and the output
    it marks passes through here unchanged. Anything else (training, a dense pass) is normalised as usual."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        source = self.__dict__["source"]
        if source.__dict__.get("fused_out") is x:
            source.__dict__["fused_out"] = None
            return x
        return super().forward(x)


class FusedBatchNorm3d(_PassesFusedOutput, BatchNorm3d):
    pass


class FusedBatchNorm2d(_PassesFusedOutput, nn.BatchNorm2d):
    pass


#: the BN types a ``DynamicConv`` can apply, and what each becomes when it does
FUSED_BN = {BatchNorm3d: FusedBatchNorm3d, nn.BatchNorm3d: FusedBatchNorm3d, nn.BatchNorm2d: FusedBatchNorm2d}


class Open(NamedTuple):
    """An open alternative of one dimension and its weight V."""

    index: int  # i (channel ratio (1/2)^i) or j (temporal stride 2^j)
    weight: float | torch.Tensor  # V: one float for every sample, or (n, 1, ...) per sample


@dataclass(frozen=True)
class FusedMaps:
    """The per-channel, per-time-offset affine maps of the fused pass, each (1, Co, 1, R_j, 1, 1)."""

    shift: torch.Tensor  # (1, Co, 1, 1, 1, 1): the BN shift
    time_bias: tuple[torch.Tensor, ...]  # [j]: BN scale × Φ^t_j bias
    scale: tuple[tuple[torch.Tensor, ...], ...]  # [i][j]: BN scale × Φ^t_j weight × Φ^c_i weight
    channel_bias: tuple[tuple[torch.Tensor, ...], ...]  # [i][j]: BN scale × Φ^t_j weight × Φ^c_i bias


def fused_maps(*, keep: Sequence[int], strides: Sequence[int], phi_c: nn.ModuleList, phi_t: nn.ModuleList,
               bn: nn.Module | None, like: torch.Tensor) -> FusedMaps:
    """Compose Φ^c_i (identity on the computed channels), Φ^t_j (identity at offset 0) and the BN, for every (i, j)."""
    co = keep[0]
    with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, usable outside inference mode
        s, h = like.new_ones(co), like.new_zeros(co)
        if bn is not None:
            s, h = bn_affine(bn)
        time_bias = []
        scale: list[list[torch.Tensor]] = [[] for _ in keep]
        channel_bias: list[list[torch.Tensor]] = [[] for _ in keep]
        for j, r in enumerate(strides):
            tw, tb = like.new_ones(r, co), like.new_zeros(r, co)  # identity at offset 0
            if j:
                tw[1:], tb[1:] = phi_t[j - 1].weight, phi_t[j - 1].bias
            time_bias.append((s * tb).t().reshape(1, co, 1, r, 1, 1))
            for i, k in enumerate(keep):
                a, b = like.new_ones(co), like.new_zeros(co)  # identity on the computed channels
                if i:
                    a[k:], b[k:] = phi_c[i - 1].weight, phi_c[i - 1].bias
                scale[i].append((s * tw * a).t().reshape(1, co, 1, r, 1, 1))
                channel_bias[i].append((s * tw * b).t().reshape(1, co, 1, r, 1, 1))
    return FusedMaps(shift=h.view(1, co, 1, 1, 1, 1), time_bias=tuple(time_bias),
                     scale=tuple(map(tuple, scale)), channel_bias=tuple(map(tuple, channel_bias)))


def fused_output(y: torch.Tensor, maps: FusedMaps, *, keep: Sequence[int], strides: Sequence[int],
                 open_c: list[Open], open_t: list[Open], steps: int) -> torch.Tensor:
    """Σ_j V_t[j]·f^t_j(Σ_i V_c[i]·f^c_i(y)) (Eq. 3.5 over the open alternatives), then the paired BN, from the
    head ``y`` (n, k, T', Ho, Wo) at the stride of the largest open temporal alternative: a multiply-add pass
    over the output per open pair (i, j), each an affine map of computed channels and steps, and a bias pass
    per open j. Returns (n, Co, steps, Ho, Wo)."""
    n, _, _, ho, wo = y.shape
    co, r_head = keep[0], strides[open_t[0].index]
    r_max = strides[open_t[-1].index]
    t_pad = math.ceil(steps / r_max) * r_max
    if isinstance(open_t[0].weight, torch.Tensor):  # per sample (n, 1, ...): to the rank of the maps
        open_c = [Open(i, v.view(-1, 1, 1, 1, 1, 1)) for i, v in open_c]
        open_t = [Open(j, v.view(-1, 1, 1, 1, 1, 1)) for j, v in open_t]
    out = empty_in_layout(y, (n, co, t_pad, ho, wo))
    biases = []  # per open j: its view of the output and V_t[j]·(T_j + Σ_i V_c[i]·Q_ij)
    for j, vt in open_t:
        r = strides[j]
        m = math.ceil(steps / r)
        src = y[:, :, :: r // r_head][:, :, :m].unsqueeze(3)  # the steps alternative j computed
        dst = out[:, :, : m * r].unflatten(2, (m, r))  # (n, Co, m, R_j, Ho, Wo)
        bias = maps.time_bias[j] * vt  # (1 or n, Co, 1, R_j, 1, 1)
        for i, vc in open_c:
            w, k = vt * vc, keep[i]
            bias += maps.channel_bias[i][j] * w
            a = maps.scale[i][j] * w
            # Φ^c: channel m ≥ k_i is an affine map of computed channel (m − k_i) mod k_i
            for lo in range(0, co, k):
                hi = min(co, lo + k)
                if biases or i != open_c[0].index:
                    dst[:, lo:hi].addcmul_(src[:, : hi - lo], a[:, lo:hi])
                else:  # the first pass writes (addcmul with a broadcast first operand is 3× slower on CPU)
                    torch.mul(src[:, : hi - lo], a[:, lo:hi], out=dst[:, lo:hi])
        biases.append((dst, bias))
    biases[0][1].add_(maps.shift)  # the BN shift, once
    for dst, bias in biases:
        dst.add_(bias)
    return out[:, :, :steps]


def empty_in_layout(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` with the memory order of ``like``'s dimensions.

    Rebuilt features keep the layout of the computed ones (frames-major, see
    ``clip3d.conv3d``), so elementwise ops never stride across it.
    """
    order = sorted(range(like.dim()), key=lambda d: (-like.stride(d), d))  # outermost first
    base = like.new_empty([shape[d] for d in order])
    return base.permute([order.index(d) for d in range(len(shape))])


__all__ = ["FUSED_BN", "FusedBatchNorm2d", "FusedBatchNorm3d", "FusedMaps", "Open", "empty_in_layout",
           "fused_maps", "fused_output"]
