"""The density above which the dense conv beats the block-sparse step, measured.

Why measure: the block-sparse step costs a fixed overhead (gate bookkeeping,
GEMM call) plus a per-row cost (gather, GEMM, scatter) that grows linearly
with density, while the dense conv's cost is flat; where the two lines cross
depends on the layer shape, the thread count and the chip. A short
calibration (< 0.5 s) times the dense path and the sparse path at two
densities on random data, fits the line, and solves for the crossing. Results
are cached per layer signature in-process and on disk (``crossover.json``
under ``$GATESEARCH_CACHE_DIR`` or ``~/.cache/gatesearch``; set
``GATESEARCH_NO_DISK_CACHE=1`` to skip the file).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path

import torch

from gatesearch.ops import _native
from gatesearch.ops.gate import block_density
from gatesearch.ops.geometry import ConvGeometry

_memo: dict[str, float] = {}
_lock = threading.Lock()

BUDGET_S = 0.3  # timed part of one calibration; warm-up and setup come on top
LOW, HIGH = 0.2, 0.8  # block densities of the two sparse measurements


def crossover_density(geom: ConvGeometry, *, batch: int, channels_last: bool) -> float:
    """Fraction of output positions up to which the per-layer sparse path is faster (in [0, 1])."""
    return _cached(_key(geom, batch, channels_last), lambda: calibrate(geom, batch=batch, channels_last=channels_last))


def plan_crossover(geom: ConvGeometry) -> float:
    """Fraction of output positions up to which a native frame plan's skip-conv step beats the dense conv.

    Measured on the plan's own step (``calibrate_plan``), not on the per-layer path: that path pays Python and
    dispatch per call, so on small layers its crossover is 0 ("always dense"), while the plan's per-block kernel
    pays none of it and wins up to high densities (small nets ran 1.6-2x slower with the per-layer crossover)."""
    return _cached("plan|" + _key(geom, 1, True), lambda: calibrate_plan(geom))


def _cached(key: str, measure) -> float:
    """The crossover under ``key``: in-process, else on disk, else ``measure()`` (kept on disk when stable)."""
    rho = _memo.get(key)
    if rho is not None:
        return rho
    with _lock:
        rho = _memo.get(key)
        if rho is None:
            rho = _disk_load().get(key)
        if rho is None:
            result = measure()
            rho = result["crossover"]
            if result.get("stable", True):
                _disk_store(key, rho)
        _memo[key] = rho
    return rho


def clear_cache() -> None:
    """Forget in-process results (the disk file is left alone)."""
    _memo.clear()


def calibrate(
    geom: ConvGeometry, *, batch: int = 1, channels_last: bool = True, budget_s: float | None = None
) -> dict:
    """Time dense vs sparse for ``geom`` on random data and solve for the crossing density.

    Sparse times are fit as a + c * density; the crossover is (dense - a) / c
    clipped to [0, 1]. The timed rounds are split in two halves that must agree
    (and the machine must not be oversubscribed); otherwise the result is
    marked unstable, pulled towards 0.5 (a bounded loss either way) and not
    written to disk. Returns {"crossover", "stable", "dense_ms", "sparse_ms": {density: ms}}.
    """
    with torch.inference_mode(False):  # callers are often in inference mode; the cache needs normal tensors
        return _calibrate(geom, batch=batch, channels_last=channels_last, budget_s=budget_s)


def _calibrate(geom: ConvGeometry, *, batch: int, channels_last: bool, budget_s: float | None) -> dict:
    from gatesearch.ops.block_sparse import accumulate_block_sparse_, accumulate_dense_

    gen = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ci, co = geom.in_channels, geom.out_channels
    r = torch.randn(batch, ci, *geom.in_hw, generator=gen).contiguous(memory_format=fmt)
    z = torch.zeros(batch, co, *geom.out_hw).contiguous(memory_format=fmt)
    weight = torch.randn(co, ci // geom.groups, *geom.kernel, generator=gen)
    args = dict(block_size=geom.block, stride=geom.stride, padding=geom.padding, dilation=geom.dilation,
                groups=geom.groups)

    hb, wb = geom.grid
    blocks = hb * wb
    counts = sorted({max(1, round(LOW * blocks)), max(1, round(HIGH * blocks))})
    masks = []
    for count in counts:
        mask = torch.zeros(batch, blocks, dtype=torch.bool)
        for s in range(batch):
            mask[s, torch.randperm(blocks, generator=gen)[:count]] = True
        masks.append(mask.view(batch, hb, wb))
    densities = [float(block_density(m, geom.out_hw, geom.block).mean()) for m in masks]
    full = torch.ones(batch, hb, wb, dtype=torch.bool)

    runs = [lambda: accumulate_dense_(z, r, weight, full, geom)]
    runs += [lambda m=m: accumulate_block_sparse_(z, r, weight, m, path="sparse", **args) for m in masks]
    return _fit(runs, densities, BUDGET_S if budget_s is None else budget_s)


def _fit(runs: list, densities: list[float], budget_s: float) -> dict:
    """Time ``runs`` (the dense conv, then the sparse step at each of ``densities``) and solve for the crossing.

    The timed rounds are split in two halves that must agree (and the machine must not be oversubscribed);
    otherwise the result is marked unstable and pulled towards 0.5 (a bounded loss either way)."""
    first, second = _time_interleaved(runs, budget_s)
    best = [min(a, b) for a, b in zip(first, second)]
    rho = _solve(best[0], best[1:], densities)
    agree = abs(_solve(first[0], first[1:], densities) - _solve(second[0], second[1:], densities)) <= 0.1
    stable = agree and not _busy()
    if not stable:
        rho = min(0.7, max(0.3, rho))
    return {"crossover": rho, "stable": stable, "dense_ms": best[0], "sparse_ms": dict(zip(densities, best[1:]))}


def calibrate_plan(geom: ConvGeometry, *, budget_s: float | None = None) -> dict:
    """Time a one-step frame plan (csrc/conv_step.cpp: gate + per-block kernel or gathered GEMM) at two densities
    against the dense conv, on random data; the same fit and stability rules as ``calibrate``.

    Frames alternate A, B, A, B, ... (``firing``: B differs from A where the chosen blocks read), so with ε = 0
    and block references every residual frame recomputes the same blocks (and any neighbour that shares their
    pixels: the densities fitted are the ones the plan reports, ``FramePlan.rows``)."""
    with torch.inference_mode(False):
        return _calibrate_plan(geom, BUDGET_S if budget_s is None else budget_s)


def _calibrate_plan(geom: ConvGeometry, budget_s: float) -> dict:
    import torch.nn.functional as F

    from gatesearch.ops.firing import chosen_blocks, firing_residual
    from gatesearch.ops.packing import kernel_kind, onednn_weight, packed_weight

    gen = torch.Generator().manual_seed(0)
    ci, co, groups = geom.in_channels, geom.out_channels, geom.groups
    weight = torch.randn(co, ci // groups, *geom.kernel, generator=gen)
    kind = kernel_kind(in_per_group=ci // groups)
    x = torch.randn(1, ci, *geom.in_hw, generator=gen).contiguous(memory_format=torch.channels_last)
    (hb, wb), total = geom.grid, geom.out_hw[0] * geom.out_hw[1]
    steps, densities = [], []
    for count in sorted({max(1, round(LOW * hb * wb)), max(1, round(HIGH * hb * wb))}):
        other = (x + firing_residual(geom, chosen_blocks(geom, count, gen), gen)).contiguous(
            memory_format=torch.channels_last)
        plan = _native.module().FramePlan()
        out = plan.conv(0, geom.ints(), int(kind), 1, packed_weight(weight, kind, groups),
                        onednn_weight(weight, kind, groups), weight, None, 0.0, 1.0, total)
        plan.run(x, True, [out])
        plan.run(other, False, [out])
        densities.append(plan.rows()[0] / total)
        frames = (x, other)
        flip = [0]

        def step(plan=plan, frames=frames, flip=flip, out=out) -> None:
            plan.run(frames[flip[0]], False, [out])
            flip[0] ^= 1

        steps.append(step)
    if len(densities) == 2 and densities[1] <= densities[0]:  # the pixels' other readers filled the grid
        steps, densities = steps[1:], densities[1:]
    dense = lambda: F.conv2d(x, weight, None, geom.stride, geom.padding, geom.dilation, groups)
    return _fit([dense, *steps], densities, budget_s)


def _solve(dense_ms: float, sparse_ms: list[float], densities: list[float]) -> float:
    """Density where the fitted sparse line meets the dense time, in [0, 1]."""
    if len(sparse_ms) == 1:  # one block (or a tiny grid): all or nothing
        return 1.0 if sparse_ms[0] < dense_ms else 0.0
    slope = (sparse_ms[1] - sparse_ms[0]) / (densities[1] - densities[0])
    if slope <= 0:
        return 1.0 if sparse_ms[1] < dense_ms else 0.0
    intercept = sparse_ms[0] - slope * densities[0]
    return min(1.0, max(0.0, (dense_ms - intercept) / slope))


def _busy() -> bool:
    """More runnable work than cores: timings now say little about an idle machine."""
    try:
        return os.getloadavg()[0] > (os.cpu_count() or 1) + 0.5
    except OSError:
        return False


def _time_interleaved(runs, budget_s: float) -> tuple[list[float], list[float]]:
    """Best wall time (ms) per callable over the odd and over the even rounds.

    Rounds interleave the callables so a load spike hits them alike.
    """
    round_s = 0.0
    for fn in runs:  # warm-up: kernel creation, allocator, weight packing
        fn()
        t0 = time.perf_counter()
        fn()
        round_s += time.perf_counter() - t0
    reps = 2 * int(min(10, max(1, budget_s / max(round_s, 1e-6) / 2)))
    halves = ([float("inf")] * len(runs), [float("inf")] * len(runs))
    for rep in range(reps):
        best = halves[rep % 2]
        for i, fn in enumerate(runs):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], (time.perf_counter() - t0) * 1e3)
    return halves


def _key(geom: ConvGeometry, batch: int, channels_last: bool) -> str:
    backend = _native.build_tag() if _native.available() else f"torch-{_native.machine_tag()}"
    fields = (
        geom.in_channels, geom.out_channels, geom.groups, geom.in_hw, geom.kernel,
        geom.stride, geom.padding, geom.dilation, geom.block,
    )
    layout = "cl" if channels_last else "nchw"
    return f"{backend}|torch{torch.__version__}|t{torch.get_num_threads()}|n{batch}|{layout}|{fields}"


def _cache_file() -> Path | None:
    if os.environ.get("GATESEARCH_NO_DISK_CACHE") == "1":
        return None
    return _native.cache_root() / "crossover.json"


def _disk_load() -> dict[str, float]:
    path = _cache_file()
    if path is None:
        return {}
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            return {k: float(v) for k, v in data.items()}
    return {}


def _disk_store(key: str, rho: float) -> None:
    path = _cache_file()
    if path is None:
        return
    with contextlib.suppress(OSError):
        data = _disk_load()
        data[key] = rho
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=0, sort_keys=True))
        os.replace(tmp, path)
