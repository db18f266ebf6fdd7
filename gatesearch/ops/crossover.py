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
    """Fraction of output positions up to which the sparse path is faster (in [0, 1])."""
    key = _key(geom, batch, channels_last)
    rho = _memo.get(key)
    if rho is not None:
        return rho
    with _lock:
        rho = _memo.get(key)
        if rho is None:
            rho = _disk_load().get(key)
        if rho is None:
            rho = calibrate(geom, batch=batch, channels_last=channels_last)["crossover"]
            _disk_store(key, rho)
        _memo[key] = rho
    return rho


def clear_cache() -> None:
    """Forget in-process results (the disk file is left alone)."""
    _memo.clear()


def calibrate(geom: ConvGeometry, *, batch: int = 1, channels_last: bool = True, budget_s: float = BUDGET_S) -> dict:
    """Time dense vs sparse for ``geom`` on random data and solve for the crossing density.

    Returns {"crossover", "dense_ms", "sparse_ms": {density: ms}}; sparse times
    are fit as a + c * density, the crossover is (dense - a) / c clipped to [0, 1].
    """
    from gatesearch.ops.block_sparse import accumulate_block_sparse_, accumulate_dense_

    gen = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ci, co = geom.in_channels, geom.out_channels
    r = torch.randn(batch, ci, *geom.in_hw, generator=gen).contiguous(memory_format=fmt)
    z = torch.zeros(batch, co, *geom.out_hw).contiguous(memory_format=fmt)
    weight = torch.randn(co, ci // geom.groups, *geom.kernel, generator=gen)
    args = dict(block_size=geom.block, stride=geom.stride, padding=geom.padding, dilation=geom.dilation, groups=geom.groups)

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
    best = _time_interleaved(runs, budget_s)
    dense_ms, sparse_ms = best[0], best[1:]

    if len(sparse_ms) == 1:  # one block (or a tiny grid): all or nothing
        rho = 1.0 if sparse_ms[0] < dense_ms else 0.0
    else:
        slope = (sparse_ms[1] - sparse_ms[0]) / (densities[1] - densities[0])
        intercept = sparse_ms[0] - slope * densities[0]
        if slope <= 0:
            rho = 1.0 if sparse_ms[1] < dense_ms else 0.0
        else:
            rho = min(1.0, max(0.0, (dense_ms - intercept) / slope))
    return {"crossover": rho, "dense_ms": dense_ms, "sparse_ms": dict(zip(densities, sparse_ms))}


def _time_interleaved(runs, budget_s: float) -> list[float]:
    """Best-of-n wall time (ms) per callable, interleaved so load spikes hit all alike."""
    round_s = 0.0
    for fn in runs:  # warm-up: kernel creation, allocator, weight packing
        fn()
        t0 = time.perf_counter()
        fn()
        round_s += time.perf_counter() - t0
    reps = int(min(20, max(2, budget_s / max(round_s, 1e-6))))
    best = [float("inf")] * len(runs)
    for _ in range(reps):
        for i, fn in enumerate(runs):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], (time.perf_counter() - t0) * 1e3)
    return best


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
