"""Skip-Convolution norm gates: no parameters, no training of the gate.

Input-Norm gate (Skip-Convolutions, Eq. 5): a position is recomputed when the
l1 norm of the residual over its kernel support exceeds ε. Output-Norm gate
(Eq. 7): the same norm times ‖w‖₁ (over all four weight dimensions), a Young's
inequality bound on the norm of w * r (Eq. 6). One ε is shared by all layers;
round(σ(s - ε)) is 1 exactly when s > ε.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Policy, register_policy
from .skipconv import Gate, SkipConv2d, convert_convs


class NormGate(Gate):
    def __init__(self, threshold: float, *, output_norm: bool) -> None:
        super().__init__()
        self.threshold = float(threshold)
        self.output_norm = output_norm

    def _args(self, layer: SkipConv2d) -> dict:
        c = layer.conv
        scale = float(c.weight.detach().abs().sum()) if self.output_norm else 1.0
        return dict(kernel_size=c.kernel_size, stride=c.stride, padding=c.padding, dilation=c.dilation,
                    block_size=layer.block_size, threshold=self.threshold, scale=scale)

    def block_mask(self, r: torch.Tensor, layer: SkipConv2d) -> torch.Tensor:
        from gatesearch import ops

        return ops.norm_gate_block_mask(r, **self._args(layer))

    def plan(self, layer: SkipConv2d, x: torch.Tensor, out_hw):
        from gatesearch import ops

        gate = ops.norm_gate(x, out_hw=out_hw, **self._args(layer))  # reads (x, x_prev): no residual tensor
        return lambda x_, x_prev: (gate(x_, x_prev), None)

    def macs(self, layer: SkipConv2d, in_hw, out_hw) -> float:
        # |r| summed over channels once, then a k_h×k_w box sum per output position
        kh, kw = layer.conv.kernel_size
        return layer.conv.in_channels * in_hw[0] * in_hw[1] + kh * kw * out_hw[0] * out_hw[1]


class _NormPolicy(Policy):
    params = {"threshold": {"low": 0.01, "high": 10.0, "log": True}, "block_size": [1, 2, 4, 8]}
    output_norm = False

    def apply(self, model: nn.Module) -> nn.Module:
        convert_convs(
            model,
            lambda conv: NormGate(self.knobs["threshold"], output_norm=self.output_norm),
            block_size=self.knobs["block_size"],
        )
        return model


@register_policy("input_norm")
class InputNorm(_NormPolicy):
    """Skip-Conv input-norm gate (Eq. 5): recompute where ‖r_t‖₁ over the kernel support > ε."""


@register_policy("output_norm")
class OutputNorm(_NormPolicy):
    """Skip-Conv output-norm gate (Eq. 7): recompute where ‖w‖₁·‖r_t‖₁ > ε."""

    params = {"threshold": {"low": 1.0, "high": 1000.0, "log": True}, "block_size": [1, 2, 4, 8]}
    output_norm = True
