"""The measurements the findings share: a model's quality and MACs on held-out clips, accuracy–MAC fronts, the
threshold span of a norm gate, and wall-clock side by side with the dense network.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Score:
    """A model streamed over held-out clips: quality and effective MACs per frame."""

    quality: float  # top-1 (classification) or PCK (heatmap), mean over clips
    per_clip: tuple[float, ...]  # each clip's quality (top-1 as 0/1, or the clip's mean PCK)
    macs: float  # effective MACs per frame, gates included
    dense_macs: float  # MACs per frame of the dense network

    @property
    def fraction(self) -> float:
        """Effective MACs / dense MACs (1: nothing skipped)."""
        return self.macs / self.dense_macs

    @property
    def reduction(self) -> float:
        return self.dense_macs / self.macs


def clip_quality(task: str, out: torch.Tensor, clips: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N,) quality of each clip from a model's streamed output: top-1 as 0/1, or the clip's mean PCK."""
    from gatesearch.objectives import pck_correct, top1_correct
    from gatesearch.objectives.quality import pck_radius

    if task == "classification":
        return top1_correct(out, clips["label"]).float()
    h, w = clips["clip"].shape[-2:]
    hits = pck_correct(out, clips["centers"], stride=h // out.shape[-2], radius_px=pck_radius((h, w)))
    return hits.float().mean(1)  # (N, T) -> (N,)


def _macs(model: nn.Module, frame_shape) -> tuple[float, float]:
    """(effective, dense) MACs per frame over the frames streamed since ``reset_stats``. Counted after streaming:
    a clip model's cost per frame depends on the window it streamed."""
    from gatesearch.objectives import mac_report

    report = mac_report(model, tuple(frame_shape))
    return report.effective, report.dense


@torch.inference_mode()
def score(model: nn.Module, task: str, clips: dict[str, torch.Tensor], *, reset_every: int | None,
          batch: int = 8) -> Score:
    """Stream ``clips`` through ``model`` (a dense reference frame every ``reset_every`` frames; None: the first
    only) and read quality and effective MACs (``objectives.MacCounter``) over exactly those frames. The gated
    layers keep their statistics afterwards, so a finding can read more of them (D-STEP's F/F_S)."""
    from gatesearch.objectives import reset_stats

    model.eval()
    reset_stats(model)
    per_clip = []
    for start in range(0, len(clips["clip"]), batch):
        part = {k: v[start : start + batch] for k, v in clips.items()}
        per_clip.append(clip_quality(task, model.stream(part["clip"], reset_every=reset_every), part))
    macs, dense = _macs(model, clips["clip"].shape[2:])
    q = torch.cat(per_clip)
    return Score(quality=float(q.mean()), per_clip=tuple(q.tolist()), macs=macs, dense_macs=dense)


@torch.inference_mode()
def stream_fraction(model: nn.Module, clip: torch.Tensor, *, reset_every: int | None) -> float:
    """Effective / dense MACs of ``model`` streaming ``clip`` (1, T, 3, H, W): no labels needed (a real video)."""
    from gatesearch.objectives import reset_stats

    model.eval()
    reset_stats(model)
    model.stream(clip, reset_every=reset_every)
    macs, dense = _macs(model, clip.shape[2:])
    return macs / dense


def best_within(points: Sequence[tuple[float, Score]], dense: Score, *, points_lost: float = 1.0):
    """The (knob, score) with the fewest MACs whose quality is within ``points_lost`` points of dense; the best
    quality when none is: the operating point a user would deploy."""
    ok = [p for p in points if p[1].quality >= dense.quality - points_lost / 100]
    return min(ok, key=lambda p: p[1].macs) if ok else max(points, key=lambda p: p[1].quality)


def quality_name(task: str) -> str:
    return "PCK" if task == "heatmap" else "top-1"


def front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The Pareto front of (MAC fraction ↓, quality ↑) points, by increasing MAC fraction."""
    best, out = -math.inf, []
    for x, q in sorted(points, key=lambda p: (p[0], -p[1])):
        if q > best:
            out.append((x, q))
            best = q
    return out


def mean_quality(points: Sequence[tuple[float, float]], lo: float, hi: float) -> float:
    """The area under a front over the MAC budget [lo, hi], divided by its width: the mean over budgets of the best
    quality reachable within the budget (Skip-Conv Fig. 7 compares gates by their fronts on this plane)."""
    steps = front(points)
    if hi <= lo:
        return max((q for x, q in steps if x <= hi), default=0.0)
    area = 0.0
    for i, (x, q) in enumerate(steps):
        start = max(x, lo)
        end = min(steps[i + 1][0] if i + 1 < len(steps) else hi, hi)
        if end > start:
            area += q * (end - start)
    return area / (hi - lo)


@dataclass(frozen=True)
class FrontAreas:
    """Sweeps compared on the accuracy–MAC plane over the MAC budgets [low, 1] that every sweep reaches."""

    low: float  # the largest of the sweeps' smallest MAC fractions; ≥ 1: no budget below dense is shared
    area: dict  # sweep key -> mean_quality over [low, 1]

    @property
    def comparable(self) -> bool:
        return self.low < 1.0


def front_areas(sweeps: dict, dense: Score) -> FrontAreas:
    """``sweeps`` (key -> [(knob, Score)]) with the dense network as every sweep's MAC fraction 1 point."""
    points = {k: [(s.fraction, s.quality) for _, s in pts] + [(1.0, dense.quality)] for k, pts in sweeps.items()}
    low = max(min(x for x, _ in pts) for pts in points.values())
    return FrontAreas(low=low, area={k: mean_quality(pts, low, 1.0) for k, pts in points.items()})


def threshold_span(fraction: Callable[[float], float], *, start: float = 1.0, near: float = 0.05,
                   max_steps: int = 24) -> tuple[float, float]:
    """(ε_lo, ε_hi) of a norm gate: where its MAC fraction leaves 1 and where it reaches its floor (within
    ``near`` of the distance between the two), found by doubling and halving ε from ``start``. ``fraction(ε)``
    streams a few calibration clips. The sweep between the two is where a threshold changes anything."""
    floor = fraction(1e12)  # every residual skipped: the reference frames and ungated layers remain
    top = fraction(0.0)
    if top - floor < 1e-6:
        return start, start
    hi_target = floor + near * (top - floor)
    lo_target = top - near * (top - floor)
    lo = hi = start
    for _ in range(max_steps):
        if fraction(lo) < lo_target:
            lo /= 2
        else:
            break
    for _ in range(max_steps):
        if fraction(hi) > hi_target:
            hi *= 2
        else:
            break
    return lo, hi


def at_threshold(model: nn.Module, eps: float) -> nn.Module:
    """``model``'s norm gates all set to ε in place (one converted model serves a whole sweep: no copy per point)."""
    from gatesearch.policies.calibration import norm_layers, set_layer_thresholds

    set_layer_thresholds(model, dict.fromkeys(norm_layers(model), eps))
    return model


def log_grid(lo: float, hi: float, n: int) -> list[float]:
    if n == 1 or hi <= lo:
        return [hi]
    return [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]


def bisect_threshold(fraction: Callable[[float], float], target: float, lo: float, hi: float,
                     steps: int = 10) -> float:
    """ε whose MAC fraction is closest to ``target`` (the fraction falls as ε grows), by bisection on log ε."""
    best, best_gap = hi, math.inf
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        f = fraction(mid)
        if abs(f - target) < best_gap:
            best, best_gap = mid, abs(f - target)
        lo, hi = (mid, hi) if f > target else (lo, mid)
    return best


def side_by_side(dense: nn.Module, gated: nn.Module, clip: torch.Tensor, *, reset_every: int | None, repeats: int,
                 threads: int, lock) -> dict:
    """``objectives.bench.bench_model`` (dense and gated streams interleaved, median of per-round ratios) while
    holding the device lock exclusively with ``threads`` torch threads: no other measurement or training step of
    gatesearch runs meanwhile."""
    from gatesearch.objectives.bench import bench_model

    with lock.exclusive(threads):
        return bench_model(dense, gated, clip, reset_every=reset_every, repeats=repeats)


__all__ = ["FrontAreas", "Score", "at_threshold", "best_within", "bisect_threshold", "clip_quality", "front",
           "front_areas", "log_grid", "mean_quality", "quality_name", "score", "side_by_side", "stream_fraction",
           "threshold_span"]
