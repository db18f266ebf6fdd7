"""The D-STEP gated residual block: p×p spatial tiles and skip / reuse / compute channels.

D-STEP (Raviv et al.), Section 3.1. Between the first and second conv of a
residual block, two small policy networks look at the block input x_t:

* spatial policy: x_t average-pooled into tiles (one tile per p×p tile of the
  first conv's output), one 3×3 conv to a single map, binarised (Gumbel-sigmoid
  with straight-through gradients in training, rounding at inference): S_t;
* temporal channel policy: the S-masked x_t and x_{t-1}, global-average
  pooled, through a two-layer MLP, one of {skip, reuse, compute} per channel of
  the first conv's output (Gumbel-softmax, hard forward / relaxed backward): T_t.

Eq. 1 then merges h_t = S_t ⊙ [compute: relu(bn1(conv1 x_t)); reuse: h_{t-1}; skip: 0],
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

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import FrameAverages

SKIP, REUSE, COMPUTE = 0, 1, 2  # channel decisions (last axis of T)
GATHER_ALWAYS, DENSE_ALWAYS = 0.1, 0.95  # active fractions with an obvious kernel (no calibration needed)


@dataclass(frozen=True, kw_only=True)
class DStepSettings:
    """Constants of the gate and its loss (D-STEP, Eq. 3); D and p are searched, these are not.

    Scaled for CPU trials of a few epochs: the paper warms up K = 10 of 50 epochs.
    """

    temperature: float = 2 / 3  # τ of both relaxations (only shapes the backward pass)
    hidden_min: int = 16  # MLP hidden width: max(hidden_min, C_in // 2)
    spatial_init: float | None = None  # spatial logit bias at start; None: logit(D), so tiles start active at
    #                                   the target rate ("the spatial sparsity has to be properly initialized")
    compute_init: float = 3.0  # "compute" logit bias at start (skip, reuse start at 0)
    bias_gain: float = 100.0  # logit biases stored / gain: under Adam they move gain× faster than weights,
    #                          so decisions can shift within the few dozen steps of a CPU trial
    warmup_epochs: int = 1  # K: λ(e) = 0 for e < K (task and bound losses only)
    lambda_alpha: float = 4.0  # α of λ(e) = α·exp(β·e)
    lambda_beta: float = 0.3  # β of λ(e) (not the joint-space β of the Gumbel gate)
    gamma: float = 2.0  # γ: weight of L_bound
    bound_start: float = 0.1  # L_bound: each block's spatial density is held to [D·(1-r), D + (1-D)·r], r growing
    bound_end: float = 0.5  # linearly from bound_start to bound_end over training; r < 1 keeps any block from
    #                         collapsing to all-off or all-on tiles (which would be layer skipping, not tiles)
    freeze_bn: float | None = 0.8  # from this fraction of training on, batch norm runs on its running statistics,
    #                               so training sees the FLOPs that inference will spend (decisions near the
    #                               threshold flip between batch and running statistics); None: never
    control_gain: float = 1.0  # integral control of the operating point: after each step every block's logit
    #                            offset moves by -gain·(F/F_S - D) of the batch (0: Eq. 3 alone; see dstep.py)
    noise_off: float | None = 0.6  # Gumbel noise scale falls linearly from 1 to 0 at this fraction of training,
    #                                so the rest trains the decisions inference makes (rounding / argmax) while
    #                                the learning rate can still correct the FLOPs; None: noise throughout


DEFAULTS = DStepSettings()


# -- the residual-block protocol --------------------------------------------------------------------

def residual_pairs(block: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]] | None:
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
        pairs.append((conv, bn))
    ok = len(pairs) >= 2 and hasattr(block, "downsample") and all(
        c.groups == 1 and c.padding_mode == "zeros" and not isinstance(c.padding, str) for c, _ in pairs
    )
    if not ok:
        if flag:
            raise ValueError(f"{type(block).__name__} sets dstep_block but is not a conv1/bn1, conv2/bn2 "
                             "(groups 1, numeric padding) block with a downsample attribute")
        return None
    return pairs


# -- accounting -----------------------------------------------------------------------------------

class GatedConv(FrameAverages, nn.Conv2d):
    """A block conv whose work D-STEP decides; reports it in MacCounter's protocol.

    ``density`` is the fraction of the dense conv's MACs spent (channels times
    tiles, Eq. 2) and ``gate_macs`` the policy networks' own cost (charged to
    ``conv1``), both averaged over streamed frames. It keeps the conv's
    parameters, so state-dict names stay the dense network's.
    """

    @classmethod
    def adopt(cls, conv: nn.Conv2d) -> GatedConv:
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                  dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                  padding_mode=conv.padding_mode, device="meta")
        new.weight = conv.weight
        new.bias = conv.bias
        new.train(conv.training)
        new.reset_stats()
        return new

    def reset_stats(self) -> None:
        super().reset_stats()
        self.dense_macs = 0.0  # MACs of the dense conv per frame, at the size last seen
        self.decision_sum = [0.0, 0.0, 0.0, 0.0]  # conv1 only: Σ over frames of (tiles, skip, reuse, compute)

    def record(self, share: float, gate_macs: float, dense_macs: float) -> None:
        """One frame of one stream: the fraction of the dense MACs spent, the gate's own MACs."""
        self.frames += 1
        self.density_sum += share
        self.gate_macs_sum += gate_macs
        self.dense_macs = dense_macs

    def record_decisions(self, tiles: float, skip: float, reuse: float, compute: float) -> None:
        for i, value in enumerate((tiles, skip, reuse, compute)):
            self.decision_sum[i] += value

    @property
    def decisions(self) -> dict[str, float]:
        """Mean active-tile fraction and channel-choice fractions over the frames streamed (conv1)."""
        mean = [v / max(1, self.frames) for v in self.decision_sum]
        return dict(zip(("tiles", "skip", "reuse", "compute"), mean))



# -- the policy networks ------------------------------------------------------------------------------

class DStepPolicy(nn.Module):
    """Spatial 3×3 conv and temporal-channel MLP of one block (D-STEP, Section 3.1).

    Kept as bare parameters (no ``Conv2d`` / ``Linear`` children) so nothing
    mistakes them for backbone layers. Logit biases are stored divided by
    ``bias_gain`` (see ``DStepSettings``).
    """

    def __init__(self, c_in: int, channels: int, settings: DStepSettings = DEFAULTS, *,
                 target: float | None = None) -> None:
        super().__init__()
        self.gain = settings.bias_gain
        self.channels = channels
        hidden = max(settings.hidden_min, c_in // 2)
        self.spatial_weight = nn.Parameter(_uniform(1, c_in, 3, 3))
        init = settings.spatial_init
        if init is None:
            d = min(0.95, max(0.05, 1.0 if target is None else target))
            init = math.log(d / (1 - d))
        self.spatial_bias = nn.Parameter(torch.full((1,), init / self.gain))
        self.fc1_weight = nn.Parameter(_uniform(hidden, 2 * c_in))
        self.fc1_bias = nn.Parameter(_uniform(hidden, fan_in=2 * c_in))
        self.fc2_weight = nn.Parameter(_uniform(3 * channels, hidden))
        bias = torch.zeros(channels, 3)
        bias[:, COMPUTE] = settings.compute_init / self.gain
        self.fc2_bias = nn.Parameter(bias.flatten())
        self.register_buffer("offset", torch.zeros(1))  # added to the spatial and "compute" logits (control)

    def spatial_logits(self, tile_means: torch.Tensor) -> torch.Tensor:  # (N, Cin, Gh, Gw) -> (N, Gh, Gw)
        """The 3×3 conv to one map, as one GEMM over channels (N, 9, G) and a fold of the nine taps:
        a conv with a single output channel is a slow case for CPU conv kernels (3-10×)."""
        n, c, gh, gw = tile_means.shape
        taps = torch.matmul(self.spatial_weight.view(c, 9).t(), tile_means.reshape(n, c, gh * gw))  # (N, 9, G)
        out = F.fold(taps.flip(1), (gh, gw), 3, padding=1)  # (N, 1, Gh, Gw): Σ_k w_k · m[shifted by k]
        return out[:, 0] + (self.spatial_bias * self.gain + self.offset)

    def channel_logits(self, g: torch.Tensor, g_prev: torch.Tensor) -> torch.Tensor:  # (N, Cin) ×2 -> (N, C, 3)
        hidden = F.relu(F.linear(torch.cat([g, g_prev], 1), self.fc1_weight, self.fc1_bias))  # (N, hidden)
        shift = self.offset * F.one_hot(torch.tensor(COMPUTE), 3).to(self.offset.dtype)  # (3,): compute only
        bias = (self.fc2_bias * self.gain).view(self.channels, 3) + shift
        return F.linear(hidden, self.fc2_weight, bias.flatten()).view(-1, self.channels, 3)

    def macs(self, c_in: int, in_hw: tuple[int, int], grid: tuple[int, int]) -> float:
        """Per frame: tile sums (one add per input value), the 3×3 conv and the masked GAP on the
        tile grid, and the MLP."""
        tiles = grid[0] * grid[1]
        hidden = self.fc1_weight.shape[0]
        return float(c_in * in_hw[0] * in_hw[1] + c_in * 9 * tiles + c_in * tiles
                     + 2 * c_in * hidden + hidden * 3 * self.channels)


def _uniform(*shape: int, fan_in: int | None = None) -> torch.Tensor:
    """PyTorch's default Conv2d / Linear initialisation: U(±1/sqrt(fan_in))."""
    fan_in = fan_in or math.prod(shape[1:])
    bound = 1 / math.sqrt(fan_in)
    return torch.empty(*shape).uniform_(-bound, bound)


def binary_st(logits: torch.Tensor, *, noise: float, tau: float, sample: bool) -> torch.Tensor:
    """Gumbel-sigmoid: 0/1 values, the relaxation's gradient (straight-through). No sampling: round(σ)."""
    if sample and noise > 0:
        u = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
        logits = logits + noise * (torch.log(u) - torch.log1p(-u))  # logistic = difference of two Gumbels
    hard = (logits > 0).to(logits.dtype)
    if not torch.is_grad_enabled():
        return hard
    soft = torch.sigmoid(logits / tau)
    return hard + (soft - soft.detach())


def categorical_st(logits: torch.Tensor, *, noise: float, tau: float, sample: bool) -> torch.Tensor:
    """Gumbel-softmax over the last axis: one-hot forward, relaxed backward. No sampling: argmax."""
    if sample and noise > 0:
        u = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
        logits = logits - noise * torch.log(-torch.log(u))
    hard = F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    if not torch.is_grad_enabled():
        return hard
    soft = torch.softmax(logits / tau, -1)
    return hard + (soft - soft.detach())


# -- geometry ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Level:
    """One conv of the branch: its output size, tile size there and the tile grid map from S."""

    out_hw: tuple[int, int]
    tile: int  # q: output tile side at this resolution
    rows: torch.Tensor  # (Gq_h,) row of S each output tile takes its decision from
    cols: torch.Tensor  # (Gq_w,)
    area: torch.Tensor  # (Gq_h, Gq_w) fraction of the output each tile covers
    dense_macs: float  # the dense conv's MACs per frame


@dataclass(frozen=True)
class _Geometry:
    in_hw: tuple[int, int]
    grid: tuple[int, int]  # (Gh, Gw) = ceil(conv1 output / p)
    in_tile: int  # p·stride(conv1): tile side on the block input
    in_area: torch.Tensor  # (Gh, Gw) input pixels per tile (edge tiles are partial)
    levels: tuple[_Level, ...]  # conv1, conv2, ...
    policy_macs: float


def _conv_out(conv: nn.Conv2d, hw: tuple[int, int]) -> tuple[int, int]:
    return tuple(
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, p, d, k, s in zip(hw, conv.padding, conv.dilation, conv.kernel_size, conv.stride)
    )


def _edge_sizes(length: int, tile: int) -> torch.Tensor:
    count = -(-length // tile)
    sizes = torch.full((count,), float(tile))
    sizes[-1] = length - (count - 1) * tile
    return sizes


def tile_mask_at(S: torch.Tensor, level: _Level) -> torch.Tensor:
    """S on the conv1-output tile grid (N, Gh, Gw) -> the same decisions on this conv's output tiles."""
    if S.shape[-2] == level.rows.numel() and S.shape[-1] == level.cols.numel():
        return S
    return S.index_select(1, level.rows).index_select(2, level.cols)


def upsample_tiles(S: torch.Tensor, tile: int, out_hw: tuple[int, int]) -> torch.Tensor:
    """(N, Gh, Gw) -> (N, 1, Ho, Wo): nearest upsample by the tile side, cropped (differentiable)."""
    m = S.unsqueeze(1)
    if tile > 1:
        m = m.repeat_interleave(tile, dim=2).repeat_interleave(tile, dim=3)
    return m[..., : out_hw[0], : out_hw[1]]


def tile_sums(x: torch.Tensor, tile: int, grid: tuple[int, int]) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, Gh, Gw): sum of x over each input tile (edge tiles partial, zero-padded).

    Rows are summed as a middle-axis reduction and columns by strided adds,
    which is 2-5× faster than ``avg_pool2d`` for these small windows on CPU.
    """
    if tile == 1:
        return x
    n, c, h, w = x.shape
    hp, wp = grid[0] * tile, grid[1] * tile
    if (h, w) != (hp, wp):
        x = F.pad(x[..., :hp, :wp], (0, max(0, wp - w), 0, max(0, hp - h)))
    rows = x.reshape(n, c, grid[0], tile, wp).sum(3)  # (N, C, Gh, W)
    cols = rows[..., 0::tile]
    for j in range(1, tile):
        cols = cols + rows[..., j::tile]
    return cols  # (N, C, Gh, Gw)


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

    def __init__(self, block: nn.Module, *, tile: int, settings: DStepSettings = DEFAULTS,
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
        self.policy = DStepPolicy(pairs[0][0].in_channels, pairs[0][0].out_channels, settings, target=target)
        self.train(block.training)
        self.streaming = False
        self.gating = True
        self.force_open = False
        self.path = "auto"
        self.noise = 1.0  # Gumbel noise scale, set by the policy's schedule
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []  # per frame: (F (N,), spatial density (N,))
        self._geometry: dict[tuple[int, int], _Geometry] = {}
        self._crossover: dict[tuple[int, int, int], list[float]] = {}  # block input shape -> per conv
        self._folded: dict[int | str, tuple] = {}  # conv index or "downsample" -> (version key, FoldedConv)
        self.reset_state()

    def extra_repr(self) -> str:
        return f"dstep: tile={self.tile}, convs={self.depth}, of {self.dense_type.__name__}"

    # -- protocol --------------------------------------------------------------------------------
    def reset_state(self) -> None:
        self.h_prev: torch.Tensor | None = None  # (N, C, Hh, Wh) merged features of the previous frame
        self._compact: list | None = None  # the same, as the inference path keeps it (see _infer)
        self.g_prev: torch.Tensor | None = None  # (N, Cin) pooled masked input of the previous frame

    def pairs(self) -> list[tuple[GatedConv, nn.BatchNorm2d]]:
        return [(getattr(self, f"conv{i}"), getattr(self, f"bn{i}")) for i in range(1, self.depth + 1)]

    def convs(self) -> list[GatedConv]:
        return [getattr(self, f"conv{i}") for i in range(1, self.depth + 1)]

    def dense_macs(self, in_hw: tuple[int, int]) -> float:
        """F_S of this block: the dense MACs of its gated convs per frame."""
        return sum(level.dense_macs for level in self.geometry(in_hw).levels)

    def geometry(self, in_hw: tuple[int, int]) -> _Geometry:
        geo = self._geometry.get(in_hw)
        if geo is None:
            geo = self._geometry[in_hw] = self._make_geometry(in_hw)
        return geo

    def _make_geometry(self, in_hw: tuple[int, int]) -> _Geometry:
        p = self.tile
        convs = self.convs()
        h_hw = _conv_out(convs[0], in_hw)
        grid = (-(-h_hw[0] // p), -(-h_hw[1] // p))
        s1 = convs[0].stride[0]
        in_tile = p * s1
        hp, wp = min(in_hw[0], grid[0] * in_tile), min(in_hw[1], grid[1] * in_tile)
        in_area = (_edge_sizes(hp, in_tile)[:, None] * _edge_sizes(wp, in_tile)[None, :]).reshape(grid)
        levels, hw, stride = [], in_hw, 1
        for i, conv in enumerate(convs):
            out_hw = _conv_out(conv, hw)
            if i > 0:
                stride *= conv.stride[0]
            q = max(p // stride, 1)
            gq = (-(-out_hw[0] // q), -(-out_hw[1] // q))
            rows = ((torch.arange(gq[0]) * q * stride) // p).clamp_(max=grid[0] - 1)
            cols = ((torch.arange(gq[1]) * q * stride) // p).clamp_(max=grid[1] - 1)
            area = _edge_sizes(out_hw[0], q)[:, None] * _edge_sizes(out_hw[1], q)[None, :] / (out_hw[0] * out_hw[1])
            kh, kw = conv.kernel_size
            dense = float(conv.out_channels * conv.in_channels * kh * kw * out_hw[0] * out_hw[1])
            levels.append(_Level(out_hw=out_hw, tile=q, rows=rows, cols=cols, area=area, dense_macs=dense))
            hw = out_hw
        policy_macs = self.policy.macs(convs[0].in_channels, in_hw, grid)
        return _Geometry(in_hw=in_hw, grid=grid, in_tile=in_tile, in_area=in_area, levels=tuple(levels),
                         policy_macs=policy_macs)

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

    def decide(self, xs: torch.Tensor, geo: _Geometry) -> tuple[torch.Tensor, torch.Tensor]:
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
            g_prev = self.g_prev if self.g_prev is not None and self.g_prev.shape == g.shape else torch.zeros_like(g)
            T = categorical_st(self.policy.channel_logits(g, g_prev), noise=self.noise, tau=tau, sample=sample)
            self.g_prev = g
            policy_macs = geo.policy_macs
        self._account(S, T, geo, policy_macs)
        return S, T

    def _account(self, S: torch.Tensor, T: torch.Tensor, geo: _Geometry, policy_macs: float) -> None:
        """Eq. 2 per stream: conv1 computes the compute channels on active tiles, conv2 reads the
        non-skipped channels on active tiles, later convs run on active tiles.

        Statistics go to the convs (MacCounter) as floats, read in one sync; when
        autograd records, the same F (differentiable, straight-through) goes to the loss.
        """
        c = T.shape[1]
        choice = T.sum(1) / c  # (N, 3): skip, reuse, compute fractions
        areas = []  # (N,) each: fraction of each conv's outputs on active tiles
        for level in geo.levels:
            same = areas and level.out_hw == geo.levels[0].out_hw and level.tile == self.tile
            areas.append(areas[0] if same else (tile_mask_at(S, level) * level.area).sum((1, 2)))
        convs = self.convs()
        for row in torch.stack([*areas, choice[:, SKIP], choice[:, REUSE], choice[:, COMPUTE]], 1).tolist():
            *area, skip, reuse, compute = row
            for i, (level, conv) in enumerate(zip(geo.levels, convs)):
                share = area[i] * (compute if i == 0 else 1.0 - skip if i == 1 else 1.0)
                conv.record(share, policy_macs if i == 0 else 0.0, level.dense_macs)
            convs[0].record_decisions(area[0], skip, reuse, compute)
        if torch.is_grad_enabled() and T.requires_grad:
            flops = S.new_full((S.shape[0],), policy_macs)
            for i, (level, area) in enumerate(zip(geo.levels, areas)):
                chans = choice[:, COMPUTE] if i == 0 else 1.0 - choice[:, SKIP] if i == 1 else 1.0
                flops = flops + area * chans * level.dense_macs
            self.records.append((flops, areas[0]))  # F (N,) and the spatial density (N,) of this frame

    def _masked_dense(self, xs: torch.Tensor, S: torch.Tensor, T: torch.Tensor, geo: _Geometry) -> torch.Tensor:
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
    def _infer(self, xs: torch.Tensor, geo: _Geometry) -> torch.Tensor:
        """One inference frame: rounded / argmax decisions, Eq. 2 statistics, then Eq. 1 executed with
        weights cut to the computed outputs and non-skipped inputs, on the active tiles only.

        Same numbers as ``decide`` + ``_masked_dense`` (the tests hold them to it),
        in few operations: at batch 1 a block is ~60 small ops besides its convs.
        The merged features h_t are kept compact: the computed channels, then
        the reused ones (``order``); reusing a channel that was zero at t-1 reuses
        zero, so it is dropped like a skipped one.
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
            g_prev = self.g_prev if self.g_prev is not None and self.g_prev.shape == g.shape else torch.zeros_like(g)
            choice = self.policy.channel_logits(g, g_prev).argmax(-1)  # (N, C)
            self.g_prev = g
            policy_macs = geo.policy_macs
        order = torch.argsort(choice, dim=1, descending=True, stable=True)  # (N, C): compute, reuse, skip
        areas = [(active * levels[0].area).sum((1, 2))]
        for level in levels[1:]:
            same = level.out_hw == levels[0].out_hw and level.tile == self.tile
            areas.append(areas[0] if same else (tile_mask_at(active, level) * level.area).sum((1, 2)))
        counts = torch.stack([(choice == k).sum(1) for k in (SKIP, REUSE, COMPUTE)], 1)  # (N, 3)
        stats = torch.cat([torch.stack(areas, 1), counts.to(areas[0].dtype)], 1).tolist()  # one sync
        cross = self._crossovers(tuple(xs.shape[1:]), levels, stats)
        folded = [self._fold(i) for i in range(self.depth)]
        prev = self._compact if self._compact is not None and len(self._compact) == n else [None] * n
        outs, state = [], []
        for s in range(n):
            *area, skip, reuse, compute = stats[s]
            skip, reuse, compute = int(skip), int(reuse), int(compute)
            self._record(area, skip, reuse, compute, policy_macs, levels)
            mask = active[s : s + 1]  # (1, Gh, Gw)
            parts, used = [], order[s, :compute]
            if compute:
                parts.append(tile_conv(xs[s : s + 1], folded[0], mask, tile=self.tile,
                                       out_idx=None if compute == c else used, density=area[0],
                                       crossover=cross[0], path=self.path).relu_())  # (1, compute, Hh, Wh)
            if reuse and prev[s] is not None:
                chans = order[s, compute : compute + reuse]
                y_prev, kept_order = prev[s]
                where = torch.full((c,), -1, dtype=torch.long, device=xs.device)
                where[kept_order] = torch.arange(kept_order.numel(), device=xs.device)
                pos = where[chans]
                live = pos >= 0
                chans, pos = chans[live], pos[live]
                if chans.numel():
                    kept = y_prev.index_select(1, pos)
                    parts.append(kept.mul_(upsample_tiles(mask, self.tile, levels[0].out_hw)))
                    used = torch.cat([used, chans])
            y = parts[0] if len(parts) == 1 else torch.cat(parts, 1) if parts else xs.new_zeros(1, 0, *levels[0].out_hw)
            state.append((y, used) if used.numel() else None)
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

    def _record(self, area: list[float], skip: int, reuse: int, compute: int, policy_macs: float, levels) -> None:
        """Eq. 2 statistics of one stream's frame for MacCounter (inference path)."""
        c = skip + reuse + compute
        for i, (level, conv) in enumerate(zip(levels, self.convs())):
            share = area[i] * (compute / c if i == 0 else (c - skip) / c if i == 1 else 1.0)
            conv.record(share, policy_macs if i == 0 else 0.0, level.dense_macs)
        self.conv1.record_decisions(area[0], skip / c, reuse / c, compute / c)

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

    def _fold_pair(self, name, conv: nn.Conv2d, bn: nn.BatchNorm2d):
        from gatesearch.ops.channel_gather import FoldedConv

        key = FoldedConv.version_key(conv, bn)
        hit = self._folded.get(name)
        if hit is None or hit[0] != key:
            hit = self._folded[name] = (key, FoldedConv.fold(conv, bn))
        return hit[1]


def dstep_blocks(model: nn.Module) -> list[DStepBlock]:
    return [m for m in model.modules() if isinstance(m, DStepBlock)]


def convert_blocks(model: nn.Module, *, tile: int, settings: DStepSettings = DEFAULTS,
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


__all__ = [
    "COMPUTE", "DEFAULTS", "REUSE", "SKIP", "DStepBlock", "DStepPolicy", "DStepSettings", "GatedConv",
    "binary_st", "categorical_st", "convert_blocks", "dstep_blocks", "residual_pairs", "tile_sums",
]
