"""Skip-Conv Gumbel gate: a learned one-channel conv decides where to recompute.

Skip-Convolutions (Habibian et al., CVPR 2021), Section 3.2.2. Each conv layer l
gets a gate f(r_t; φ_l): a conv with one output channel and the layer's kernel
size, stride, padding and dilation, run on the residual r_t, so its scores line
up with the layer's outputs. Eq. 8: at training a position is kept with a
Bernoulli(σ(f)) sample, drawn by the Gumbel (logistic-noise) reparametrisation
with a straight-through estimator so the gradient reaches φ_l; at inference it
is round(σ(f)), i.e. f > 0. Masks are structured in b×b blocks by max-pool b
and nearest upsample b ("Structured Sparsity"). The max-pool is taken over the
logits: at inference that is exactly the max-pooled hard mask (round∘σ is
monotone), and in training one Bernoulli is drawn per block, so a block closes
once its largest f falls below 0 rather than only when b² independent samples
all come out 0 (which would need f far below 0 for b = 8).

The conv reads the residual's magnitude |r_t| (Eq. 8 names only "a
convolution with a single output channel" on r_t; |r_t| is our choice). A conv
linear in the signed r_t cannot tell a large change from none: wherever w * r_t
falls below -b it skips, and the larger the change of that sign the surer the
skip, while a still position (r_t = 0, which adds nothing) is computed whenever
b > 0. Fine-tuned from a trained HRNet-small that gate computed 0.98-1.00 of the
dense MACs and lost 25 points of PCK (docs/fidelity.md, finding 2): it skipped
the moving keypoints and kept the static background. On |r_t| with every
weight 1 at the start, f = ‖r_t‖₁ over the layer's support + b: exactly the
Input-Norm gate (Eq. 5) with ε = −b, whose weights and ε are then learned;
training may make a weight small or negative where a change does not matter
(the paper's "big changes in background"). With b = 0 at the start a position
is skipped exactly when its residual is zero, so the untrained gated network
computes the dense one (Eq. 2) and fine-tuning moves from there.

The weights start at 1, not at nn.Conv2d's random scale (≈ 1/√(C_in·k²) made
≥ 0, as before): at that scale w * |r| stayed below 1 everywhere, so f was the
bias give or take the logistic noise (std 1.8) of the training sample, and the
gate learned no decision from content: fine-tuned at β 0.3 from the quick
profile's HRNet-small every layer's f sat within ±2 at every position, b fell
to about −0.7, training kept E[σ(f)] ≈ 0.33 of each layer's positions by noise
alone while inference (f > 0) kept 0.00-0.01 of them, and PCK fell 0.971 → 0.605
(docs/fidelity.md, finding 2). On the Input-Norm scale f spans the residual's
range and inference keeps what training learned to keep: after the same
fine-tuning E[σ(f)] 0.38-0.97 against f > 0 0.06-1.00 per layer (the stem and
first stage still keep 0.2-0.35 fewer at inference: the positions near f = 0
that the sample opens at random), PCK 0.992 at 0.533 of the dense MACs. The
weights train at ``weight_lr_scale`` × lr, as the bias moves at its gain: from 1,
at lr, they could not close more than the bias alone travels in a short
fine-tuning (0.64 of the dense MACs at β 0.3; the toy test of β's reach kept
0.67 at β 10).

Training minimises L_task + β·L_gate, with L_gate the MAC-weighted expected
fraction of computed positions over the residual frames of a clip (Eq. 9),
the per-layer weights m_l being layer MACs normalised by their sum (footnote 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gatesearch.ops.geometry import conv_out_shape
from gatesearch.spaces.params import Param

from .base import BLOCK_SIZE, Policy, register_policy
from .skipconv import (
    Gate,
    SkipConv2d,
    ceil_div,
    convert_convs,
    pool_blocks,
    skip_layers,
    upsample_blocks,
)
from .structure import FRAME_CONVS


@dataclass(frozen=True, kw_only=True)
class GumbelSettings:
    """Constants of the gate; not searched (β and b are)."""

    temperature: float = 2 / 3  # τ of the Gumbel-sigmoid relaxation (only shapes the backward pass)
    init_bias: float = 0.0  # f = w * |r| + b with w ≥ 0: at b = 0 every changed position is open and every still
    #                         one (which adds nothing) closed at inference: the untrained gate is exact (Eq. 2)
    init_weight: float = 1.0  # every tap of φ_l at the start: f = ‖r‖₁ over the layer's support + b, the Input-Norm
    #                          gate (Eq. 5) with ε = −b, on the scale where the bias moves (see the module docstring)
    warmup: float = 0.5  # fraction of the epochs trained densely (frames batched, gates idle) before the gates join
    weight_lr_scale: float = 30.0  # φ_l's weights train at this multiple of the trial's lr (``Policy.lr_scales``):
    #                                 from 1 they must be able to reach 0 within a short fine-tuning (Adam moves
    #                                 them ~lr a step), as the bias moves gain× faster; with the weights at lr, the
    #                                 Input-Norm start could not close more than the bias alone travels
    bias_gain: float = 30.0  # f = w * r + gain·b̃: with Adam every parameter moves ~lr a step, so the
    #                          stored bias b̃ = b / gain moves the operating point gain× faster than the
    #                          weights, letting gates close within the few epochs of a search trial


class GumbelGate(Gate):
    """f(r_t; φ_l) of one layer (Eq. 8) with its structured mask.

    φ_l is kept as bare parameters and convolved with the layer's *current*
    geometry, so the gate is never itself mistaken for a layer to convert, and
    string paddings already made explicit by ``SkipConv2d`` apply to it too.
    ``force_open`` keeps every position (the equivalence tests use it).
    """

    def __init__(self, conv: nn.Conv2d, settings: GumbelSettings = GumbelSettings()) -> None:
        super().__init__()
        self.settings = settings
        kh, kw = conv.kernel_size
        weight = torch.full((1, conv.in_channels, kh, kw), settings.init_weight)  # groups = 1: every input channel
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.full((1,), settings.init_bias / settings.bias_gain))
        self.force_open = False
        self.expected: list[torch.Tensor] = []  # E[g] per residual frame, (N,) each; drained by the loss
        self.out_hw: tuple[int, int] | None = None  # output size seen last, for m_l

    def logits(self, r: torch.Tensor, layer: SkipConv2d) -> torch.Tensor:  # (N, Ci, H, W) -> (N, 1, Ho, Wo)
        """f(r_t; φ_l): the layer-shaped one-channel conv on |r_t| (the module docstring says why the magnitude)."""
        c = layer.conv
        return F.conv2d(r.abs(), self.weight, self.bias * self.settings.bias_gain, c.stride, c.padding, c.dilation)

    def block_logits(self, r: torch.Tensor, layer: SkipConv2d) -> torch.Tensor:  # -> (N, Hb, Wb)
        """Max-pool b of f: round(σ(·)) commutes with max, so a block is kept iff any of its positions is."""
        return pool_blocks(self.logits(r, layer), layer.block_size)

    def sample(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hard 0/1, soft relaxation) of Bern(σ(f)) in training, of round(σ(f)) otherwise (Eq. 8).

        Training draws one Bernoulli per block by the Gumbel reparametrisation
        (logistic noise is the difference of two Gumbels); the soft value σ(·/τ)
        carries the straight-through gradient.
        """
        if not self.training:
            return (f > 0).to(f.dtype), torch.sigmoid(f)
        u = torch.rand_like(f).clamp_(1e-6, 1 - 1e-6)
        noisy = f + torch.log(u) - torch.log1p(-u)
        return (noisy > 0).to(f.dtype), torch.sigmoid(noisy / self.settings.temperature)

    def block_mask(self, r: torch.Tensor, layer: SkipConv2d) -> torch.Tensor:
        if self.force_open:
            ho, wo = conv_out_shape(layer.conv, r.shape[-2:])
            b = layer.block_size
            return torch.ones(r.shape[0], ceil_div(ho, b), ceil_div(wo, b), dtype=torch.bool, device=r.device)
        hard, _ = self.sample(self.block_logits(r, layer))
        return hard > 0  # (N, Hb, Wb)

    def plan(self, layer: SkipConv2d, x: torch.Tensor, out_hw, reference=None):
        """Inference, once per clip: f > 0 (Eq. 8) read from the pair (x, x_prev) by the C++ kernel (on |x - x_prev|),
        no residual tensor and no full-frame conv; anything else (training, forced open, other layouts) takes the
        generic path."""
        from gatesearch.ops import _native
        from gatesearch.ops.geometry import is_dense, resolve_geometry

        fast = x.dim() == 4 and is_dense(x) and _native.usable(x)
        if reference is not None or self.training or self.force_open or not fast:
            return super().plan(layer, x, out_hw, reference)
        c, ops = layer.conv, _native.ops()
        wpack = self.weight.detach()[0].permute(1, 2, 0).reshape(-1, c.in_channels).contiguous()  # (kh, kw, Ci)
        bias = float(self.bias.detach() * self.settings.bias_gain)
        ints = resolve_geometry(x.shape, self.weight.shape, stride=c.stride, padding=c.padding, dilation=c.dilation,
                                groups=1, block_size=layer.block_size).ints()  # the gate sees every input channel
        generic, layout = super().plan(layer, x, out_hw), (tuple(x.shape), x.stride())

        def mask(x_, x_prev):
            if (tuple(x_.shape), x_.stride()) != layout or x_prev.stride() != layout[1]:
                return generic(x_, x_prev)
            return ops.gate_block_linear(x_, x_prev, wpack, bias, ints), None

        return mask

    def train_mask(self, r: torch.Tensor, layer: SkipConv2d, out_hw) -> torch.Tensor:
        """Structured straight-through mask (N, 1, Ho, Wo): values of the hard sample, gradient of the soft one."""
        if self.force_open:
            return r.new_ones(r.shape[0], 1, *out_hw)
        hard, soft = self.sample(self.block_logits(r, layer))  # (N, Hb, Wb) each
        # hard + (soft - soft) is exactly hard in value: masks stay 0/1 with no rounding error
        mask = upsample_blocks(hard + (soft - soft.detach()), layer.block_size, out_hw)  # (N, 1, Ho, Wo)
        self.expected.append(mask.mean((1, 2, 3)))  # E[g]: spatial average, (N,)
        self.out_hw = (int(out_hw[0]), int(out_hw[1]))
        return mask

    def macs(self, layer: SkipConv2d, in_hw, out_hw) -> float:
        """One output channel over every input channel: Ci·kh·kw per output position."""
        if self.force_open:
            return 0.0
        kh, kw = layer.conv.kernel_size
        return float(layer.conv.in_channels * kh * kw * out_hw[0] * out_hw[1])


def layer_macs(conv: nn.Conv2d, out_hw: tuple[int, int]) -> float:
    """Dense MACs of one conv per frame: Co·(Ci/groups)·kh·kw·Ho·Wo (m_l before normalising)."""
    kh, kw = conv.kernel_size
    return float(conv.out_channels * (conv.in_channels // conv.groups) * kh * kw * out_hw[0] * out_hw[1])


def gate_loss(model: nn.Module) -> torch.Tensor | None:
    """L_gate of Eq. 9 over the frames streamed since the last call; drains the gates' records.

    E[g] is the spatial average of the straight-through structured mask, i.e.
    the fraction of the layer's outputs actually computed, with the gradient of
    the soft samples. Each layer's E[g] is averaged over its residual frames (t ≥ 2 of each
    clip, the reference frames being dense) and over the streams of the batch,
    then weighted by m_l = MACs_l / Σ MACs (footnote 2). None when no residual
    frame was streamed with autograd on.
    """
    terms, weights = [], []
    for layer in skip_layers(model):
        gate = layer.gate
        if not isinstance(gate, GumbelGate) or not gate.expected:
            continue
        terms.append(torch.stack(gate.expected).mean())  # (frames, N) -> scalar
        weights.append(layer_macs(layer.conv, gate.out_hw))
        gate.expected = []
    if not terms:
        return None
    m = torch.tensor(weights) / sum(weights)
    return (m.to(terms[0]) * torch.stack(terms)).sum()


@register_policy("gumbel")
class Gumbel(Policy):
    """Skip-Conv Gumbel gate (Eq. 8-9): a learned 1-channel conv on r_t, trained on L_task + β·L_gate."""

    params = (
        Param(name="beta", kind=float, low=0.0, default={"low": 1e-3, "high": 1.0, "log": True},
              doc="β: weight of the gate loss, trading MACs for accuracy (Eq. 9)"),
        BLOCK_SIZE,
    )
    requires = (FRAME_CONVS,)
    trains_gates = True
    fine_tunes = True
    settings = GumbelSettings()

    @classmethod
    def keep_all(cls) -> dict:
        """Any knobs: forced open, every gate keeps every position (Eq. 2 with g = 1)."""
        return cls.example_knobs()

    def apply(self, model: nn.Module) -> nn.Module:
        convert_convs(model, lambda conv: GumbelGate(conv, self.settings), block_size=self.knobs["block_size"])
        return model

    def streams(self, epoch: int, epochs: int) -> bool:
        """Dense warm-up first (fast, batched), as the paper fine-tunes a trained network; then the gates train."""
        return epoch >= int(self.settings.warmup * epochs)

    def lr_scales(self, model: nn.Module) -> dict[nn.Parameter, float]:
        """Each gate's weights at ``weight_lr_scale`` × lr (the bias has its gain in the stored value)."""
        return {layer.gate.weight: layer.gate.settings.weight_lr_scale for layer in skip_layers(model)
                if isinstance(layer.gate, GumbelGate)}

    def loss(self, model: nn.Module, *, output: torch.Tensor | None = None,
             batch: dict | None = None) -> torch.Tensor | None:
        """β·L_gate (Eq. 9); the records are drained even when β = 0."""
        l_gate = gate_loss(model)
        beta = float(self.knobs["beta"])
        return None if l_gate is None or beta == 0 else beta * l_gate


__all__ = ["Gumbel", "GumbelGate", "GumbelSettings", "gate_loss", "layer_macs"]
