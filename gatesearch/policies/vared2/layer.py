"""VA-RED² dynamic convolution: one conv layer under a soft modulation gate, its alternatives and two paths.

VA-RED² (Pan et al., ICLR 2021; thesis Chapter 3). For each input, a soft
modulation gate (Eq. 3.4, ``gate``) scores S alternatives per dimension:

* temporal (3D convs): temporal stride × R = 2^j, j < S; the skipped time steps
  are rebuilt from the computed ones by a cheap linear op Φ^t (Eq. 3.1): here a
  per-channel affine map of the computed step before them, one per offset;
* channel: only the first k = C_out·(1/2)^i output channels are computed (in
  whole blocks of 16 once k is at least 16: what CPU kernels skip), the rest
  rebuilt by a cheap linear op Φ^c (Eq. 3.3): here a per-channel affine map
  of computed channel ``(m − k) mod k`` (a 1×1 depthwise "ghost" conv).

The dense path (``path="dense"``, what training runs) computes the dense output
once with the big kernel and takes each alternative as a slice of it (weight
sharing, Eq. A.1), so the cost does not grow with S; the output is the
V-weighted sum of alternatives (Eq. 3.5), differentiable in V. The sparse path
(``path="sparse"``, inference) runs only what the gate selected: the largest
alternative with a non-zero weight, as a conv with a sliced weight and a larger
temporal stride (Eq. A.2), and derives every other selected alternative from it
by slicing; at inference the rebuilds, V and the next BN are applied in one
pass (``fused``). The two paths give the same output.

A traced pass (fvcore) runs the dense conv, so MAC counting sees the ungated
network; ``cost`` holds what the layer reports instead.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gatesearch.affine import FoldCache, versions
from gatesearch.backbones.clip3d import conv3d, window_frames
from gatesearch.ops.geometry import conv_out_shape

from .cost import (
    CostRecord,
    LayerGeometry,
    LayerStats,
    channel_counts,
    macs_per_output,
    rebuild_macs,
    st_cost,
)
from .fused import FusedMaps, Open, fused_maps, fused_output
from .gate import Head, Scores, SoftModulationGate, first_open
from .rebuild import ChannelRebuild, TemporalRebuild
from .settings import GateSettings


class DynamicConv(nn.Module):
    """A ``Conv2d`` (channel-wise only) or ``Conv3d`` (temporal- and channel-wise) under a VA-RED² gate.

    ``force_open`` makes the layer compute everything (R = 1, r = 1): exactly the
    dense conv. ``path``: "auto" (dense in training, sparse otherwise), "dense" or "sparse".
    """

    def __init__(self, conv: nn.Conv2d | nn.Conv3d, *, space_size: int, settings: GateSettings = GateSettings(),
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
                                       time_bins=settings.time_bins if self.temporal else 1, settings=settings,
                                       full=(0, n_t) if self.temporal else (0,))
        self.phi_c = nn.ModuleList([ChannelRebuild(k, conv.out_channels) for k in self.keep[1:]])
        self.phi_t = nn.ModuleList([TemporalRebuild(r, conv.out_channels) for r in self.strides[1:]])
        self.force_open = False
        self.path = "auto"
        self.bn: nn.Module | None = None  # the eval BN right after this conv, applied by ``fused_output`` (not a child)
        self.records: list[CostRecord] = []  # per training forward, for L_e
        self.per_position = macs_per_output(conv)
        self._geometry: dict[tuple[int, ...], LayerGeometry] = {}
        self._folds = FoldCache()
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

    def _record_cost(self, v_t: torch.Tensor, v_c: torch.Tensor, x: torch.Tensor) -> None:
        """Keep r^s/R^s of Eq. 3.6 per sample for the efficiency loss (straight-through, see ``st_cost``)."""
        ratio_c = v_c.new_tensor([k / self.conv.out_channels for k in self.keep])
        ratio_t = v_t.new_tensor([1.0 / r for r in self.strides])
        cost = st_cost(v_c, ratio_c) * (st_cost(v_t, ratio_t) if self.temporal else 1.0)
        self.records.append(CostRecord(dense_macs=self.geometry(x).dense_macs, ratio=cost))

    def geometry(self, x: torch.Tensor) -> LayerGeometry:
        """The dense output size, dense MACs and gate MACs per sample for this input size."""
        key = tuple(x.shape[1:])
        if key not in self._geometry:
            out = conv_out_shape(self.conv, x.shape[2:])
            self._geometry[key] = LayerGeometry(out, self.conv_macs(out, self.conv.out_channels), self.gate.macs(key))
        return self._geometry[key]

    def conv_macs(self, out: tuple[int, ...], keep: int) -> float:
        """MACs per sample of ``keep`` output channels over ``out`` positions."""
        return float(keep * self.per_position * math.prod(out))

    # -- alternatives (Eq. 3.1, 3.3, A.1) ------------------------------------------------------------
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

    def channel_alt(self, y: torch.Tensor, i: int) -> torch.Tensor:
        """f^c(X, r = (1/2)^i) from features holding at least its k_i channels: [Y', Φ^c(Y')]."""
        return y if i == 0 else self.phi_c[i - 1](y[:, : self.keep[i]])

    def temporal_alt(self, z: torch.Tensor, j: int, steps: int) -> torch.Tensor:
        """f^t(·, R = 2^j) from features already at stride R: [Y'[i], Φ^t(Y'[i]) ...] interleaved."""
        return z if j == 0 else self.phi_t[j - 1](z, steps)

    def scores(self, x: torch.Tensor) -> Scores:
        """V_t (N, S_t) and V_c (N, S_c); a 2D layer's V_t is a fixed 1."""
        if self.force_open:
            v_t = x.new_zeros(x.shape[0], len(self.strides))
            v_c = x.new_zeros(x.shape[0], len(self.keep))
            v_t[:, 0] = v_c[:, 0] = 1.0
            return Scores(v_t, v_c)
        v = self.gate(x)
        if not self.temporal:
            return Scores(v.new_ones(v.shape[0], 1), v)
        return Scores(v[:, : len(self.strides)], v[:, len(self.strides) :])

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, Ci, T, H, W) -> (N, Co, To, Ho, Wo), or 2D
        if torch.jit.is_tracing():  # MAC counting: the dense layer
            return self.conv(x)
        if self.path == "dense" or (self.path == "auto" and self.training):
            v_t, v_c = self.scores(x)
            if torch.is_grad_enabled():
                self._record_cost(v_t, v_c, x)
            return self.dense_forward(x, v_t, v_c)
        if self.force_open:  # R = 1, r = 1: the dense conv itself
            dense = self.geometry(x).dense_macs
            self._record(x.shape[0], dense, dense, 0.0, x)
            return self.conv(x)
        return self.sparse_forward(x)

    def dense_forward(self, x: torch.Tensor, v_t: torch.Tensor, v_c: torch.Tensor) -> torch.Tensor:
        """Eq. 3.5 with shared weights: one dense conv, every alternative a slice of it."""
        y = self.conv(x)  # (N, Co, To, Ho, Wo): the big kernel, i_s = 1
        shape = (-1,) + (1,) * (y.dim() - 1)
        z = sum(v_c[:, i].view(shape) * self.channel_alt(y, i) for i in range(len(self.keep)))
        if not self.temporal:
            return z
        steps = y.shape[2]
        return sum(v_t[:, j].view(shape) * self.temporal_alt(z[:, :, :: r], j, steps)
                   for j, r in enumerate(self.strides))

    def sparse_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Only what the gate selected (Eq. A.2). The gate's weights come back to Python once; samples
        that keep the same largest alternatives run together. No gradient reaches the gate here."""
        n_t = len(self.strides) if self.temporal else 0
        rows = [[max(v, 0.0) for v in row] for row in self.gate.scores_eval(x)]  # (N, S_t + S_c): Eq. 3.4
        weights = [Scores(row[:n_t] if n_t else [1.0], row[n_t:]) for row in rows]  # per sample
        heads = [Head(first_open(w.temporal), first_open(w.channel)) for w in weights]
        if len(set(heads)) == 1:
            return self._sparse_group(x, weights, heads[0])
        groups: dict[Head, list[int]] = {}
        for n, head in enumerate(heads):
            groups.setdefault(head, []).append(n)
        outs, order = [], []
        for head, idx in groups.items():
            index = torch.tensor(idx, device=x.device)
            outs.append(self._sparse_group(x[index], [weights[n] for n in idx], head))
            order.append(index)
        return self._bn_applied(torch.cat(outs)[torch.argsort(torch.cat(order))])  # back to the input order

    def _sparse_group(self, x: torch.Tensor, weights: list[Scores], head: Head) -> torch.Tensor:
        """Eq. A.1-A.2: one conv for the largest kept alternatives; the smaller ones are slices of it."""
        n, co = x.shape[0], self.keep[0]
        out_shape, dense, gate = self.geometry(x)
        if head.temporal == len(self.strides) or head.channel == len(self.keep):  # every weight zero: zeros
            self._record(n, 0.0, dense, gate, x)
            out = x.new_zeros(n, co, *out_shape)
            if self.bn is not None and not torch.is_grad_enabled():  # the BN of zeros, as the fused pass applies it
                out += self._maps().shift.view(1, co, *(1,) * len(out_shape))
            return self._bn_applied(out)
        stride = self.strides[head.temporal]
        y = self.head_conv(x, self.keep[head.channel], stride)  # (n, k, ceil(To/R), Ho, Wo)
        computed = math.prod(y.shape[2:])  # positions per channel
        cost = self.conv_macs(tuple(y.shape[2:]), self.keep[head.channel])
        w_t = [[w.temporal[j] for w in weights] for j in range(len(self.strides))]  # per alternative, per sample
        w_c = [[w.channel[i] for w in weights] for i in range(len(self.keep))]
        open_t = [j for j in range(head.temporal, len(self.strides)) if any(v > 0 for v in w_t[j])]
        open_c = [i for i in range(head.channel, len(self.keep)) if any(v > 0 for v in w_c[i])]
        shape = (-1,) + (1,) * (y.dim() - 1)

        def scale(ws: list[float]):
            return ws[0] if n == 1 else torch.tensor(ws, dtype=y.dtype, device=y.device).view(shape)

        steps, plane = (out_shape[0], math.prod(out_shape[1:])) if self.temporal else (1, computed)
        cost += rebuild_macs(channels=co, keep=self.keep, strides=self.strides, open_c=open_c, open_t=open_t,
                             computed=computed, steps=steps, plane=plane, temporal=self.temporal)
        self._record(n, cost, dense, gate, x)
        if not torch.is_grad_enabled():  # inference: rebuilds, V and the next BN written in as few passes as can be
            out = fused_output(y if self.temporal else y.unsqueeze(2), self._maps(), keep=self.keep,
                               strides=self.strides, open_c=[Open(i, scale(w_c[i])) for i in open_c],
                               open_t=[Open(j, scale(w_t[j])) for j in open_t], steps=steps)
            return self._bn_applied(out if self.temporal else out.squeeze(2))
        z = sum(scale(w_c[i]) * self.channel_alt(y, i) for i in open_c)
        if not self.temporal:
            return z
        return sum(scale(w_t[j]) * self.temporal_alt(z[:, :, :: self.strides[j] // stride], j, steps) for j in open_t)

    # -- the fused inference pass ---------------------------------------------------------------------
    def _bn_applied(self, out: torch.Tensor) -> torch.Tensor:
        """Mark an inference output that has the paired BN applied already, so that the BN passes it through."""
        if self.bn is not None and not torch.is_grad_enabled():
            self.__dict__["fused_out"] = out
        return out

    def _maps(self) -> FusedMaps:
        """The maps of the fused pass, cached until a rebuild parameter or BN statistic changes."""
        sources = self.__dict__.get("map_sources")
        if sources is None:  # the same objects for the layer's life (loading weights copies into them)
            sources = [*self.phi_c.parameters(), *self.phi_t.parameters()]
            if self.bn is not None:
                sources += [self.bn.weight, self.bn.bias, self.bn.running_mean, self.bn.running_var]
            self.__dict__["map_sources"] = sources
        return self._folds.get("maps", versions(*sources), lambda: fused_maps(
            keep=self.keep, strides=self.strides, phi_c=self.phi_c, phi_t=self.phi_t, bn=self.bn,
            like=self.conv.weight))


__all__ = ["DynamicConv"]
