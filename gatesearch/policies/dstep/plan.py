"""D-STEP blocks as steps of the native frame plan (policies/frame_step.py, csrc/dstep_step.cpp).

``DStepBlock._infer`` executes Eq. 1 with some 60 small operations per block
between its convs; at 64² they cost more than the convs save (the fidelity
report measured 0.44× of dense on hrnet_small). Planned, a block is one step:
its policy networks, Eq. 1's merge with the kept h_{t-1}, the tile-gathered
branch and the shortcut run without Python, with the block's folded weights,
its tile grid and each conv's calibrated crossover fixed when the plan is
built. ``plan_block`` adds the step (or answers None where the block must run
in Python); ``record`` books each frame's decisions exactly as ``_infer``
does (Eq. 2, ``record_frame``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gatesearch.affine import versions
from gatesearch.backbones.temporal_shift import TemporalShift

from .block import DStepBlock
from .flops import FrameChoice, record_frame
from .nets import COMPUTE
from .tiles import TileLevel


@dataclass(frozen=True)
class BlockStats:
    """Where a planned block's per-frame decisions go: its convs' MacCounter records (``record_frame``)."""

    block: DStepBlock
    levels: tuple[TileLevel, ...]
    policy_macs: float
    channels: int  # conv1's outputs: what the skip / reuse / compute counts are fractions of
    convs: tuple  # the block's GatedConvs, in order


def plannable(block: DStepBlock) -> bool:
    """What the plan runs: gated inference on the gathered path ("auto" or "sparse"), the policies deciding."""
    shift = getattr(block, "shift", None)
    return (block.gating and not block.force_open and not block.training and block.path in ("auto", "sparse")
            and (not isinstance(shift, nn.Module) or isinstance(shift, (TemporalShift, nn.Identity)))
            and _downsample(block) is not False)


def signature(block: DStepBlock) -> tuple:
    """Changes whenever the block's plan would: any weight, statistic or policy parameter, the offset, knobs."""
    tensors = [*block.parameters(), *block.buffers()]
    return (id(block), block.gating, block.force_open, block.path, block.tile, block.training, versions(*tensors))


def outside_signature(model: nn.Module) -> tuple:
    """The weights and statistics outside the D-STEP blocks (the plain convs and BNs the plan folds).

    One walk of the module tree that stops at D-STEP blocks (their own ``signature`` covers them): it runs at every
    clip's reference frame, where ``parameters()`` / ``buffers()`` walks cost more than the versions themselves."""
    tensors, todo = [], [model]
    while todo:
        m = todo.pop()
        if isinstance(m, DStepBlock):
            continue
        tensors += m._parameters.values()
        tensors += m._buffers.values()
        todo += (c for c in m._modules.values() if c is not None)
    return versions(*tensors)


def _downsample(block: DStepBlock):
    """None (identity shortcut), the folded conv + BN of the shortcut, or False (a shortcut the plan cannot run)."""
    ds = block.downsample
    if ds is None:
        return None
    if (isinstance(ds, nn.Sequential) and len(ds) == 2 and type(ds[0]) is nn.Conv2d and ds[0].groups == 1
            and type(ds[1]) is nn.BatchNorm2d and isinstance(ds[0].padding, tuple)
            and ds[0].padding_mode == "zeros"):
        return block._fold_pair("downsample", ds[0], ds[1])
    return False


def plan_block(plan, block: DStepBlock, src: int, in_shape: tuple[int, ...]) -> tuple[int, tuple, BlockStats] | None:
    """Add ``block`` reading plan slot ``src`` (N, Cin, H, W); returns (slot, output shape, stats), or None when
    the block runs in Python (``plannable``)."""
    if not plannable(block) or len(in_shape) != 4:
        return None
    from gatesearch.ops.channel_gather import layer_crossover

    geo = block.geometry(tuple(in_shape[2:]))
    policy = block.policy
    c = block.conv1.out_channels
    ds = _downsample(block)
    shift = getattr(block, "shift", None)
    with torch.no_grad():
        cin = policy.spatial_weight.shape[1]
        spatial = policy.spatial_weight.detach().reshape(cin, 9).t().contiguous()  # (9, Cin), as spatial_logits
        spatial_bias = float((policy.spatial_bias * policy.gain + policy.offset).item())
        onehot = F.one_hot(torch.tensor(COMPUTE), 3).to(policy.offset.dtype)
        fc2_bias = ((policy.fc2_bias * policy.gain).view(c, 3) + policy.offset * onehot).flatten()
        ds_geometry = [] if ds is None else [*ds.stride, *ds.padding, *ds.dilation]
        out = plan.dstep(src, spatial, spatial_bias, policy.fc1_weight.detach(), policy.fc1_bias.detach(),
                         policy.fc2_weight.detach(), fc2_bias.contiguous(), [block.tile, geo.in_tile, *geo.grid],
                         geo.in_area.flatten().tolist(), shift.fold if isinstance(shift, TemporalShift) else 0,
                         None if ds is None else ds.weight, None if ds is None else ds.bias, ds_geometry,
                         block.path == "sparse")
        first = geo.levels[0]
        shape = tuple(in_shape[1:])
        for i, (level, conv) in enumerate(zip(geo.levels, block.convs())):
            fold = block._fold(i)
            crossover = 0.5 if block.path == "sparse" else layer_crossover(fold, shape, level.tile)
            same = i > 0 and level.out_hw == first.out_hw and level.tile == first.tile
            plan.plan.dstep_level(fold.weight, fold.bias, [*fold.stride, *fold.padding, *fold.dilation, level.tile,
                                                           *level.out_hw],
                                  level.rows.tolist(), level.cols.tolist(), level.area.flatten().tolist(), same,
                                  float(crossover))
            shape = (conv.out_channels, *level.out_hw)
    stats = BlockStats(block=block, levels=geo.levels, policy_macs=geo.policy_macs, channels=c,
                       convs=tuple(block.convs()))
    return out, (in_shape[0], shape[0], *geo.levels[-1].out_hw), stats


def record(stats: list[BlockStats], per_block: list[list[list[float]]]) -> None:
    """One frame's decisions per block and stream, booked as ``DStepBlock._infer`` books them (Eq. 2)."""
    for s, rows in zip(stats, per_block):
        c = s.channels
        for row in rows:
            *area, skip, reuse, compute = row
            record_frame(s.convs, s.levels, FrameChoice(area, skip / c, reuse / c, compute / c), s.policy_macs)


__all__ = ["BlockStats", "outside_signature", "plan_block", "plannable", "record", "signature"]
