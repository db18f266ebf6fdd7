"""Effective multiply-accumulates per frame.

Dense per-layer costs come from fvcore (one MAC per multiply-add for convs and
linear layers). A gated layer's cost is its dense cost times the fraction of
its outputs actually computed (measured while streaming), plus the gate's own
cost; everything else in the network counts densely.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LayerMacs:
    dense: float  # MACs of the dense layer per frame
    density: float  # fraction of outputs computed, averaged over frames
    gate: float  # the gate's own MACs per frame

    @property
    def effective(self) -> float:
        return self.dense * self.density + self.gate


@dataclass(frozen=True)
class MacReport:
    dense: float  # dense-equivalent MACs per frame of the whole network
    effective: float  # MACs per frame actually spent, gates included
    layers: dict[str, LayerMacs]

    @property
    def reduction(self) -> float:
        return self.dense / self.effective if self.effective else float("inf")

    @property
    def mean_density(self) -> float:
        """MAC-weighted fraction of the gated layers' work that was computed."""
        total = sum(lm.dense for lm in self.layers.values())
        return sum(lm.dense * lm.density for lm in self.layers.values()) / total if total else 1.0


class _FrameForward(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.frame(x)


def _probe(model: nn.Module, frame_shape: tuple[int, int, int]) -> tuple[nn.Module, torch.Tensor, int]:
    """What to count: (module, example input, frames the input covers).

    Per-frame models count one frame through ``model.frame``; a model that
    works on whole clips (3D convs) provides ``mac_probe(frame_shape)``.
    """
    probe = getattr(model, "mac_probe", None)
    if probe is not None:
        return probe(frame_shape)
    return _FrameForward(model), torch.zeros(1, *frame_shape), 1


def dense_macs(model: nn.Module, frame_shape: tuple[int, int, int]) -> tuple[float, dict[str, float]]:
    """fvcore count per frame of the dense network: (total, per-module MACs by name)."""
    import warnings

    with warnings.catch_warnings():  # fvcore's import uses the deprecated torch.jit.script
        warnings.simplefilter("ignore", DeprecationWarning)
        from fvcore.nn import FlopCountAnalysis

    was_training = model.training
    model.eval()
    try:
        module, example, frames = _probe(model, frame_shape)
        with torch.no_grad():
            fca = FlopCountAnalysis(module, example)
            fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            total = float(fca.total()) / frames
            per_module = {name.removeprefix("model."): float(v) / frames for name, v in fca.by_module().items()}
    finally:
        model.train(was_training)
    return total, per_module


def gated_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Layers that measure their own density (``density`` and ``gate_macs`` attributes)."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "density") and hasattr(m, "gate_macs")}


class MacCounter:
    """Effective MACs per frame from the densities the gated layers measured.

    The fvcore count of the dense network is taken once; ``report()`` then
    reads the gated layers' statistics accumulated since their last reset.
    """

    def __init__(self, model: nn.Module, frame_shape: tuple[int, int, int]) -> None:
        self.model = model
        self.total, self.per_module = dense_macs(model, frame_shape)
        self.layers = gated_layers(model)

    def report(self) -> MacReport:
        layers = {
            name: LayerMacs(dense=self.per_module.get(name, 0.0), density=m.density, gate=m.gate_macs)
            for name, m in self.layers.items()
        }
        saved = sum(lm.dense - lm.effective for lm in layers.values())
        return MacReport(dense=self.total, effective=self.total - saved, layers=layers)

    def reset(self) -> None:
        for m in self.layers.values():
            m.reset_stats()


def mac_report(model: nn.Module, frame_shape: tuple[int, int, int]) -> MacReport:
    """One-off report (counts the dense network each time)."""
    return MacCounter(model, frame_shape).report()


def reset_stats(model: nn.Module) -> None:
    for m in gated_layers(model).values():
        m.reset_stats()
