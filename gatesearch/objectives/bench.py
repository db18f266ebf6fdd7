"""Side-by-side speed and fidelity of gated models against their dense twin on one clip.

The dense model and every gated model share weights and thread count and
stream the same clip frame by frame; rounds alternate (dense, gated 1, gated 2,
..., dense, ...) so that load changes hit all alike, and each speedup is the
median of per-round ratios against that round's dense time. Exactness is
checked against the masked dense formulation of the same gates
(Skip-Convolutions, Eq. 3: dense conv times the mask), which is what research
code runs; fidelity (``objectives.fidelity``) against the dense network.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Mapping

import torch
from torch import nn

from .fidelity import fidelity, stream_outputs


def _stream_time_ms(model: nn.Module, clip: torch.Tensor, reset_every: int | None) -> float:
    start = time.perf_counter()
    model.stream(clip, reset_every=reset_every)
    return 1000.0 * (time.perf_counter() - start) / clip.shape[1]


def _set_path(model: nn.Module, path: str) -> None:
    for m in model.modules():
        if hasattr(m, "path") and hasattr(m, "streaming"):
            m.path = path


def bench_models(dense: nn.Module, gated: Mapping[str, nn.Module], clip: torch.Tensor, *, reset_every: int | None,
                 warmup: int = 2, repeats: int = 10) -> dict[str, dict]:
    """Per gated model (by label): dense vs gated timing, MACs, exactness and fidelity on ``clip`` (1, T, 3, H, W)."""
    models = {"dense": dense.eval(), **{label: m.eval() for label, m in gated.items()}}
    with torch.inference_mode():
        for _ in range(warmup):
            for m in models.values():
                m.stream(clip, reset_every=reset_every)
        times: dict[str, list[float]] = {label: [] for label in models}
        for _ in range(repeats):
            for label, m in models.items():
                times[label].append(_stream_time_ms(m, clip, reset_every))
        dense_out = stream_outputs(dense, clip, reset_every=reset_every)
        rows = {}
        for label, m in gated.items():
            speedup = statistics.median(d / g for d, g in zip(times["dense"], times[label]))
            rows[label] = {"dense_ms": statistics.median(times["dense"]), "gated_ms": statistics.median(times[label]),
                           **_row(m, speedup, dense_out, clip, reset_every)}
    return rows


def _row(gated: nn.Module, speedup: float, dense_out: torch.Tensor, clip: torch.Tensor,
         reset_every: int | None) -> dict:
    """The speedup beside the MACs of one pass, its largest difference from the masked formulation, and its
    distance from the dense output."""
    from gatesearch.objectives import MacCounter

    counter = MacCounter(gated, tuple(clip.shape[2:]))
    counter.reset()
    fast = stream_outputs(gated, clip, reset_every=reset_every)
    report = counter.report()
    reference = copy.deepcopy(gated)
    _set_path(reference, "dense")
    masked = stream_outputs(reference, clip, reset_every=reset_every)
    task = getattr(gated, "task", "classification")
    return {
        "speedup": speedup,
        "dense_macs": report.dense,
        "effective_macs": report.effective,
        "mac_reduction": report.reduction,
        "efficiency": speedup / report.reduction,
        "mean_density": report.mean_density,
        "max_abs_diff": float((fast - masked).abs().max()),
        **fidelity(dense_out, fast, task=task, frame_hw=tuple(clip.shape[-2:])).to_dict(),
    }


def bench_model(dense: nn.Module, gated: nn.Module, clip: torch.Tensor, *, reset_every: int | None,
                warmup: int = 2, repeats: int = 10) -> dict:
    """``bench_models`` for one gated model, with the clip's frame count and the thread count."""
    row = bench_models(dense, {"gated": gated}, clip, reset_every=reset_every, warmup=warmup, repeats=repeats)
    return {"frames": clip.shape[1], "threads": torch.get_num_threads(), **row["gated"]}
