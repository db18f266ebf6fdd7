"""Single-layer speed check: block-sparse Skip-Conv step vs the best dense conv.

The claim to verify is wall-clock, not MACs (DESIGN.md, "latency measured on
the target device"): at a given block density, gate + block-sparse accumulate
must beat the fastest dense PyTorch conv of the same layer. The residual is
built so that the threshold-0 input-norm gate (Skip-Convolutions, Eq. 5)
activates the requested fraction of b×b blocks; the gate runs inside the timed
region because a real layer pays for it every frame.
"""

from __future__ import annotations

import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

from gatesearch.ops import _native
from gatesearch.ops.block_sparse import accumulate_block_sparse_
from gatesearch.ops.crossover import crossover_density
from gatesearch.ops.gate import block_density, norm_gate_block_mask
from gatesearch.ops.geometry import resolve_geometry
from gatesearch.ops.reference import accumulate_masked_dense_

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def sparse_residual(channels: int, size: int, kernel: int, block: int, density: float, *,
                    seed: int = 0) -> torch.Tensor:
    """(1, C, S, S) residual whose threshold-0 gate activates ~density of the b×b blocks.

    Each chosen block gets noise on the input pixels that only its own outputs
    read (stride 1, 'same' padding); when b < k no such pixel exists and one
    pixel in the block's centre is used, which may wake a neighbour block.
    """
    gen = torch.Generator().manual_seed(seed)
    pad = kernel // 2
    grid = math.ceil(size / block)
    count = min(grid * grid, round(density * grid * grid))
    r = torch.zeros(1, channels, size, size)
    for cell in torch.randperm(grid * grid, generator=gen)[:count].tolist():
        by, bx = divmod(cell, grid)
        ys = _own_inputs(by * block, block, kernel, pad, size)
        xs = _own_inputs(bx * block, block, kernel, pad, size)
        r[:, :, ys, xs] = torch.randn(1, channels, ys.stop - ys.start, xs.stop - xs.start, generator=gen)
    return r


def _own_inputs(start: int, block: int, kernel: int, pad: int, size: int) -> slice:
    end = min(start + block, size)  # outputs [start, end) of this block
    lo, hi = start + kernel - 1 - pad, end - 1 - pad  # inputs read only by those outputs
    lo, hi = max(lo, 0), min(hi, size - 1)
    if lo > hi:
        centre = min(start + (end - start) // 2, size - 1)
        return slice(centre, centre + 1)
    return slice(lo, hi + 1)


def _time_interleaved(runs: dict, repeats: int) -> dict:
    """Wall times (ms) per callable; rounds interleave them so load changes hit all alike."""
    for fn in runs.values():
        for _ in range(3):
            fn()
    times = {key: [] for key in runs}
    for _ in range(repeats):
        for key, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[key].append((time.perf_counter() - t0) * 1e3)
    return times


def bench_layer(
    channels: int = 64,
    size: int = 56,
    kernel: int = 3,
    block: int = 8,
    density: float = 0.1,
    threads: int = 2,
    repeats: int = 50,
) -> dict:
    """Time one C->C k×k 'same' conv layer at batch 1: dense vs gate + block-sparse step.

    Both sides run with ``threads`` intra-op threads in this process. Dense is
    the faster of contiguous and channels_last ``F.conv2d`` (bias included);
    sparse is ``norm_gate_block_mask`` + ``accumulate_block_sparse_(path="sparse")``
    per layout. All runs are interleaved round by round. ``speedup`` compares
    the best layout of each by median time, ``speedup_min`` by fastest run (less
    sensitive to other load on the machine; ``loadavg_1min`` records it).
    ``max_abs_diff`` is against ``accumulate_masked_dense_``.
    """
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _bench(channels, size, kernel, block, density, repeats)
    finally:
        torch.set_num_threads(saved_threads)


def _bench(channels, size, kernel, block, density, repeats) -> dict:
    gen = torch.Generator().manual_seed(1)
    pad = kernel // 2
    weight = torch.randn(channels, channels, kernel, kernel, generator=gen) / math.sqrt(channels * kernel * kernel)
    bias = torch.randn(channels, generator=gen)
    x = torch.randn(1, channels, size, size, generator=gen)
    r = sparse_residual(channels, size, kernel, block, density)
    geom = resolve_geometry(r.shape, weight.shape, stride=1, padding=pad, dilation=1, groups=1, block_size=block)
    gate_args = dict(kernel_size=kernel, padding=pad, block_size=block, threshold=0.0)
    conv_args = dict(block_size=block, padding=pad)

    result = {
        "channels": channels, "size": size, "kernel": kernel, "block": block, "threads": torch.get_num_threads(),
        "requested_density": density, "native": _native.available(),
    }
    runs, diffs = {}, []
    for name, fmt in LAYOUTS.items():
        xl, wl = x.contiguous(memory_format=fmt), weight.contiguous(memory_format=fmt)
        rl = r.contiguous(memory_format=fmt)
        z = torch.zeros(1, channels, *geom.out_hw).contiguous(memory_format=fmt)
        mask = norm_gate_block_mask(rl, **gate_args)
        result["density"] = float(block_density(mask, geom.out_hw, block)[0])
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

    times = _time_interleaved(runs, repeats)
    for kind in ("dense", "sparse", "auto"):
        result[f"{kind}_ms"] = {name: statistics.median(times[kind, name]) for name in LAYOUTS}
        result[f"{kind}_min_ms"] = {name: min(times[kind, name]) for name in LAYOUTS}
    result["crossover"] = {
        name: crossover_density(geom, batch=1, channels_last=name == "channels_last") for name in LAYOUTS
    }
    result["best_dense_ms"] = min(result["dense_ms"].values())
    result["best_sparse_ms"] = min(result["sparse_ms"].values())
    result["speedup"] = result["best_dense_ms"] / result["best_sparse_ms"]
    result["speedup_min"] = min(result["dense_min_ms"].values()) / min(result["sparse_min_ms"].values())
    result["max_abs_diff"] = max(diffs)
    result["loadavg_1min"] = os.getloadavg()[0]
    return result
