"""Single-layer speed check: gated Skip-Conv layer vs the best dense conv (issue 4's bar).

The claim to verify is wall-clock, not MACs (DESIGN.md, "latency measured on
the target device"): at a given block density, gate + block-sparse step must
beat the fastest dense PyTorch conv of the same layer. Two gated paths are
timed side by side against the same dense baseline:

- ``frame step``: what a streamed model's frame runs now, the native frame
  plan (policies/frame_step.py, csrc/conv_step.cpp): a one-layer model (a
  ``SkipConv2d`` with the input-norm gate at ε = 0 and block references) fed
  two frames that alternate A, B, A, B, ... where B differs from A only in the
  input pixels that the chosen b×b output blocks alone read. Every residual
  frame then fires exactly those blocks (against their references, which
  flip between A and B), and the gate over every block runs in the timed call.
- ``per-layer``: the older per-layer Python path, ``norm_gate_block_mask`` +
  ``accumulate_block_sparse_`` on the residual.

The gate runs inside the timed region because a real layer pays for it every frame.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gatesearch.ops import _native
from gatesearch.ops.block_sparse import accumulate_block_sparse_
from gatesearch.ops.crossover import crossover_density
from gatesearch.ops.firing import chosen_blocks, firing_residual
from gatesearch.ops.gate import block_density, norm_gate_block_mask
from gatesearch.ops.geometry import resolve_geometry
from gatesearch.ops.reference import accumulate_masked_dense_

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def sparse_residual(channels: int, size: int, kernel: int, block: int, density: float, *,
                    seed: int = 0) -> torch.Tensor:
    """(1, C, S, S) residual whose threshold-0 gate fires ~density of the b×b blocks of a C→C k×k 'same' conv
    (``firing.firing_residual``: noise on the input pixels only the chosen blocks read)."""
    gen = torch.Generator().manual_seed(seed)
    geom = resolve_geometry((1, channels, size, size), (channels, channels, kernel, kernel), stride=1,
                            padding=kernel // 2, dilation=1, groups=1, block_size=block)
    cells = geom.grid[0] * geom.grid[1]
    return firing_residual(geom, chosen_blocks(geom, min(cells, round(density * cells)), gen), gen)


def _time_interleaved(runs: dict, repeats: int, *, warmup: int = 3, before=None) -> dict:
    """Wall times (ms) per callable; rounds interleave them so load changes hit all alike. All of it in inference
    mode, as a streaming loop runs its clip (entering the mode per call would time the context, not the call).

    ``before(key)``, when given, runs untimed ahead of each timed call (the thread-count switch of
    ``bench_layer_threads``)."""
    with torch.inference_mode():
        return _time_rounds(runs, repeats, warmup, before)


def _time_rounds(runs: dict, repeats: int, warmup: int, before) -> dict:
    for key, fn in runs.items():
        for _ in range(warmup):
            if before:
                before(key)
            fn()
    times = {key: [] for key in runs}
    for _ in range(repeats):
        for key, fn in runs.items():
            if before:
                before(key)
            t0 = time.perf_counter()
            fn()
            times[key].append((time.perf_counter() - t0) * 1e3)
    return times


DENSITIES = (0.1, 0.25)  # issue 4's bars: >= 3x at 10 % of the blocks, >= 2x at 25 %
BARS = {0.1: 3.0, 0.25: 2.0}


def bench_layer(
    channels: int = 64,
    size: int = 56,
    kernel: int = 3,
    block: int = 8,
    density: float = 0.1,
    threads: int = 2,
    repeats: int = 50,
) -> dict:
    """Time one C->C k×k 'same' conv layer at batch 1: dense vs the frame step and the per-layer path.

    Every run uses ``threads`` intra-op threads in this process. Dense is the
    faster of contiguous and channels_last ``F.conv2d`` (bias included). All
    runs interleave round by round. ``speedup`` is best dense / gated by
    median time, ``speedup_min`` by fastest run (less sensitive to other load;
    ``loadavg_1min`` records it). The top-level ``density``, ``speedup``,
    ``speedup_min`` and ``max_abs_diff`` are the frame step's (``frame_step``);
    ``per_layer`` holds the per-layer path's figures.
    """
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _bench(channels, size, kernel, block, density, repeats)
    finally:
        torch.set_num_threads(saved_threads)


@dataclass(frozen=True, kw_only=True)
class _Layer:
    """One random C->C k×k 'same' conv layer and the two frames A, B = A + a residual on the chosen blocks."""

    weight: torch.Tensor
    bias: torch.Tensor
    frame_a: torch.Tensor  # contiguous
    frame_b: torch.Tensor
    residual: torch.Tensor  # B - A
    pad: int


def _layer(channels: int, size: int, kernel: int, block: int, density: float) -> _Layer:
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(channels, channels, kernel, kernel, generator=gen) / math.sqrt(channels * kernel * kernel)
    bias = torch.randn(channels, generator=gen)
    x = torch.randn(1, channels, size, size, generator=gen)
    r = sparse_residual(channels, size, kernel, block, density)
    return _Layer(weight=weight, bias=bias, frame_a=x, frame_b=x + r, residual=r, pad=kernel // 2)


class _OneLayer(nn.Module):
    """The smallest model the frame step plans: one skip-conv, its frame as ``frame_layers``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def frame_layers(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class FrameStepLayer:
    """The layer as a streamed model runs it: ``SkipConv2d`` (input-norm gate, ε = 0, block references, path
    "auto") planned by ``FrameStep``, frames alternating A, B, A, B, ... (both channels_last, as a layer inside a
    streamed network receives them).

    ``start()`` runs the dense reference frame A; each ``step()`` one residual frame.
    """

    def __init__(self, spec: _Layer, block: int) -> None:
        from gatesearch.policies.frame_step import FrameStep
        from gatesearch.policies.norm_gates import NormGate
        from gatesearch.policies.skipconv import SkipConv2d

        c_out, c_in, k, _ = spec.weight.shape
        conv = nn.Conv2d(c_in, c_out, k, padding=spec.pad)
        with torch.no_grad():
            conv.weight.copy_(spec.weight)
            conv.bias.copy_(spec.bias)
        self.layer = SkipConv2d(conv, NormGate(0.0, output_norm=False), block_size=block, reference="block")
        self.model = _OneLayer(self.layer).eval()
        self.runner = FrameStep()
        cl = torch.channels_last
        self.frames = (spec.frame_a.contiguous(memory_format=cl), spec.frame_b.contiguous(memory_format=cl))
        self.spec = spec
        self.index = 0  # frames fed so far
        self.out: torch.Tensor | None = None

    def start(self) -> torch.Tensor:
        self.layer.streaming = True
        self.layer.reset_state()
        self.index = 0
        return self.step()

    def stop(self) -> None:
        self.layer.streaming = False
        self.layer.reset_state()

    def step(self) -> torch.Tensor:
        if torch.is_grad_enabled():  # the plan steps aside while autograd records; timing loops enter the mode once
            with torch.inference_mode():
                return self.step()
        x = self.frames[self.index % 2]
        self.index += 1
        out = self.runner(self.model, x)
        if out is None:
            raise RuntimeError("the frame step did not plan the layer: " + (self.runner._failed or "stepped aside"))
        self.out = out
        return out

    def planned(self) -> bool:
        return self.runner._program is not None

    def last_mask(self) -> torch.Tensor | None:
        """The block mask of the last frame (None: a reference frame)."""
        return self.runner._program.plan.masks()[0]

    def check(self) -> dict:
        """Two more residual frames, each against the masked dense formulation (Eq. 3: z_{t-1} + mask ⊙ conv(x_t -
        x_{t-1}), no bias) and against the dense conv of its frame (bias included; after every frame so far)."""
        s = self.spec
        masked, dense, fired = 0.0, 0.0, []
        for _ in range(2):
            x_prev = self.frames[(self.index - 1) % 2]
            z_prev = self.out.clone()
            z = self.step().clone()
            x = self.frames[(self.index - 1) % 2]
            mask = self.last_mask()
            ref = accumulate_masked_dense_(z_prev, x - x_prev, s.weight, mask, block_size=self.layer.block_size,
                                           padding=s.pad)
            masked = max(masked, float((z - ref).abs().max()))
            dense = max(dense, float((z - F.conv2d(x, s.weight, s.bias, 1, s.pad)).abs().max()))
            fired.append(float(mask.float().mean()))
        return {"max_abs_diff_masked": masked, "max_abs_diff_dense": dense, "check_densities": fired}


def _bench(channels, size, kernel, block, density, repeats) -> dict:
    gen = torch.Generator().manual_seed(2)
    spec = _layer(channels, size, kernel, block, density)
    weight, bias, pad, x, r = spec.weight, spec.bias, spec.pad, spec.frame_a, spec.residual
    geom = resolve_geometry(r.shape, weight.shape, stride=1, padding=pad, dilation=1, groups=1, block_size=block)
    gate_args = dict(kernel_size=kernel, padding=pad, block_size=block, threshold=0.0)
    conv_args = dict(block_size=block, padding=pad)

    result = {
        "channels": channels, "size": size, "kernel": kernel, "block": block, "threads": torch.get_num_threads(),
        "requested_density": density, "native": _native.available(),
    }
    runs, diffs, per_layer = {}, [], {}
    for name, fmt in LAYOUTS.items():
        xl, wl = x.contiguous(memory_format=fmt), weight.contiguous(memory_format=fmt)
        rl = r.contiguous(memory_format=fmt)
        z = torch.zeros(1, channels, *geom.out_hw).contiguous(memory_format=fmt)
        mask = norm_gate_block_mask(rl, **gate_args)
        per_layer["density"] = float(block_density(mask, geom.out_hw, block)[0])
        crossover_density(geom, batch=1, channels_last=name == "channels_last")  # calibrate before timing

        def step(path: str, rl=rl, z=z) -> None:
            m = norm_gate_block_mask(rl, **gate_args)
            accumulate_block_sparse_(z, rl, weight, m, path=path, **conv_args)

        runs["dense", name] = lambda xl=xl, wl=wl: F.conv2d(xl, wl, bias, 1, pad)
        runs["sparse", name] = lambda step=step: step("sparse")
        runs["auto", name] = lambda step=step: step("auto")

        z0 = torch.randn(z.shape, generator=gen).contiguous(memory_format=fmt)
        ref = accumulate_masked_dense_(z0.clone(), rl, weight, mask, **conv_args)
        got = accumulate_block_sparse_(z0.clone(), rl, weight, mask, path="sparse", **conv_args)
        diffs.append(float((got - ref).abs().max()))

    native = None
    if _native.available():
        native = FrameStepLayer(spec, block)
        native.start()  # the dense reference frame A (plans the model)
        native.layer.reset_stats()
        runs["frame_step"] = native.step

    times = _time_interleaved(runs, repeats)
    dense_ms = {name: statistics.median(times["dense", name]) for name in LAYOUTS}
    dense_min_ms = {name: min(times["dense", name]) for name in LAYOUTS}
    result["dense_ms"], result["dense_min_ms"] = dense_ms, dense_min_ms
    result["best_dense_ms"] = best_dense = min(dense_ms.values())
    best_dense_min = min(dense_min_ms.values())
    for kind in ("sparse", "auto"):
        per_layer[f"{kind}_ms"] = {name: statistics.median(times[kind, name]) for name in LAYOUTS}
        per_layer[f"{kind}_min_ms"] = {name: min(times[kind, name]) for name in LAYOUTS}
    per_layer["crossover"] = {
        name: crossover_density(geom, batch=1, channels_last=name == "channels_last") for name in LAYOUTS
    }
    per_layer["best_ms"] = min(per_layer["sparse_ms"].values())
    per_layer["speedup"] = best_dense / per_layer["best_ms"]
    per_layer["speedup_min"] = best_dense_min / min(per_layer["sparse_min_ms"].values())
    per_layer["max_abs_diff"] = max(diffs)
    result["per_layer"] = per_layer

    if native is not None:
        layer = native.layer
        frames = layer.frames  # every timed (and warm-up) residual frame, recorded by the plan
        fired = layer.density_sum / frames  # mean fraction of output positions recomputed per frame
        row = {"frames": frames, "density": fired, **native.check(), "planned": native.planned(),
               "ms": statistics.median(times["frame_step"]), "min_ms": min(times["frame_step"])}
        native.stop()
        row["speedup"] = best_dense / row["ms"]
        row["speedup_min"] = best_dense_min / row["min_ms"]
        row["max_abs_diff"] = row["max_abs_diff_masked"]
        result["frame_step"] = row
        headline = row
    else:  # no C++ kernels: only the per-layer path (its torch fallback) runs
        headline = per_layer
    for key in ("density", "speedup", "speedup_min", "max_abs_diff"):
        result[key] = headline[key]
    result["loadavg_1min"] = os.getloadavg()[0]
    return result


def bench_layer_threads(
    channels: int = 64, size: int = 56, kernel: int = 3, block: int = 8, density: float = 0.1, repeats: int = 50,
) -> dict:
    """The second core's share for one layer: dense and the frame step at 1 and 2 threads, the thread count
    switching round by round (so drift hits both alike). Gain = t1 / t2 (medians); share = (frame step gain - 1) /
    (dense gain - 1), what issue 18 asks to be >= 0.8 for whole networks."""
    spec = _layer(channels, size, kernel, block, density)
    saved = torch.get_num_threads()
    native = FrameStepLayer(spec, block)
    xl = spec.frame_a.contiguous(memory_format=torch.channels_last)
    wl = spec.weight.contiguous(memory_format=torch.channels_last)
    xc = spec.frame_a
    runs = {}
    for t in (1, 2):
        runs["dense_nchw", t] = lambda: F.conv2d(xc, spec.weight, spec.bias, 1, spec.pad)
        runs["dense_cl", t] = lambda: F.conv2d(xl, wl, spec.bias, 1, spec.pad)
        runs["frame_step", t] = native.step
    try:
        torch.set_num_threads(1)
        native.start()
        times = _time_interleaved(runs, repeats, before=lambda key: torch.set_num_threads(key[1]))
    finally:
        native.stop()
        torch.set_num_threads(saved)
    med = {key: statistics.median(v) for key, v in times.items()}
    dense = {t: min(med["dense_nchw", t], med["dense_cl", t]) for t in (1, 2)}
    gated = {t: med["frame_step", t] for t in (1, 2)}
    dense_gain, gated_gain = dense[1] / dense[2], gated[1] / gated[2]
    share = (gated_gain - 1) / (dense_gain - 1) if dense_gain > 1 else float("nan")
    return {"channels": channels, "size": size, "kernel": kernel, "block": block, "requested_density": density,
            "dense_ms_1": dense[1], "dense_ms_2": dense[2], "gated_ms_1": gated[1], "gated_ms_2": gated[2],
            "dense_gain": dense_gain, "gated_gain": gated_gain, "gain_share": share,
            "speedup_1": dense[1] / gated[1], "speedup_2": dense[2] / gated[2],
            "loadavg_1min": os.getloadavg()[0]}


def layer_rows(result: dict) -> list[dict]:
    """One result of ``bench_layer`` as table rows: the frame step, then the per-layer path."""
    rows = []
    if "frame_step" in result:
        fs = result["frame_step"]
        rows.append({"path": "frame step", "density": fs["density"], "gated_ms": fs["ms"],
                     "speedup": fs["speedup"], "speedup_min": fs["speedup_min"],
                     "max_abs_diff": fs["max_abs_diff_masked"], "max_abs_diff_dense": fs["max_abs_diff_dense"]})
    pl = result["per_layer"]
    rows.append({"path": "per-layer", "density": pl["density"], "gated_ms": pl["best_ms"], "speedup": pl["speedup"],
                 "speedup_min": pl["speedup_min"], "max_abs_diff": pl["max_abs_diff"], "max_abs_diff_dense": None})
    issue4 = (result["channels"], result["size"], result["kernel"], result["block"]) == (64, 56, 3, 8)
    bar = BARS.get(result["requested_density"]) if issue4 else None  # the bars are for that layer only
    for row in rows:
        row.update(block=result["block"], requested_density=result["requested_density"],
                   dense_ms=result["best_dense_ms"], bar=bar, met=None if bar is None else row["speedup"] >= bar)
    return rows


def layer_table(results: list[dict]) -> list[str]:
    """``gatesearch bench --layer``'s lines: one row per (block size, density, path)."""
    first = results[0]
    out = [f"layer: {first['channels']}ch {first['size']}² {first['kernel']}x{first['kernel']} 'same', "
           f"{first['threads']} threads; dense = best of contiguous / channels_last F.conv2d (bias)",
           f"{'b':>2} {'req.':>5} {'path':<10} {'fired':>6} {'dense ms':>9} {'gated ms':>9} {'speedup':>8} "
           f"{'(min)':>7} {'|diff| masked':>14} {'|diff| dense':>13}  bar"]
    for result in results:
        for row in layer_rows(result):
            dense_diff = "-" if row["max_abs_diff_dense"] is None else f"{row['max_abs_diff_dense']:.1e}"
            bar = "-" if row["bar"] is None else f">= {row['bar']:g}x {'met' if row['met'] else 'NOT met'}"
            out.append(f"{row['block']:>2} {row['requested_density']:>5.2f} {row['path']:<10} {row['density']:>6.3f} "
                       f"{row['dense_ms']:>9.3f} {row['gated_ms']:>9.3f} {row['speedup']:>7.2f}x "
                       f"{row['speedup_min']:>6.2f}x {row['max_abs_diff']:>14.1e} {dense_diff:>13}  {bar}")
    return out
