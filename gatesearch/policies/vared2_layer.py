"""VA-RED² dynamic convolution: one conv layer, its soft modulation gate and its cheap rebuilds.

VA-RED² (Pan et al., ICLR 2021; thesis Chapter 3). For each input, a soft
modulation gate (Eq. 3.4) scores S alternatives per dimension:

* temporal (3D convs): temporal stride × R = 2^j, j < S; the skipped time steps
  are rebuilt from the computed ones by a cheap linear op Φ^t (Eq. 3.1): here a
  per-channel affine map of the computed step before them, one per offset;
* channel: only the first k = C_out·(1/2)^i output channels are computed, the
  rest rebuilt by a cheap linear op Φ^c (Eq. 3.3): here a per-channel affine
  map of computed channel ``m mod k`` (a 1×1 depthwise "ghost" conv).

Training (``path="soft"``) computes the dense output once with the big kernel
and takes each alternative as a slice of it (weight sharing, Eq. A.1), so the
cost does not grow with S; the output is the V-weighted sum of alternatives
(Eq. 3.5). Inference (``path="hard"``) runs only what the gate selected: the
largest alternative with a non-zero weight, as a conv with a sliced weight and
a larger temporal stride (Eq. A.2), and derives every other selected
alternative from it by slicing. The two paths give the same output.

Accounting (``objectives.macs``): ``density`` is the layer's cost over its
dense cost, the cheap rebuilds and the V-weighting included; ``gate_macs`` is
the gate's own cost per video frame. A traced pass (fvcore) runs the dense
conv, so MAC counting sees the ungated network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, kw_only=True)
class GateSettings:
    """Constants of the gate and the rebuilds; not searched (S and λ_e are)."""

    hidden: int = 16  # D_h of Eq. 3.4
    time_bins: int = 2  # G pools space and keeps time in this many bins (the thesis keeps all T; a fixed
    #                    number of bins lets one gate serve any window length, deep layers with T=1 included)
    init_bias: float = 0.5  # β_p at init: every alternative starts at V ≈ tanh(0.5) ≈ 0.46
    init_gain: float = 0.1  # scale of the last FC's initial weights: gates start nearly input-independent


DEFAULTS = GateSettings()


class SoftModulationGate(nn.Module):
    """p_l of Eq. 3.4: V = max(tanh(FC2(tanh(BN(FC1(G(X))))) + β_p), 0) ∈ [0, 1)^{S_t + S_c}."""

    def __init__(self, cin: int, outputs: int, *, time_bins: int, settings: GateSettings = DEFAULTS) -> None:
        super().__init__()
        self.time_bins = time_bins
        self.fc1 = nn.Linear(cin * time_bins, settings.hidden, bias=False)
        self.bn = nn.BatchNorm1d(settings.hidden)
        self.fc2 = nn.Linear(settings.hidden, outputs)
        with torch.no_grad():
            self.fc2.weight.mul_(settings.init_gain)
            self.fc2.bias.fill_(settings.init_bias)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """G: (N, Ci, T, H, W) -> (N, Ci·bins), or (N, Ci, H, W) -> (N, Ci)."""
        g = x.mean((-2, -1))  # (N, Ci, T) or (N, Ci)
        if x.dim() == 5:
            g = F.adaptive_avg_pool1d(g, self.time_bins).flatten(1)
        return g

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # -> V (N, outputs)
        h = self.fc1(self.pool(x))
        bn = self.bn
        # BN needs two samples to take batch statistics; a lone clip in training uses the running ones
        train_stats = bn.training and h.shape[0] > 1
        h = F.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias, train_stats, bn.momentum, bn.eps)
        return torch.relu(torch.tanh(self.fc2(torch.tanh(h))))

    def macs(self, in_shape: tuple[int, ...]) -> float:
        """Per sample: the pooling adds, then the two FCs."""
        return float(math.prod(in_shape) + self.fc1.in_features * self.fc1.out_features
                     + self.fc2.in_features * self.fc2.out_features)


class ChannelRebuild(nn.Module):
    """Φ^c (Eq. 3.3): the C_out − k channels not computed, each an affine map of computed channel m mod k."""

    def __init__(self, keep: int, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels - keep))
        self.bias = nn.Parameter(torch.zeros(channels - keep))
        self.register_buffer("source", torch.arange(channels - keep) % keep, persistent=False)

    def forward(self, head: torch.Tensor) -> torch.Tensor:  # (N, k, ...) -> (N, C_out, ...)
        shape = (1, -1) + (1,) * (head.dim() - 2)
        rest = head.index_select(1, self.source) * self.weight.view(shape) + self.bias.view(shape)
        return torch.cat([head, rest], 1)


class TemporalRebuild(nn.Module):
    """Φ^t (Eq. 3.1): step iR + j (0 < j < R) is an affine map (one per j, per channel) of computed step i."""

    def __init__(self, stride: int, channels: int) -> None:
        super().__init__()
        self.stride = stride
        self.weight = nn.Parameter(torch.ones(stride - 1, channels))
        self.bias = nn.Parameter(torch.zeros(stride - 1, channels))

    def forward(self, z: torch.Tensor, steps: int) -> torch.Tensor:  # (N, C, T', H, W) -> (N, C, steps, H, W)
        parts = [z] + [z * w.view(1, -1, 1, 1, 1) + b.view(1, -1, 1, 1, 1) for w, b in zip(self.weight, self.bias)]
        return torch.stack(parts, 3).flatten(2, 3)[:, :, :steps]  # (N, C, T'·R, H, W), cropped


def channel_counts(conv: nn.Module, space_size: int) -> tuple[int, ...]:
    """k_i = C_out·(1/2)^i, rounded up to whole groups of a grouped conv."""
    co, g = conv.out_channels, conv.groups
    unit = co // g if g > 1 else 1
    return tuple(max(unit, math.ceil(co / 2**i / unit) * unit) for i in range(space_size))


def first_active(v: torch.Tensor) -> list[int]:
    """Per sample, the index of the first non-zero weight (the largest alternative), or S when none."""
    active = v > 0  # (N, S)
    first = torch.where(active.any(1), active.int().argmax(1), torch.full_like(active[:, 0], v.shape[1], dtype=torch.long))
    return first.tolist()


class DynamicConv(nn.Module):
    """A ``Conv2d`` (channel-wise only) or ``Conv3d`` (temporal- and channel-wise) under a VA-RED² gate.

    ``force_full`` makes the layer compute everything (R = 1, r = 1): exactly the
    dense conv. ``path``: "auto" (soft in training, hard otherwise), "soft" or "hard".
    """

    def __init__(self, conv: nn.Conv2d | nn.Conv3d, *, space_size: int, settings: GateSettings = DEFAULTS,
                 name: str = "") -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"vared2: layer {name or conv} needs numeric zero padding")
        self.conv = conv
        self.name = name
        self.temporal = isinstance(conv, nn.Conv3d)
        self.keep = channel_counts(conv, space_size)  # channels computed by each channel alternative
        self.strides = tuple(2**j for j in range(space_size)) if self.temporal else (1,)  # R of each temporal one
        n_t = len(self.strides) if self.temporal else 0  # a 2D layer has no temporal scores
        self.gate = SoftModulationGate(conv.in_channels, n_t + len(self.keep),
                                       time_bins=settings.time_bins if self.temporal else 1, settings=settings)
        self.phi_c = nn.ModuleList([ChannelRebuild(k, conv.out_channels) for k in self.keep[1:]])
        self.phi_t = nn.ModuleList([TemporalRebuild(r, conv.out_channels) for r in self.strides[1:]])
        self.force_full = False
        self.path = "auto"
        if self.temporal:
            self.frames_per_clip: int | None = None  # video frames per sample, told by ClipModel (clip_length)
        self.records: list[tuple[float, torch.Tensor]] = []  # (dense MACs per sample, cost ratio (N,)) for L_e
        self.reset_stats()

    # -- accounting ---------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self.cost_sum = 0.0  # MACs spent by the hard path, rebuilds included
        self.dense_sum = 0.0  # MACs the dense layer would have spent on the same samples
        self.gate_sum = 0.0
        self.frames = 0  # video frames those samples cover

    @property
    def density(self) -> float:
        return self.cost_sum / self.dense_sum if self.dense_sum else 1.0

    @property
    def gate_macs(self) -> float:
        return self.gate_sum / self.frames if self.frames else 0.0

    def _record(self, n: int, cost: float, dense: float, gate: float, x: torch.Tensor) -> None:
        frames = (self.frames_per_clip or x.shape[2]) if self.temporal else 1
        self.cost_sum += n * cost
        self.dense_sum += n * dense
        self.gate_sum += n * gate
        self.frames += n * frames

    # -- geometry -----------------------------------------------------------------------------
    def out_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        """Dense output size per sample without channels: (To, Ho, Wo) or (Ho, Wo)."""
        c = self.conv
        return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                     for n, p, d, k, s in zip(x.shape[2:], c.padding, c.dilation, c.kernel_size, c.stride))

    def conv_macs(self, out: tuple[int, ...], keep: int) -> float:
        """MACs per sample of ``keep`` output channels over ``out`` positions."""
        c = self.conv
        return float(keep * (c.in_channels // c.groups) * math.prod(c.kernel_size) * math.prod(out))

    def head_conv(self, x: torch.Tensor, keep: int, stride: int) -> torch.Tensor:
        """The first ``keep`` output channels at every ``stride``-th time step, and nothing else (Eq. A.1)."""
        c = self.conv
        weight, bias = c.weight[:keep], None if c.bias is None else c.bias[:keep]
        groups = c.groups
        if groups > 1 and keep < c.out_channels:  # a grouped conv: the groups of the kept channels only
            groups = keep // (c.out_channels // c.groups)
            x = x[:, : groups * (c.in_channels // c.groups)]
        if self.temporal:
            return F.conv3d(x, weight, bias, (c.stride[0] * stride, *c.stride[1:]), c.padding, c.dilation, groups)
        return F.conv2d(x, weight, bias, c.stride, c.padding, c.dilation, groups)

    # -- alternatives (Eq. 3.1, 3.3, A.1) ------------------------------------------------------------
    def channel_alt(self, y: torch.Tensor, i: int) -> torch.Tensor:
        """f^c(X, r = (1/2)^i) from features holding at least its k_i channels: [Y', Φ^c(Y')]."""
        return y if i == 0 else self.phi_c[i - 1](y[:, : self.keep[i]])

    def temporal_alt(self, z: torch.Tensor, j: int, steps: int) -> torch.Tensor:
        """f^t(·, R = 2^j) from features already at stride R: [Y'[i], Φ^t(Y'[i]) ...] interleaved."""
        return z if j == 0 else self.phi_t[j - 1](z, steps)

    def scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(V_t (N, S_t), V_c (N, S_c)); a 2D layer's V_t is a fixed 1."""
        if self.force_full:
            v_t = x.new_zeros(x.shape[0], len(self.strides))
            v_c = x.new_zeros(x.shape[0], len(self.keep))
            v_t[:, 0] = v_c[:, 0] = 1.0
            return v_t, v_c
        v = self.gate(x)
        if not self.temporal:
            return v.new_ones(v.shape[0], 1), v
        return v[:, : len(self.strides)], v[:, len(self.strides) :]

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, Ci, T, H, W) -> (N, Co, To, Ho, Wo), or 2D
        if torch.jit.is_tracing():  # MAC counting: the dense layer
            return self.conv(x)
        v_t, v_c = self.scores(x)
        if self.path == "soft" or (self.path == "auto" and self.training):
            if torch.is_grad_enabled():
                self._record_cost(v_t, v_c, x)
            return self.soft_forward(x, v_t, v_c)
        if self.force_full:  # R = 1, r = 1: the dense conv itself
            dense = self.conv_macs(self.out_shape(x), self.conv.out_channels)
            self._record(x.shape[0], dense, dense, 0.0, x)
            return self.conv(x)
        return self.hard_forward(x, v_t, v_c)

    def soft_forward(self, x: torch.Tensor, v_t: torch.Tensor, v_c: torch.Tensor) -> torch.Tensor:
        """Eq. 3.5 with shared weights: one dense conv, every alternative a slice of it."""
        y = self.conv(x)  # (N, Co, To, Ho, Wo): the big kernel, i_s = 1
        shape = (-1,) + (1,) * (y.dim() - 1)
        z = sum(v_c[:, i].view(shape) * self.channel_alt(y, i) for i in range(len(self.keep)))
        if not self.temporal:
            return z
        steps = y.shape[2]
        return sum(v_t[:, j].view(shape) * self.temporal_alt(z[:, :, :: r], j, steps)
                   for j, r in enumerate(self.strides))

    def hard_forward(self, x: torch.Tensor, v_t: torch.Tensor, v_c: torch.Tensor) -> torch.Tensor:
        """Only what the gate selected; samples that selected the same largest alternatives run together."""
        i_t, i_c = first_active(v_t), first_active(v_c)
        gate = self.gate.macs(tuple(x.shape[1:]))
        groups: dict[tuple[int, int], list[int]] = {}
        for n, key in enumerate(zip(i_t, i_c)):
            groups.setdefault(key, []).append(n)
        if len(groups) == 1:
            (key, _), = groups.items()
            return self._hard_group(x, v_t, v_c, *key, gate)
        outs, order = [], []
        for key, idx in groups.items():
            index = torch.tensor(idx, device=x.device)
            outs.append(self._hard_group(x[index], v_t[index], v_c[index], *key, gate))
            order.append(index)
        out = torch.cat(outs)
        return out[torch.argsort(torch.cat(order))]  # back to the input order

    def _hard_group(self, x: torch.Tensor, v_t: torch.Tensor, v_c: torch.Tensor, i_t: int, i_c: int,
                    gate: float) -> torch.Tensor:
        """Eq. A.1-A.2: one conv for the largest selected alternatives, the smaller ones sliced from it."""
        n, co = x.shape[0], self.conv.out_channels
        out_shape = self.out_shape(x)
        dense = self.conv_macs(out_shape, co)
        if i_t == len(self.strides) or i_c == len(self.keep):  # every weight zero: the layer outputs zeros
            self._record(n, 0.0, dense, gate, x)
            return x.new_zeros(n, co, *out_shape)
        stride = self.strides[i_t]
        y = self.head_conv(x, self.keep[i_c], stride)  # (n, k, ceil(To/R), Ho, Wo)
        computed = y[0, 0].numel()  # positions per channel
        cost = self.conv_macs(tuple(y.shape[2:]), self.keep[i_c])
        shape = (-1,) + (1,) * (y.dim() - 1)
        active_c = [i for i in range(i_c, len(self.keep)) if bool((v_c[:, i] > 0).any())]
        z = None
        for i in active_c:
            alt = v_c[:, i].view(shape) * self.channel_alt(y, i)
            z = alt if z is None else z + alt
            cost += (co - self.keep[i]) * computed + co * computed  # Φ^c, then the V-weighting
        if not self.temporal:
            self._record(n, cost, dense, gate, x)
            return z
        steps, plane = out_shape[0], math.prod(out_shape[1:])
        out = None
        for j in range(i_t, len(self.strides)):
            if not bool((v_t[:, j] > 0).any()):
                continue
            zs = z[:, :, :: self.strides[j] // stride]  # (n, Co, ceil(To/R_j), Ho, Wo)
            alt = v_t[:, j].view(shape) * self.temporal_alt(zs, j, steps)
            out = alt if out is None else out + alt
            cost += co * (steps - zs.shape[2]) * plane + co * steps * plane  # Φ^t, then the V-weighting
        self._record(n, cost, dense, gate, x)
        return out

    def _record_cost(self, v_t: torch.Tensor, v_c: torch.Tensor, x: torch.Tensor) -> None:
        """Keep r^s/R^s of Eq. 3.6 per sample for the efficiency loss (straight-through, see ``st_cost``)."""
        ratio_c = v_c.new_tensor([k / self.conv.out_channels for k in self.keep])
        ratio_t = v_t.new_tensor([1.0 / r for r in self.strides])
        cost = st_cost(v_c, ratio_c) * (st_cost(v_t, ratio_t) if self.temporal else 1.0)
        self.records.append((self.conv_macs(self.out_shape(x), self.conv.out_channels), cost))


def st_cost(v: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """Cost ratio of the largest alternative with a non-zero weight (what inference runs), per sample.

    Its value is piecewise constant in V, so its gradient is taken from the
    V-weighted cost Σ_i V_i·ratio_i (straight-through): every open alternative
    is pushed to close in proportion to what it costs.
    """
    active = v > 0  # (N, S)
    first = active.int().argmax(1)
    hard = torch.where(active.any(1), ratio[first], torch.zeros_like(v[:, 0]))
    soft = (v * ratio).sum(1)
    return hard + (soft - soft.detach())


__all__ = ["DEFAULTS", "ChannelRebuild", "DynamicConv", "GateSettings", "SoftModulationGate", "TemporalRebuild",
           "channel_counts", "first_active", "st_cost"]
