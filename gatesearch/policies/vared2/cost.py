"""VA-RED² accounting: the channel counts of the alternatives, what a layer spends, and the cost ratio of Eq. 3.6.

``density`` (``objectives.macs``) is a layer's cost over its dense cost, the
cheap rebuilds and the V-weighting included; ``gate_macs`` is the gate's own
cost per video frame. The efficiency loss takes r^s/R^s per sample from
``st_cost``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn


def channel_counts(conv: nn.Module, space_size: int, block: int = 1) -> tuple[int, ...]:
    """k_i = C_out·(1/2)^i, in whole groups of a grouped conv, and to the nearest whole ``block`` once that is
    at least one block: the channels a conv skips save time only in whole blocks (``GateSettings.channel_block``)."""
    co, g = conv.out_channels, conv.groups
    unit = co // g if g > 1 else 1
    counts = [co]
    for i in range(1, space_size):
        k = co / 2**i
        whole = round(k / block) * block if g == 1 and block > 1 and k >= block else math.ceil(k / unit) * unit
        counts.append(min(co, max(unit, whole)))
    return tuple(counts)


def macs_per_output(conv: nn.Conv2d | nn.Conv3d) -> int:
    """MACs of one output value: the input channels of its group times the kernel size."""
    return (conv.in_channels // conv.groups) * math.prod(conv.kernel_size)


class LayerGeometry(NamedTuple):
    """What a layer's cost depends on for one input size (cached per size)."""

    out: tuple[int, ...]  # the dense output size per sample without channels
    dense_macs: float  # the dense conv's MACs per sample
    gate_macs: float  # the gate's MACs per sample


@dataclass
class LayerStats:
    """What the sparse path spent since the last reset (a plain object: counting must stay cheap)."""

    cost: float = 0.0  # MACs spent, rebuilds and V-weighting included
    dense: float = 0.0  # MACs the dense layer would have spent on the same samples
    gate: float = 0.0  # the gate's own MACs
    frames: int = 0  # video frames those samples cover


class CostRecord(NamedTuple):
    """One training forward's record for L_e (Eq. 3.6)."""

    dense_macs: float  # C(f_l): the layer's dense MACs per sample
    ratio: torch.Tensor  # (N,) r^s/R^s of what inference would run, straight-through (``st_cost``)


def rebuild_macs(*, channels: int, keep: Sequence[int], strides: Sequence[int], open_c: Sequence[int],
                 open_t: Sequence[int], computed: int, steps: int, plane: int, temporal: bool) -> int:
    """MACs of the sparse path beyond its one conv: Φ^c of each open channel alternative then its V-weighting,
    Φ^t of each open temporal one then its V-weighting (none when one alternative per dimension is open: both V
    fold into one scaling). ``computed``: positions per channel of the conv; ``plane``: positions per step."""
    single = len(open_t) == len(open_c) == 1
    macs = sum((channels - keep[i]) * computed + channels * computed for i in open_c)
    if temporal:
        for j in open_t:
            macs += (channels * (steps - math.ceil(steps / strides[j])) * plane
                     + (0 if single else channels * steps * plane))
    return macs


def st_cost(v: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """Cost ratio of the largest alternative with a non-zero weight (what inference runs), per sample.

    Its value is piecewise constant in V, so its gradient is straight-through:
    only the head (that largest open alternative) is pushed to close, by what
    closing it saves, ratio_h − ratio_{h+1}. The smaller open alternatives cost
    nothing beyond a rebuild while the head runs, and closing them saves
    nothing: a gradient Σ_i V_i·ratio_i on every V (as before) closed them with
    the head, at the same pace under Adam, so the output shrank, accuracy fell,
    and no clip's head ever closed within a short fine-tuning (finding 6: 3-5 %
    more MACs than dense after 4 epochs). The smaller alternatives are left to
    the task loss, which opens them as the head closes, as Eq. 3.5 intends.
    """
    active = v > 0  # (N, S)
    first = active.int().argmax(1)
    some = active.any(1)
    hard = torch.where(some, ratio[first], torch.zeros_like(v[:, 0]))
    saving = (ratio - torch.cat([ratio[1:], ratio.new_zeros(1)]))[first]  # (N,): head's cost beyond the next one
    soft = torch.where(some, v.gather(1, first[:, None])[:, 0] * saving, torch.zeros_like(hard))
    return hard + (soft - soft.detach())


__all__ = ["CostRecord", "LayerGeometry", "LayerStats", "channel_counts", "macs_per_output",
           "rebuild_macs", "st_cost"]
