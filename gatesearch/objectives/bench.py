"""Side-by-side speed of a gated model against its dense twin on one clip.

The dense model and the gated model share weights and thread count and
stream the same clip frame by frame; rounds alternate (dense, gated, dense,
...) so that load changes hit both alike, and the speedup is the median of
per-round ratios. Exactness is checked against the masked dense formulation
of the same gates (Skip-Convolutions, Eq. 3: dense conv times the mask),
which is what research code runs.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn


def _stream_time_ms(model: nn.Module, clip: torch.Tensor, reset_every: int | None) -> float:
    start = time.perf_counter()
    model.stream(clip, reset_every=reset_every)
    return 1000.0 * (time.perf_counter() - start) / clip.shape[1]


def _set_path(model: nn.Module, path: str) -> None:
    for m in model.modules():
        if hasattr(m, "path") and hasattr(m, "streaming"):
            m.path = path


def bench_model(dense: nn.Module, gated: nn.Module, clip: torch.Tensor, *, reset_every: int | None,
                warmup: int = 2, repeats: int = 10) -> dict:
    """Per-frame dense vs gated timing, MACs and exactness on ``clip`` (1, T, 3, H, W)."""
    from gatesearch.objectives import MacCounter

    dense, gated = dense.eval(), gated.eval()
    frame_shape = tuple(clip.shape[2:])
    with torch.inference_mode():
        for _ in range(warmup):
            dense.stream(clip, reset_every=reset_every)
            gated.stream(clip, reset_every=reset_every)
        dense_ms, gated_ms, ratios = [], [], []
        for _ in range(repeats):
            d = _stream_time_ms(dense, clip, reset_every)
            g = _stream_time_ms(gated, clip, reset_every)
            dense_ms.append(d)
            gated_ms.append(g)
            ratios.append(d / g)
        counter = MacCounter(gated, frame_shape)
        counter.reset()
        fast = gated.stream(clip, reset_every=reset_every)
        report = counter.report()
        reference = copy.deepcopy(gated)
        _set_path(reference, "dense")
        masked = reference.stream(clip, reset_every=reset_every)
    speedup = statistics.median(ratios)
    return {
        "frames": clip.shape[1],
        "threads": torch.get_num_threads(),
        "dense_ms": statistics.median(dense_ms),
        "gated_ms": statistics.median(gated_ms),
        "speedup": speedup,
        "dense_macs": report.dense,
        "effective_macs": report.effective,
        "mac_reduction": report.reduction,
        "efficiency": speedup / report.reduction,
        "mean_density": report.mean_density,
        "max_abs_diff": float((fast - masked).abs().max()),
    }
