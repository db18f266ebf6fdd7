"""Skip-Convolution norm gates: no parameters, no training of the gate.

Input-Norm gate (Skip-Convolutions, Eq. 5): a position is recomputed when the
l1 norm of the residual over its kernel support exceeds ε. Output-Norm gate
(Eq. 7): the same norm times ‖w‖₁ / C_out, a Young's inequality bound (Eq. 6)
on the change of the layer's output at that position, Σ_c |(w * r)_c| / C_out:
the mean over its output channels, where Eq. 4 and 7 take the norm over all of
them (‖w‖₁ over all four weight dimensions). One ε is shared by all layers and
round(σ(s - ε)) is 1 exactly when s > ε, so ε must mean the same in every layer:
summed over the channels, the bound grows with C_out, and a 1-channel heatmap
head (‖w‖₁ ≈ 2 beside 60-2500 for HRNet-small's other convs) froze first: at ε
42 it computed no residual at all while the rest computed 0.93 of their MACs,
and every prediction was the reference frame's (PCK 0.971 -> 0.621,
docs/fidelity.md finding 2). Per output channel, the head skips with the rest.

Two options go beyond the paper. ``per_value``: ε is per input value, so a
layer's threshold is ε × C_in·k_h·k_w, the size of the support the norm sums
over. The paper shares one ε and leaves layer-specific ones open (Section
3.2.1); with one shared sum, deep layers (C_in·k² up to 4608 in ResNet-18)
never skip. ``reference="block"``: residuals against each block's last
computed input instead of the previous frame (``ops.block_ref``), so skipped
changes accumulate instead of being lost.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from gatesearch.spaces.params import Param

from .base import BLOCK_SIZE, Policy, register_policy
from .skipconv import Gate, SkipConv2d, convert_convs
from .structure import FRAME_CONVS

CALIBRATE = ("off", "density", "error")  # the threshold is ε itself, or a target each layer's ε is set to meet


class NormGate(Gate):
    def __init__(self, threshold: float, *, output_norm: bool, per_value: bool = False) -> None:
        super().__init__()
        self.threshold = float(threshold)
        self.output_norm = output_norm
        self.per_value = per_value
        self.force_open = False  # open: a negative threshold, which every norm exceeds

    def _args(self, layer: SkipConv2d) -> dict:
        c = layer.conv
        scale = float(c.weight.detach().abs().sum()) / c.out_channels if self.output_norm else 1.0
        support = c.in_channels * c.kernel_size[0] * c.kernel_size[1] if self.per_value else 1
        return dict(kernel_size=c.kernel_size, stride=c.stride, padding=c.padding, dilation=c.dilation,
                    block_size=layer.block_size, threshold=-1.0 if self.force_open else self.threshold * support,
                    scale=scale)

    def block_mask(self, r: torch.Tensor, layer: SkipConv2d) -> torch.Tensor:
        from gatesearch import ops

        return ops.norm_gate_block_mask(r, **self._args(layer))

    def plan(self, layer: SkipConv2d, x: torch.Tensor, out_hw, reference=None):
        from gatesearch import ops

        args = self._args(layer)
        if reference is not None:
            return lambda x_, x_prev: (reference.gate(x_, threshold=args["threshold"], scale=args["scale"]), None)
        gate = ops.norm_gate(x, out_hw=out_hw, **args)  # reads (x, x_prev): no residual tensor
        return lambda x_, x_prev: (gate(x_, x_prev), None)

    def macs(self, layer: SkipConv2d, in_hw, out_hw) -> float:
        # |r| summed over channels once, then a k_h×k_w box sum per output position
        kh, kw = layer.conv.kernel_size
        if layer.reference == "block":  # |x - reference| over every block's halo, then the window sums
            from gatesearch.ops.block_ref import halo
            from gatesearch.ops.geometry import resolve_geometry

            c = layer.conv
            geom = resolve_geometry((1, c.in_channels, *in_hw), c.weight.shape, stride=c.stride, padding=c.padding,
                                    dilation=c.dilation, groups=c.groups, block_size=layer.block_size)
            ph, pw = halo(geom)
            return c.in_channels * ph * pw * geom.grid[0] * geom.grid[1] + kh * kw * out_hw[0] * out_hw[1]
        return layer.conv.in_channels * in_hw[0] * in_hw[1] + kh * kw * out_hw[0] * out_hw[1]


THRESHOLD = Param(name="threshold", kind=float, low=0.0, default={"low": 0.01, "high": 10.0, "log": True},
                  doc="ε: a position is recomputed where the norm exceeds it (Eq. 5, 7)")


class _NormPolicy(Policy):
    params = (THRESHOLD, BLOCK_SIZE)
    options = (
        Param(name="reference", kind=str, choices=("frame", "block"), default="frame",
              doc="the residual's reference: the previous frame (Eq. 3) or each block's last computed input"),
        Param(name="per_value", kind=bool, default=False, doc="ε per input value (threshold ε·C_in·k²)",
              one_per_search="it changes the scale of ε, so one threshold range cannot serve both"),
        Param(name="calibrate", kind=str, choices=CALIBRATE, default="off",
              doc="off: the threshold is ε; density / error: it is a target, and each layer gets its own ε",
              one_per_search="it changes what the threshold means, so one threshold range cannot serve both"),
    )
    requires = (FRAME_CONVS,)
    output_norm = False

    @classmethod
    def keep_all(cls) -> dict:
        """ε = 0: only positions whose residual is exactly zero are skipped, and those add nothing."""
        return {**cls.example_knobs(), "threshold": 0.0}

    def apply(self, model: nn.Module) -> nn.Module:
        _check_target(self.knobs["calibrate"], self.knobs["threshold"])
        k = self.knobs
        convert_convs(
            model,
            lambda conv: NormGate(k["threshold"], output_norm=self.output_norm, per_value=k["per_value"]),
            block_size=k["block_size"], reference=k["reference"],
        )
        return model

    def calibrate(self, model: nn.Module, clips: torch.Tensor, *, reset_every: int | None = None) -> dict | None:
        """With ``calibrate: density|error`` the threshold is a target, and each layer gets its own ε meeting it on
        the clips (``policies.calibration``; Skip-Convolutions Sec. 3.2.1 leaves per-layer ε open)."""
        if self.knobs["calibrate"] == "off":
            return None
        from .calibration import calibrate_thresholds

        found = calibrate_thresholds(model, clips, target=self.knobs["calibrate"], value=self.knobs["threshold"],
                                     reset_every=reset_every)
        return {"target": self.knobs["calibrate"], "value": self.knobs["threshold"],
                "layers": {name: dataclasses.asdict(lt) for name, lt in found.items()}}


def _check_target(calibrate: str, threshold: float) -> None:
    if calibrate == "density" and not 0 < threshold <= 1:
        raise ValueError(f"with calibrate: density the threshold is the target density, in (0, 1]; got {threshold}")
    if calibrate == "error" and not threshold > 0:
        raise ValueError(f"with calibrate: error the threshold is the target error, > 0; got {threshold}")


@register_policy("input_norm")
class InputNorm(_NormPolicy):
    """Skip-Conv input-norm gate (Eq. 5): recompute where ‖r_t‖₁ over the kernel support > ε."""


@register_policy("output_norm")
class OutputNorm(_NormPolicy):
    """Skip-Conv output-norm gate (Eq. 7): recompute where ‖w‖₁/C_out·‖r_t‖₁ > ε."""

    params = (dataclasses.replace(THRESHOLD, default={"low": 0.05, "high": 100.0, "log": True}), BLOCK_SIZE)
    output_norm = True
