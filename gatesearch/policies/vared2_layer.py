"""VA-RED² dynamic convolution: one conv layer, its soft modulation gate and its cheap rebuilds.

VA-RED² (Pan et al., ICLR 2021; thesis Chapter 3). For each input, a soft
modulation gate (Eq. 3.4) scores S alternatives per dimension:

* temporal (3D convs): temporal stride × R = 2^j, j < S; the skipped time steps
  are rebuilt from the computed ones by a cheap linear op Φ^t (Eq. 3.1): here a
  per-channel affine map of the computed step before them, one per offset;
* channel: only the first k = C_out·(1/2)^i output channels are computed (in
  whole blocks of 16 once k is at least 16: what CPU kernels skip), the rest
  rebuilt by a cheap linear op Φ^c (Eq. 3.3): here a per-channel affine map
  of computed channel ``(m − k) mod k`` (a 1×1 depthwise "ghost" conv).

Training (``path="soft"``) computes the dense output once with the big kernel
and takes each alternative as a slice of it (weight sharing, Eq. A.1), so the
cost does not grow with S; the output is the V-weighted sum of alternatives
(Eq. 3.5). Inference (``path="hard"``) runs only what the gate selected: the
largest alternative with a non-zero weight, as a conv with a sliced weight and
a larger temporal stride (Eq. A.2), and derives every other selected
alternative from it by slicing. The rebuilds, the V-weighting and the BN
that follows the conv are all per-channel affine maps of computed features,
so inference applies them together while writing the output: one pass, as
the BN alone takes in the dense network, when one alternative per dimension
is open. The two paths give the same output.

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

from gatesearch.affine import bn_affine, versions
from gatesearch.backbones.clip3d import BatchNorm3d, conv3d, window_frames


@dataclass(frozen=True, kw_only=True)
class GateSettings:
    """Constants of the gate and the rebuilds; not searched (S and λ_e are)."""

    hidden: int = 16  # D_h of Eq. 3.4
    time_bins: int = 2  # G pools space and keeps time in this many bins (the thesis keeps all T; a fixed
    #                    number of bins lets one gate serve any window length, deep layers with T=1 included)
    init_bias: float = 0.5  # β_p at init: every alternative starts at V ≈ tanh(0.5) ≈ 0.46
    init_gain: float = 0.1  # scale of the last FC's initial weights: gates start nearly input-independent
    bias_gain: float = 20.0  # β_p = gain·b̃ with b̃ stored: Adam moves every parameter ~lr a step, so the
    #                          operating point of a gate moves gain× faster than its weights, enough to close
    #                          alternatives within the few epochs of a search trial (the thesis fine-tunes 40)
    channel_block: int = 16  # oneDNN computes output channels in blocks of the vector width (16 fp32 lanes with
    #                          AVX-512, 8 with AVX2): a conv's time moves in whole blocks (18 of 36 channels cost as
    #                          much as 32, docs/benchmarks.md), so channel alternatives keep whole blocks of 16,
    #                          whole on both; fixed, so that weights load on any machine
    min_share: float = 0.05  # convs with less than this share of the network's conv MACs stay dense: on a
    #                          CPU a gate's fixed cost (a dozen small ops) exceeds what it can save there


DEFAULTS = GateSettings()


class SoftModulationGate(nn.Module):
    """p_l of Eq. 3.4: V = max(tanh(FC2(tanh(BN(FC1(G(X))))) + β_p), 0) ∈ [0, 1)^{S_t + S_c}."""

    def __init__(self, cin: int, outputs: int, *, time_bins: int, settings: GateSettings = DEFAULTS) -> None:
        super().__init__()
        self.time_bins = time_bins
        self.fc1 = nn.Linear(cin * time_bins, settings.hidden, bias=False)
        self.bn = nn.BatchNorm1d(settings.hidden)
        self.fc2 = nn.Linear(settings.hidden, outputs)  # its bias is stored as β_p / bias_gain
        self.bias_gain = settings.bias_gain
        with torch.no_grad():
            self.fc2.weight.mul_(settings.init_gain)
            self.fc2.bias.fill_(settings.init_bias / settings.bias_gain)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """G: (N, Ci, T, H, W) -> (N, Ci·bins), or (N, Ci, H, W) -> (N, Ci)."""
        g = x.mean((-2, -1))  # (N, Ci, T) or (N, Ci); adaptive_avg_pool3d is ~10× slower on CPU
        if x.dim() == 5:
            n, c, t = g.shape
            bins = self.time_bins
            if t % bins == 0:
                g = g.view(n, c, bins, t // bins).mean(-1)
            else:  # one step repeats (as adaptive pooling does); other lengths overlap their bins
                g = g.expand(n, c, bins) if t == 1 else F.adaptive_avg_pool1d(g, bins)
            g = g.flatten(1)
        return g

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # -> V (N, outputs)
        h = self.fc1(self.pool(x))
        bn = self.bn
        # BN needs two samples to take batch statistics; a lone clip in training uses the running ones
        train_stats = bn.training and h.shape[0] > 1
        h = F.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias, train_stats, bn.momentum, bn.eps)
        return torch.relu(torch.tanh(F.linear(torch.tanh(h), self.fc2.weight, self.fc2.bias * self.bias_gain)))

    def scores_eval(self, x: torch.Tensor) -> list[list[float]]:
        """Inference: tanh(FC2(tanh(BN∘FC1(G(X))))) per sample as Python floats, BN folded into FC1.

        max(·, 0) is left to the caller, which reads the values anyway. Few
        dispatches: this runs once per layer and clip on the deployed path.
        """
        weight, bias = self._folded()
        h = torch.addmm(bias, self.pool(x), weight).tanh_()
        return torch.addmm(self.fc2.bias * self.bias_gain, h, self.fc2.weight.t()).tanh_().tolist()

    def _folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(FC1·BN weight (Ci·bins, D_h), bias), cached until a parameter or statistic changes."""
        bn = self.bn
        key = versions(self.fc1.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        if getattr(self, "_fold_key", None) != key:
            with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, usable outside inference mode
                scale, shift = bn_affine(bn)
                self._fold = ((self.fc1.weight * scale[:, None]).t().contiguous(), shift)
            self._fold_key = key
        return self._fold

    def macs(self, in_shape: tuple[int, ...]) -> float:
        """Per sample: the pooling adds, then the two FCs."""
        return float(math.prod(in_shape) + self.fc1.in_features * self.fc1.out_features
                     + self.fc2.in_features * self.fc2.out_features)


class ChannelRebuild(nn.Module):
    """Φ^c (Eq. 3.3): the C_out − k channels not computed, each an affine map of computed channel (m − k) mod k."""

    def __init__(self, keep: int, channels: int) -> None:
        super().__init__()
        self.keep, self.channels = keep, channels
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

    def forward(self, z: torch.Tensor, steps: int, bias_scale=1.0) -> torch.Tensor:
        """(N, C, T', H, W) -> (N, C, steps, H, W): [z[i], w_1·z[i] + s·b_1, ...] interleaved, cropped."""
        parts = [z] + [z * w.view(1, -1, 1, 1, 1) + bias_scale * b.view(1, -1, 1, 1, 1)
                       for w, b in zip(self.weight, self.bias)]
        return torch.stack(parts, 3).flatten(2, 3)[:, :, :steps]  # (N, C, T'·R, H, W) -> steps


class _PassesFusedOutput:
    """A BN right after a ``DynamicConv``: at inference that layer applies it in ``_fused``, and the output it
    marks passes through here unchanged. Anything else (training, a dense pass) is normalised as usual."""

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


def empty_in_layout(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` with the memory order of ``like``'s dimensions.

    Rebuilt features keep the layout of the computed ones (frames-major, see
    ``clip3d.conv3d``), so elementwise ops never stride across it.
    """
    order = sorted(range(like.dim()), key=lambda d: (-like.stride(d), d))  # outermost first
    base = like.new_empty([shape[d] for d in order])
    return base.permute([order.index(d) for d in range(len(shape))])


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


def first_open(weights: list[float]) -> int:
    """Index of the first non-zero weight (the largest alternative the gate keeps), or S when none."""
    return next((i for i, w in enumerate(weights) if w > 0), len(weights))


@dataclass
class LayerStats:
    """What the hard path spent since the last reset (a plain object: counting must stay cheap)."""

    cost: float = 0.0  # MACs spent, rebuilds and V-weighting included
    dense: float = 0.0  # MACs the dense layer would have spent on the same samples
    gate: float = 0.0  # the gate's own MACs
    frames: int = 0  # video frames those samples cover


class DynamicConv(nn.Module):
    """A ``Conv2d`` (channel-wise only) or ``Conv3d`` (temporal- and channel-wise) under a VA-RED² gate.

    ``force_open`` makes the layer compute everything (R = 1, r = 1): exactly the
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
        self.keep = channel_counts(conv, space_size, settings.channel_block)  # computed by each channel alternative
        self.strides = tuple(2**j for j in range(space_size)) if self.temporal else (1,)  # R of each temporal one
        n_t = len(self.strides) if self.temporal else 0  # a 2D layer has no temporal scores
        self.gate = SoftModulationGate(conv.in_channels, n_t + len(self.keep),
                                       time_bins=settings.time_bins if self.temporal else 1, settings=settings)
        self.phi_c = nn.ModuleList([ChannelRebuild(k, conv.out_channels) for k in self.keep[1:]])
        self.phi_t = nn.ModuleList([TemporalRebuild(r, conv.out_channels) for r in self.strides[1:]])
        self.force_open = False
        self.path = "auto"
        self.bn: nn.Module | None = None  # the eval BN right after this conv, applied by ``_fused`` (not a child)
        self.records: list[tuple[float, torch.Tensor]] = []  # (dense MACs per sample, cost ratio (N,)) for L_e
        self.per_position = (conv.in_channels // conv.groups) * math.prod(conv.kernel_size)  # MACs per output value
        self._geometry: dict[tuple[int, ...], tuple[tuple[int, ...], float, float]] = {}
        self.reset_stats()

    # -- accounting ---------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self.stats = LayerStats()

    @property
    def density(self) -> float:
        return self.stats.cost / self.stats.dense if self.stats.dense else 1.0

    @property
    def gate_macs(self) -> float:
        return self.stats.gate / self.stats.frames if self.stats.frames else 0.0

    def _record(self, n: int, cost: float, dense: float, gate: float, x: torch.Tensor) -> None:
        st = self.stats
        st.cost += n * cost
        st.dense += n * dense
        st.gate += n * gate
        st.frames += n * ((window_frames() or x.shape[2]) if self.temporal else 1)  # video frames

    # -- geometry -----------------------------------------------------------------------------
    def geometry(self, x: torch.Tensor) -> tuple[tuple[int, ...], float, float]:
        """(dense output size per sample without channels, dense MACs, gate MACs) for this input size."""
        key = tuple(x.shape[1:])
        if key not in self._geometry:
            c = self.conv
            out = tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                        for n, p, d, k, s in zip(x.shape[2:], c.padding, c.dilation, c.kernel_size, c.stride))
            self._geometry[key] = (out, self.conv_macs(out, c.out_channels), self.gate.macs(key))
        return self._geometry[key]

    def out_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        """Dense output size per sample without channels: (To, Ho, Wo) or (Ho, Wo)."""
        return self.geometry(x)[0]

    def conv_macs(self, out: tuple[int, ...], keep: int) -> float:
        """MACs per sample of ``keep`` output channels over ``out`` positions."""
        return float(keep * self.per_position * math.prod(out))

    def head_conv(self, x: torch.Tensor, keep: int, stride: int) -> torch.Tensor:
        """The first ``keep`` output channels at every ``stride``-th time step, and nothing else (Eq. A.1)."""
        c = self.conv
        weight, bias = c.weight[:keep], None if c.bias is None else c.bias[:keep]
        groups = c.groups
        if groups > 1 and keep < c.out_channels:  # a grouped conv: the groups of the kept channels only
            groups = keep // (c.out_channels // c.groups)
            x = x[:, : groups * (c.in_channels // c.groups)]
        if self.temporal:
            return conv3d(x, weight, bias, (c.stride[0] * stride, *c.stride[1:]), c.padding, c.dilation, groups)
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
        if self.force_open:
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
        if self.path == "soft" or (self.path == "auto" and self.training):
            v_t, v_c = self.scores(x)
            if torch.is_grad_enabled():
                self._record_cost(v_t, v_c, x)
            return self.soft_forward(x, v_t, v_c)
        if self.force_open:  # R = 1, r = 1: the dense conv itself
            dense = self.geometry(x)[1]
            self._record(x.shape[0], dense, dense, 0.0, x)
            return self.conv(x)
        return self.hard_forward(x)

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

    def hard_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Only what the gate selected (Eq. A.2). The gate's weights come back to Python once; samples
        that keep the same largest alternatives run together. No gradient reaches the gate here."""
        n_t = len(self.strides) if self.temporal else 0
        rows = [[max(v, 0.0) for v in row] for row in self.gate.scores_eval(x)]  # (N, S_t + S_c): Eq. 3.4
        weights = [(row[:n_t] if n_t else [1.0], row[n_t:]) for row in rows]  # (V_t, V_c) per sample
        keys = [(first_open(v_t), first_open(v_c)) for v_t, v_c in weights]
        if len(set(keys)) == 1:
            return self._hard_group(x, weights, keys[0])
        groups: dict[tuple[int, int], list[int]] = {}
        for n, key in enumerate(keys):
            groups.setdefault(key, []).append(n)
        outs, order = [], []
        for key, idx in groups.items():
            index = torch.tensor(idx, device=x.device)
            outs.append(self._hard_group(x[index], [weights[n] for n in idx], key))
            order.append(index)
        return self._bn_applied(torch.cat(outs)[torch.argsort(torch.cat(order))])  # back to the input order

    def _hard_group(self, x: torch.Tensor, weights: list[tuple[list[float], list[float]]],
                    key: tuple[int, int]) -> torch.Tensor:
        """Eq. A.1-A.2: one conv for the largest kept alternatives; the smaller ones are slices of it."""
        n, co = x.shape[0], self.keep[0]
        i_t, i_c = key
        out_shape, dense, gate = self.geometry(x)
        if i_t == len(self.strides) or i_c == len(self.keep):  # every weight zero: the layer outputs zeros
            self._record(n, 0.0, dense, gate, x)
            out = x.new_zeros(n, co, *out_shape)
            if self.bn is not None and not torch.is_grad_enabled():  # the BN of zeros, as ``_fused`` would apply it
                out += self._maps()["h"].view(1, co, *(1,) * len(out_shape))
            return self._bn_applied(out)
        stride = self.strides[i_t]
        y = self.head_conv(x, self.keep[i_c], stride)  # (n, k, ceil(To/R), Ho, Wo)
        computed = math.prod(y.shape[2:])  # positions per channel
        cost = self.conv_macs(tuple(y.shape[2:]), self.keep[i_c])
        w_t = [[v_t[j] for v_t, _ in weights] for j in range(len(self.strides))]  # per alternative, per sample
        w_c = [[v_c[i] for _, v_c in weights] for i in range(len(self.keep))]
        open_t = [j for j in range(i_t, len(self.strides)) if any(w > 0 for w in w_t[j])]
        open_c = [i for i in range(i_c, len(self.keep)) if any(w > 0 for w in w_c[i])]
        shape = (-1,) + (1,) * (y.dim() - 1)

        def scale(ws: list[float]):
            return ws[0] if n == 1 else torch.tensor(ws, dtype=y.dtype, device=y.device).view(shape)

        steps, plane = (out_shape[0], math.prod(out_shape[1:])) if self.temporal else (1, computed)
        single = len(open_t) == len(open_c) == 1  # both V fold into one scaling: no separate V-weighting
        cost += sum((co - self.keep[i]) * computed + co * computed for i in open_c)  # Φ^c, then the V-weighting
        if self.temporal:
            for j in open_t:  # Φ^t, then the V-weighting
                cost += (co * (steps - math.ceil(steps / self.strides[j])) * plane
                         + (0 if single else co * steps * plane))
        self._record(n, cost, dense, gate, x)
        if not torch.is_grad_enabled():  # inference: rebuilds, V and the next BN written in as few passes as can be
            return self._fused(y, [(i, scale(w_c[i])) for i in open_c], [(j, scale(w_t[j])) for j in open_t], steps)
        z = sum(scale(w_c[i]) * self.channel_alt(y, i) for i in open_c)
        if not self.temporal:
            return z
        return sum(scale(w_t[j]) * self.temporal_alt(z[:, :, :: self.strides[j] // stride], j, steps) for j in open_t)

    def _fused(self, y: torch.Tensor, v_c: list, v_t: list, steps: int) -> torch.Tensor:
        """Σ_j V_t[j]·f^t_j(Σ_i V_c[i]·f^c_i(y)) (Eq. 3.5 over the open alternatives (i, V_c[i]), (j, V_t[j])),
        then the paired BN, from the head ``y``: a multiply-add pass over the output per open pair (i, j), each
        an affine map of computed channels and steps, and a bias pass per open j. With one alternative per
        dimension that is a multiply and an add, what the BN alone takes. The output is marked so that the
        paired BN passes it through."""
        maps = self._maps()
        yt = y if self.temporal else y.unsqueeze(2)  # (n, k, T', Ho, Wo), T' steps at the head's stride
        n, _, _, ho, wo = yt.shape
        co, r_head = self.keep[0], self.strides[v_t[0][0]]
        r_max = self.strides[v_t[-1][0]]
        t_pad = math.ceil(steps / r_max) * r_max
        if isinstance(v_t[0][1], torch.Tensor):  # per sample (n, 1, ...): to the rank of the maps
            v_c = [(i, v.view(-1, 1, 1, 1, 1, 1)) for i, v in v_c]
            v_t = [(j, v.view(-1, 1, 1, 1, 1, 1)) for j, v in v_t]
        out = empty_in_layout(yt, (n, co, t_pad, ho, wo))
        biases = []  # per open j: its view of the output and V_t[j]·(T_j + Σ_i V_c[i]·Q_ij)
        for j, vt in v_t:
            r = self.strides[j]
            m = math.ceil(steps / r)
            src = yt[:, :, :: r // r_head][:, :, :m].unsqueeze(3)  # the steps alternative j computed
            dst = out[:, :, : m * r].unflatten(2, (m, r))  # (n, Co, m, R_j, Ho, Wo)
            bias = maps["t", j] * vt  # (1 or n, Co, 1, R_j, 1, 1)
            for i, vc in v_c:
                w, k = vt * vc, self.keep[i]
                bias += maps["q", i, j] * w
                a = maps["p", i, j] * w
                # Φ^c: channel m ≥ k_i is an affine map of computed channel (m − k_i) mod k_i
                for lo in range(0, co, k):
                    hi = min(co, lo + k)
                    if biases or i != v_c[0][0]:
                        dst[:, lo:hi].addcmul_(src[:, : hi - lo], a[:, lo:hi])
                    else:  # the first pass writes (addcmul with a broadcast first operand is 3× slower on CPU)
                        torch.mul(src[:, : hi - lo], a[:, lo:hi], out=dst[:, lo:hi])
            biases.append((dst, bias))
        biases[0][1].add_(maps["h"])  # the BN shift, once
        for dst, bias in biases:
            dst.add_(bias)
        return self._bn_applied(out[:, :, :steps] if self.temporal else out.squeeze(2))

    def _bn_applied(self, out: torch.Tensor) -> torch.Tensor:
        """Mark an inference output that has the paired BN applied already, so that the BN passes it through."""
        if self.bn is not None and not torch.is_grad_enabled():
            self.__dict__["fused_out"] = out
        return out

    def _maps(self) -> dict:
        """The per-channel, per-time-offset maps of ``_fused``, cached until a parameter or BN statistic changes:
        ("p", i, j) and ("q", i, j): BN scale × Φ^t_j weight × Φ^c_i weight and × Φ^c_i bias; ("t", j): BN scale
        × Φ^t_j bias (each (1, Co, 1, R_j, 1, 1)); "h": the BN shift (1, Co, 1, 1, 1, 1)."""
        bn = self.bn
        tensors = self.__dict__.get("maps_tensors")
        if tensors is None:  # the same objects for the layer's life (loading weights copies into them)
            tensors = [*self.phi_c.parameters(), *self.phi_t.parameters()]
            if bn is not None:
                tensors += [bn.weight, bn.bias, bn.running_mean, bn.running_var]
            self.__dict__["maps_tensors"] = tensors
        key = versions(*tensors)
        if self.__dict__.get("maps_key") != key:
            co, like = self.keep[0], self.conv.weight
            with torch.inference_mode(False), torch.no_grad():
                s, h = like.new_ones(co), like.new_zeros(co)
                if bn is not None:
                    s, h = bn_affine(bn)
                maps = {"h": h.view(1, co, 1, 1, 1, 1)}
                for j, r in enumerate(self.strides):
                    tw, tb = like.new_ones(r, co), like.new_zeros(r, co)  # identity at offset 0
                    if j:
                        tw[1:], tb[1:] = self.phi_t[j - 1].weight, self.phi_t[j - 1].bias
                    maps["t", j] = (s * tb).t().reshape(1, co, 1, r, 1, 1)
                    for i, k in enumerate(self.keep):
                        a, b = like.new_ones(co), like.new_zeros(co)  # identity on the computed channels
                        if i:
                            a[k:], b[k:] = self.phi_c[i - 1].weight, self.phi_c[i - 1].bias
                        maps["p", i, j] = (s * tw * a).t().reshape(1, co, 1, r, 1, 1)
                        maps["q", i, j] = (s * tw * b).t().reshape(1, co, 1, r, 1, 1)
            self.__dict__["maps"], self.__dict__["maps_key"] = maps, key
        return self.__dict__["maps"]

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


__all__ = ["DEFAULTS", "FUSED_BN", "ChannelRebuild", "DynamicConv", "GateSettings", "SoftModulationGate",
           "TemporalRebuild", "channel_counts", "first_open", "st_cost"]
