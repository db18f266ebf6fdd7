"""The D-STEP gated residual block: Eq. 1 executed, masked in training and gathered at inference.

D-STEP (Raviv et al.), Section 3.1. The block's policy networks (``nets``)
decide S_t (p×p tiles) and T_t (skip / reuse / compute per channel of the
first conv's output); Eq. 1 then merges
h_t = S_t ⊙ [compute: relu(bn1(conv1 x_t)); reuse: h_{t-1}; skip: 0],
the rest of the branch runs on h_t at the active tiles only, and the block
output is relu(identity + S_t ⊙ branch): an inactive tile passes the identity.
The stream is causal: reuse takes the previous frame's merged features (zero at
a clip's first frame, like zero padding in time), so reusing costs nothing.

Which modules are residual blocks (the protocol): a module whose class sets
``dstep_block = True``, or, by duck typing, any torchvision-style BasicBlock /
Bottleneck: ``conv1``/``bn1``, ``conv2``/``bn2`` (and ``conv3``/``bn3`` ...) as
``Conv2d`` (groups 1, numeric zero padding) / ``BatchNorm2d`` pairs, a
``downsample`` attribute (None or a module on the identity path), an optional
``shift`` in front of ``conv1``, and a forward equal to
``relu(bn_n(conv_n(... relu(bn1(conv1(shift(x)))) ...)) + identity)``. A class
sets ``dstep_block = False`` to opt out.

Outside a stream (and with gating off) the block runs its original forward,
so the batched network (and fvcore's count) is the dense one.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from gatesearch.affine import FoldCache

from .flops import FrameChoice, FrameFlops, GatedConv, frame_flops, record_frame
from .nets import COMPUTE, REUSE, SKIP, DStepPolicy, binary_st, categorical_st
from .settings import DStepSettings
from .tiles import TileGeometry, active_areas, tile_geometry, tile_mask_at, tile_sums, upsample_tiles

GATHER_ALWAYS, DENSE_ALWAYS = 0.1, 0.95  # active fractions with an obvious kernel (no calibration needed)


class ConvBN(NamedTuple):
    conv: nn.Conv2d
    bn: nn.BatchNorm2d


class Decisions(NamedTuple):
    """One frame's gate output, straight-through when autograd records."""

    tiles: torch.Tensor  # S_t (N, Gh, Gw), 0/1
    channels: torch.Tensor  # T_t (N, C, 3), one-hot over (skip, reuse, compute)


class Kept(NamedTuple):
    """One stream's merged features h_t as the inference path keeps them: only the channels that hold values."""

    features: torch.Tensor  # (1, len(channels), Hh, Wh)
    channels: torch.Tensor  # (K,) their channel indices: the computed ones, then the reused ones


# -- the residual-block protocol --------------------------------------------------------------------

def residual_pairs(block: nn.Module) -> list[ConvBN] | None:
    """The (conv, bn) pairs of a residual block's branch, or None when D-STEP does not gate it."""
    flag = getattr(type(block), "dstep_block", None)
    if flag is False or isinstance(block, DStepBlock):
        return None
    pairs = []
    while True:
        i = len(pairs) + 1
        conv, bn = getattr(block, f"conv{i}", None), getattr(block, f"bn{i}", None)
        if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
            break
        pairs.append(ConvBN(conv, bn))
    ok = len(pairs) >= 2 and hasattr(block, "downsample") and all(
        c.groups == 1 and c.padding_mode == "zeros" and not isinstance(c.padding, str) for c, _ in pairs
    )
    if not ok:
        if flag:
            raise ValueError(f"{type(block).__name__} sets dstep_block but is not a conv1/bn1, conv2/bn2 "
                             "(groups 1, numeric padding) block with a downsample attribute")
        return None
    return pairs


# -- the block ----------------------------------------------------------------------------------------

class DStepBlock(nn.Module):
    """A residual block with the D-STEP gate between its first and second conv.

    Takes over the block's children under their own names (so weights keep
    their dense names) and adds ``policy``. Streaming state: the previous
    frame's merged features h_{t-1} and pooled masked input g_{t-1}.

    ``force_open`` keeps every tile and computes every channel (the
    equivalence tests use it); ``gating = False`` runs the original block
    even while streaming (the dense twin of a benchmark); ``path`` is "auto"
    (gathered execution at inference), "sparse" (always gather tiles) or
    "dense" (the masked dense formulation, the reference).
    """

    def __init__(self, block: nn.Module, *, tile: int, settings: DStepSettings = DStepSettings(),
                 target: float | None = None) -> None:
        super().__init__()
        pairs = residual_pairs(block)
        if pairs is None:
            raise ValueError(f"{type(block).__name__} is not a residual block D-STEP can gate")
        self.dense_type = type(block)
        for name, value in vars(block).items():  # plain attributes the original forward may read
            if not name.startswith("_") and name != "training":
                setattr(self, name, value)
        for name, child in block.named_children():
            self.add_module(name, child)
        self.depth = len(pairs)
        for i, (conv, _) in enumerate(pairs, 1):
            setattr(self, f"conv{i}", GatedConv.adopt(conv))
        self.tile = int(tile)
        self.settings = settings
        self.policy = DStepPolicy(pairs[0].conv.in_channels, pairs[0].conv.out_channels, settings, target=target)
        self.train(block.training)
        self.streaming = False
        self.gating = True
        self.force_open = False
        self.path = "auto"
        self.noise = 1.0  # Gumbel noise scale, set by the policy's schedule
        self.records: list[FrameFlops] = []  # per training frame, for the loss
        self._geometry: dict[tuple[int, int], TileGeometry] = {}
        self._crossover: dict[tuple[int, int, int], list[float]] = {}  # block input shape -> per conv
        self._folds = FoldCache()  # conv index or "downsample" -> FoldedConv
        self.reset_state()

    def extra_repr(self) -> str:
        return f"dstep: tile={self.tile}, convs={self.depth}, of {self.dense_type.__name__}"

    # -- protocol --------------------------------------------------------------------------------
    def reset_state(self) -> None:
        self.__dict__.update(  # plain attributes: skips nn.Module.__setattr__ (every block, every clip)
            resets=self.__dict__.get("resets", 0) + 1,  # a frame runner (policies.frame_step) starts a clip anew
            h_prev=None,  # (N, C, Hh, Wh) merged features of the previous frame
            _compact=None,  # list[Kept | None]: the same, per stream, as the inference path keeps it
            g_prev=None,  # (N, Cin) pooled masked input of the previous frame
        )

    def pairs(self) -> list[ConvBN]:
        return [ConvBN(getattr(self, f"conv{i}"), getattr(self, f"bn{i}")) for i in range(1, self.depth + 1)]

    def convs(self) -> list[GatedConv]:
        return [getattr(self, f"conv{i}") for i in range(1, self.depth + 1)]

    def geometry(self, in_hw: tuple[int, int]) -> TileGeometry:
        geo = self._geometry.get(in_hw)
        if geo is None:
            with torch.inference_mode(False):  # cached: a later training stream must be able to save its tensors
                geo = self._geometry[in_hw] = tile_geometry(self.convs(), self.tile, in_hw, self.policy)
        return geo

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, Cin, H, W) -> (N, Cout, Ho, Wo)
        if not (self.streaming and self.gating):
            return self.dense_type.forward(self, x)
        xs = self.shift(x) if isinstance(getattr(self, "shift", None), nn.Module) else x
        geo = self.geometry(tuple(xs.shape[-2:]))
        if torch.is_grad_enabled() or self.training or self.path == "dense":
            identity = x if self.downsample is None else self.downsample(x)
            S, T = self.decide(xs, geo)  # (N, Gh, Gw), (N, C, 3)
            branch = self._masked_dense(xs, S, T, geo)
        else:
            identity = self._identity(x)
            branch = self._infer(xs, geo)
        return F.relu(identity + branch)

    def _identity(self, x: torch.Tensor) -> torch.Tensor:
        """The shortcut at inference; a conv + BN downsample runs as one folded conv (BN on the gathered
        branch's channels_last layout costs up to 8× a plain BN at 28×28 on this CPU)."""
        ds = self.downsample
        if ds is None:
            return x
        if (isinstance(ds, nn.Sequential) and len(ds) == 2 and type(ds[0]) is nn.Conv2d and ds[0].groups == 1
                and type(ds[1]) is nn.BatchNorm2d and isinstance(ds[0].padding, tuple)):
            f = self._fold_pair("downsample", ds[0], ds[1])
            return F.conv2d(x, f.weight, f.bias, f.stride, f.padding, f.dilation)
        return ds(x)

    def _channel_logits(self, g: torch.Tensor) -> torch.Tensor:
        """The channel policy on g_t (N, Cin) and g_{t-1} (zeros at a clip's first frame); keeps g_t."""
        g_prev = self.g_prev if self.g_prev is not None and self.g_prev.shape == g.shape else torch.zeros_like(g)
        self.g_prev = g
        return self.policy.channel_logits(g, g_prev)  # (N, C, 3)

    def decide(self, xs: torch.Tensor, geo: TileGeometry) -> Decisions:
        """S_t (N, Gh, Gw) 0/1 and T_t (N, C, 3) one-hot, straight-through when autograd records.

        Also accounts the frame (Eq. 2) for MacCounter and, when training, for the loss.
        """
        n = xs.shape[0]
        c = self.conv1.out_channels
        if self.force_open:
            S = xs.new_ones(n, *geo.grid)
            T = F.one_hot(torch.full((n, c), COMPUTE, device=xs.device), 3).to(xs.dtype)
            policy_macs = 0.0
        else:
            sample, tau = self.training, self.settings.temperature
            sums = tile_sums(xs, geo.in_tile, geo.grid)  # (N, Cin, Gh, Gw)
            S = binary_st(self.policy.spatial_logits(sums / geo.in_area), noise=self.noise, tau=tau, sample=sample)
            g = (sums * S.unsqueeze(1)).sum((2, 3)) / (xs.shape[-2] * xs.shape[-1])  # (N, Cin): GAP of S ⊙ x
            T = categorical_st(self._channel_logits(g), noise=self.noise, tau=tau, sample=sample)
            policy_macs = geo.policy_macs
        self._account(S, T, geo, policy_macs)
        return Decisions(S, T)

    def _account(self, S: torch.Tensor, T: torch.Tensor, geo: TileGeometry, policy_macs: float) -> None:
        """Eq. 2 per stream for MacCounter, read in one sync; when autograd records, the same F
        (differentiable, straight-through) for the loss."""
        choice = T.sum(1) / T.shape[1]  # (N, 3): skip, reuse, compute fractions
        areas = active_areas(S, geo)
        convs = self.convs()
        for row in torch.stack([*areas, choice[:, SKIP], choice[:, REUSE], choice[:, COMPUTE]], 1).tolist():
            *area, skip, reuse, compute = row
            record_frame(convs, geo.levels, FrameChoice(area, skip, reuse, compute), policy_macs)
        if torch.is_grad_enabled() and T.requires_grad:
            batch = FrameChoice(areas, choice[:, SKIP], choice[:, REUSE], choice[:, COMPUTE])
            flops = frame_flops(batch, geo.levels, S.new_full((S.shape[0],), policy_macs))
            self.records.append(FrameFlops(flops=flops, density=areas[0]))

    def _masked_dense(self, xs: torch.Tensor, S: torch.Tensor, T: torch.Tensor, geo: TileGeometry) -> torch.Tensor:
        """Eq. 1 as masks on dense convs: what training differentiates, and the reference."""
        levels = geo.levels
        a = F.relu(self.bn1(self.conv1(xs)))  # (N, C, Hh, Wh)
        mixed = T[..., COMPUTE, None, None] * a
        if self.h_prev is not None and self.h_prev.shape == a.shape:
            mixed = mixed + T[..., REUSE, None, None] * self.h_prev
        h = upsample_tiles(S, self.tile, levels[0].out_hw) * mixed  # (N, C, Hh, Wh)
        self.h_prev, self._compact = h, None
        y = h
        for i, (conv, bn) in enumerate(self.pairs()[1:], 1):
            y = bn(conv(y))
            if i < self.depth - 1:
                y = F.relu(y)
        last = levels[-1]
        return upsample_tiles(tile_mask_at(S, last), last.tile, last.out_hw) * y

    @torch.no_grad()
    def _infer(self, xs: torch.Tensor, geo: TileGeometry) -> torch.Tensor:
        """One inference frame: rounded / argmax decisions, Eq. 2 statistics, then Eq. 1 executed with
        weights cut to the computed outputs and non-skipped inputs, on the active tiles only.

        Same numbers as ``decide`` + ``_masked_dense`` (the tests hold them to it),
        in few operations: at batch 1 a block is ~60 small ops besides its convs.
        The merged features h_t are kept compact (``Kept``): the computed channels,
        then the reused ones (``order``); reusing a channel that was zero at t-1
        reuses zero, so it is dropped like a skipped one.
        """
        from gatesearch.ops.channel_gather import tile_conv

        levels = geo.levels
        n, c = xs.shape[0], self.conv1.out_channels
        if self.force_open:
            active = torch.ones(n, *geo.grid, dtype=torch.bool, device=xs.device)
            choice = torch.full((n, c), COMPUTE, device=xs.device)
            policy_macs = 0.0
        else:
            sums = tile_sums(xs, geo.in_tile, geo.grid)  # (N, Cin, Gh, Gw)
            active = self.policy.spatial_logits(sums / geo.in_area) > 0  # (N, Gh, Gw): round(σ(·))
            g = (sums * active.unsqueeze(1)).sum((2, 3)).mul_(1.0 / (xs.shape[-2] * xs.shape[-1]))  # GAP(S ⊙ x)
            choice = self._channel_logits(g).argmax(-1)  # (N, C)
            policy_macs = geo.policy_macs
        order = torch.argsort(choice, dim=1, descending=True, stable=True)  # (N, C): compute, reuse, skip
        areas = active_areas(active, geo)
        counts = torch.stack([(choice == k).sum(1) for k in (SKIP, REUSE, COMPUTE)], 1)  # (N, 3)
        stats = torch.cat([torch.stack(areas, 1), counts.to(areas[0].dtype)], 1).tolist()  # one sync
        cross = self._crossovers(tuple(xs.shape[1:]), levels, stats)
        folded = [self._fold(i) for i in range(self.depth)]
        prev = self._compact if self._compact is not None and len(self._compact) == n else [None] * n
        convs = self.convs()
        outs, state = [], []
        for s in range(n):
            *area, skip, reuse, compute = stats[s]
            skip, reuse, compute = int(skip), int(reuse), int(compute)
            record_frame(convs, levels, FrameChoice(area, skip / c, reuse / c, compute / c), policy_macs)
            mask = active[s : s + 1]  # (1, Gh, Gw)
            parts, used = [], order[s, :compute]
            if compute:
                parts.append(tile_conv(xs[s : s + 1], folded[0], mask, tile=self.tile,
                                       out_idx=None if compute == c else used, density=area[0],
                                       crossover=cross[0], path=self.path).relu_())  # (1, compute, Hh, Wh)
            if reuse and prev[s] is not None:
                chans = order[s, compute : compute + reuse]
                where = torch.full((c,), -1, dtype=torch.long, device=xs.device)
                where[prev[s].channels] = torch.arange(prev[s].channels.numel(), device=xs.device)
                pos = where[chans]
                live = pos >= 0
                chans, pos = chans[live], pos[live]
                if chans.numel():
                    kept = prev[s].features.index_select(1, pos)
                    parts.append(kept.mul_(upsample_tiles(mask, self.tile, levels[0].out_hw)))
                    used = torch.cat([used, chans])
            y = parts[0] if len(parts) == 1 else torch.cat(parts, 1) if parts else xs.new_zeros(1, 0, *levels[0].out_hw)
            state.append(Kept(y, used) if used.numel() else None)
            full = used.numel() == c and compute == c
            for i in range(1, self.depth):
                y = tile_conv(y, folded[i], tile_mask_at(mask, levels[i]), tile=levels[i].tile,
                              in_idx=None if i > 1 or full else used, density=area[i], crossover=cross[i],
                              path=self.path)
                if i < self.depth - 1:
                    y = y.relu_()
            outs.append(y)
        self.h_prev, self._compact = None, state
        return outs[0] if n == 1 else torch.cat(outs, 0)

    def _crossovers(self, in_shape: tuple[int, int, int], levels, stats) -> list[float]:
        """Per conv, the active fraction below which gathering tiles is faster.

        Clear cases need no measurement: at most ``GATHER_ALWAYS`` active always
        gathers, at least ``DENSE_ALWAYS`` never does; in between the layer's
        crossover is measured once (``ops.channel_gather.layer_crossover``).
        """
        known = self._crossover.setdefault(in_shape, [None] * len(levels))
        out, shape = [], in_shape
        for i, level in enumerate(levels):
            conv = self.convs()[i]
            unclear = GATHER_ALWAYS < max(r[i] for r in stats) and min(r[i] for r in stats) < DENSE_ALWAYS
            if known[i] is None and unclear:
                from gatesearch.ops.channel_gather import layer_crossover

                known[i] = layer_crossover(self._fold(i), shape, level.tile)
            out.append(0.5 if known[i] is None else known[i])
            shape = (conv.out_channels, *level.out_hw)
        return out

    def _fold(self, i: int):
        """conv_i and bn_i folded into one conv (``FoldedConv``), cached until any of them changes."""
        return self._fold_pair(i, getattr(self, f"conv{i + 1}"), getattr(self, f"bn{i + 1}"))

    def _fold_pair(self, name: int | str, conv: nn.Conv2d, bn: nn.BatchNorm2d):
        from gatesearch.ops.channel_gather import FoldedConv

        return self._folds.get(name, FoldedConv.version_key(conv, bn), lambda: FoldedConv.fold(conv, bn))


def dstep_blocks(model: nn.Module) -> list[DStepBlock]:
    return [m for m in model.modules() if isinstance(m, DStepBlock)]


def convert_blocks(model: nn.Module, *, tile: int, settings: DStepSettings = DStepSettings(),
                   target: float | None = None) -> list[DStepBlock]:
    """Replace every residual block of ``model`` (see the protocol above) by a DStepBlock, in place."""
    blocks = []
    for parent in list(model.modules()):
        if isinstance(parent, DStepBlock):
            continue
        for name, child in list(parent.named_children()):
            if residual_pairs(child) is not None:
                gated = DStepBlock(child, tile=tile, settings=settings, target=target)
                setattr(parent, name, gated)
                blocks.append(gated)
    return blocks


__all__ = ["ConvBN", "Decisions", "DStepBlock", "Kept", "convert_blocks", "dstep_blocks", "residual_pairs"]
