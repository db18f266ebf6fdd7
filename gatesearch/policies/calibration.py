"""One knob for all layers: a per-layer ε for the norm gates, set from a target on calibration clips.

Skip-Convolutions share one ε across layers and leave layer-specific thresholds
open (Section 3.2.1); DeltaCNN tunes a threshold per layer. One shared ε fits
no network: the same value skips almost everything in early layers and nothing
in deep ones (layer4 of ResNet-18 stays at density 0.4-0.5 while the stem
skips nearly all). Here the user names what they accept and every layer gets
its own ε (in the gate's own units, ``per_value`` and ``output_norm`` included):

- ``density`` D: each layer computes a fraction D of its outputs on residual
  frames. Greedy from the first layer in execution order: a layer's input
  depends only on layers that ran before it, so once their ε are fixed, the
  layer's density is a function of its own ε alone and the targets hold
  together on the calibration clips.
- ``error`` E: each layer's own output error — ‖z − z_dense‖ / ‖z_dense‖ over the
  residual frames, every other layer computing its dense output — stays at most
  E. A layer's ε then depends on E alone, so a tighter target never gives a
  larger ε. The errors of successive layers compound: the network's output
  error that results is what ``gatesearch bench`` reports (``objectives.fidelity``).

Each layer's ε is found by bisection on log₂ ε over a fixed bracket, keeping
the largest ε that met the target. On the same measurements, a tighter target
fails at least where a looser one does, so its bisection ends no higher.
Thresholds go into exported artifacts (``layer_thresholds`` in gatesearch.json).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from gatesearch.stateful import reset_state, streaming

from .norm_gates import NormGate
from .skipconv import SkipConv2d

TARGETS = ("density", "error")
LOG2_BRACKET = (-24.0, 24.0)  # ε from 6e-8 to 1.7e7: per-value ε near 0.01, output-norm sums in the thousands
STEPS = 12  # bisection steps: the bracket's 48 octaves to 0.012 of an octave (0.8 % in ε)


@dataclass(frozen=True, kw_only=True)
class LayerThreshold:
    threshold: float  # the layer's ε
    measured: float  # its density, or its own output error, at that ε on the calibration clips


class _Stop(Exception):
    """Raised after the layer being calibrated: nothing after it can change what it sees."""


def norm_layers(model: nn.Module) -> dict[str, SkipConv2d]:
    """The norm-gated layers of ``model`` by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SkipConv2d) and isinstance(m.gate, NormGate)}


def layer_thresholds(model: nn.Module) -> dict[str, float]:
    """Each norm-gated layer's ε, by module name (what an artifact stores)."""
    return {name: layer.gate.threshold for name, layer in norm_layers(model).items()}


def set_layer_thresholds(model: nn.Module, thresholds: Mapping[str, float]) -> None:
    """Give each named norm-gated layer its ε; a name that is not one, or a value that is not a number ≥ 0, is a
    ValueError naming it. Layers not named keep theirs."""
    layers = norm_layers(model)
    for name, value in thresholds.items():
        if name not in layers:
            raise ValueError(f"layer threshold for {name!r}: no norm-gated layer of that name")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"layer threshold for {name!r}: expected a number >= 0, got {value!r}")
    for name, value in thresholds.items():
        layers[name].gate.threshold = float(value)
        layers[name].reset_state()  # the gate's arguments are resolved once per clip


def calibrate_thresholds(model: nn.Module, clips: torch.Tensor, *, target: str, value: float,
                         reset_every: int | None = None, steps: int = STEPS) -> dict[str, LayerThreshold]:
    """Set every norm-gated layer's ε so that it meets ``target`` (``"density"`` or ``"error"``) at ``value`` on
    ``clips`` (B, T, 3, H, W), streamed frame by frame; returns what each layer got. Layers the task never runs
    (a heatmap head skips the deep stages) keep their ε."""
    if target not in TARGETS:
        raise ValueError(f"calibration target must be one of {', '.join(TARGETS)}, got {target!r}")
    if not value > 0 or (target == "density" and value > 1):
        raise ValueError(f"a {target} target must be in {'(0, 1]' if target == 'density' else '(0, inf)'}, "
                         f"got {value!r}")
    if clips.shape[1] < 2:
        raise ValueError("calibration needs clips of at least 2 frames (residual frames are what is measured)")
    model.eval()
    order = _execution_order(model, clips)
    found: dict[str, LayerThreshold] = {}
    with torch.inference_mode():
        for layer in order.values():
            layer.gate.threshold = 0.0  # exact: only residuals that are exactly zero are skipped
        # the largest ε that still computes a fraction D / that adds an error of at most E
        probe, fits = {"density": (_density_probe, lambda m: m >= value),
                       "error": (_error_probe, lambda m: m <= value)}[target]
        for name, layer in order.items():
            found[name] = _bisect(layer, probe(model, layer, clips, reset_every), fits, steps)
            if target == "error":
                layer.gate.threshold = 0.0  # the next layers are measured against dense activations
        set_layer_thresholds(model, {name: lt.threshold for name, lt in found.items()})
    return found


def _bisect(layer: SkipConv2d, measure: Callable[[], float], fits: Callable[[float], bool],
            steps: int) -> LayerThreshold:
    """The largest ε on the log₂ bracket (to ``steps`` halvings) whose measure fits; the low end if none does."""
    lo, hi = LOG2_BRACKET
    best = None
    for _ in range(steps):
        mid = (lo + hi) / 2
        layer.gate.threshold = 2.0**mid
        m = measure()
        if fits(m):
            lo, best = mid, m
        else:
            hi = mid
    layer.gate.threshold = 2.0**lo
    return LayerThreshold(threshold=2.0**lo, measured=best if best is not None else measure())


def _execution_order(model: nn.Module, clips: torch.Tensor) -> dict[str, SkipConv2d]:
    """The norm-gated layers that run on a frame, in the order they run."""
    layers = norm_layers(model)
    seen: list[str] = []
    handles = [layer.register_forward_hook(lambda m, i, o, name=name: seen.append(name))
               for name, layer in layers.items()]
    try:
        with torch.inference_mode():
            model.frame(clips[:1, 0])
    finally:
        for h in handles:
            h.remove()
    return {name: layers[name] for name in dict.fromkeys(seen)}


def _stream_until(model: nn.Module, layer: SkipConv2d, clips: torch.Tensor, reset_every: int | None,
                  on_frame: Callable[[int, torch.Tensor], None]) -> None:
    """Stream ``clips`` through ``model`` up to ``layer`` on every frame; ``on_frame(t, layer output)``."""
    t_now = [0]

    def hook(module, inputs, output):
        on_frame(t_now[0], output)
        raise _Stop

    handle = layer.register_forward_hook(hook)
    try:
        with streaming(model):
            for t in range(clips.shape[1]):
                if reset_every and t and t % reset_every == 0:
                    reset_state(model)
                t_now[0] = t
                try:
                    model.frame(clips[:, t])
                except _Stop:
                    pass
    finally:
        handle.remove()


def _residual(t: int, reset_every: int | None) -> bool:
    """Whether frame t is a residual frame (not a dense reference frame)."""
    return t > 0 and not (reset_every and t % reset_every == 0)


def _density_probe(model: nn.Module, layer: SkipConv2d, clips: torch.Tensor,
                   reset_every: int | None) -> Callable[[], float]:
    """The layer's computed fraction over the residual frames at its current ε, from its ``FrameAverages`` sums."""

    def measure() -> float:
        last = [layer.frames, layer.density_sum]
        frames, density = 0, 0.0

        def on_frame(t: int, output: torch.Tensor) -> None:
            nonlocal frames, density
            if _residual(t, reset_every):
                frames += layer.frames - last[0]
                density += layer.density_sum - last[1]
            last[:] = [layer.frames, layer.density_sum]

        _stream_until(model, layer, clips, reset_every, on_frame)
        return density / max(frames, 1)

    return measure


def _error_probe(model: nn.Module, layer: SkipConv2d, clips: torch.Tensor,
                 reset_every: int | None) -> Callable[[], float]:
    """The layer's own relative output error over the residual frames at its current ε, against its output at
    ε = 0 (every change computed), recorded once here with the layers before it at theirs."""
    saved = layer.gate.threshold
    layer.gate.threshold = 0.0
    exact: dict[int, torch.Tensor] = {}
    _stream_until(model, layer, clips, reset_every,
                  lambda t, output: exact.__setitem__(t, output.clone()) if _residual(t, reset_every) else None)
    layer.gate.threshold = saved
    norm = math.sqrt(sum(float(z.square().sum()) for z in exact.values()))

    def measure() -> float:
        err = 0.0

        def on_frame(t: int, output: torch.Tensor) -> None:
            nonlocal err
            if t in exact:
                err += float((output - exact[t]).square().sum())

        _stream_until(model, layer, clips, reset_every, on_frame)
        return math.sqrt(err) / max(norm, torch.finfo(torch.float32).tiny)

    return measure
