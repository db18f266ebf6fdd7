"""``gatesearch bench``: build the twins, load the footage, measure, return one JSON-able result."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from .config import BenchConfig
from .report import plot_sweep
from .twins import build_twins, calibrate


def run_bench(cfg: BenchConfig) -> dict:
    """Time (or, with ``streams``, count the throughput of) the gated model(s) against the dense twin.

    The result is flat for one gated model; a sweep gives one row per threshold under ``"sweep"``.
    """
    from gatesearch.objectives.bench import bench_models
    from gatesearch.objectives.streams import compare_throughput, offset_streams

    with _threads(cfg.threads or len(os.sched_getaffinity(0))):
        twins = build_twins(cfg)
        clip = load_clip(cfg, twins.frame_hw)
        calibrated = calibrate(twins, clip, reset_every=cfg.reset_every)  # on the clip it is timed on
        head = {"backbone": twins.backbone, "gate": twins.gate, "task": twins.task, "frames": clip.shape[1],
                "threads": torch.get_num_threads()}
        if cfg.streams:
            head.update(streams=cfg.streams, workers=cfg.workers, threads=1)
            rows = compare_throughput(twins.dense, twins.gated, offset_streams(clip, cfg.streams),
                                      reset_every=cfg.reset_every, workers=cfg.workers, repeats=cfg.repeats)
        else:
            rows = bench_models(twins.dense, twins.gated, clip, reset_every=cfg.reset_every, repeats=cfg.repeats)
    for label, record in calibrated.items():
        rows[label]["calibration"] = record
    if not cfg.sweep:
        return {**head, **rows["gated"]}
    result = {**head, "sweep": [{"threshold": float(label), **row} for label, row in rows.items()]}
    if cfg.plot is not None:
        result["plot"] = str(plot_sweep(result["sweep"], cfg.plot, title=f"{twins.backbone} · {twins.gate}",
                                        gate=twins.gate))
    return result


def load_clip(cfg: BenchConfig, frame_hw: tuple[int, int]) -> torch.Tensor:
    """(1, T, 3, H, W): the first ``cfg.frames`` frames of the video, or a synthetic test clip."""
    if cfg.video is not None:
        from gatesearch.data import read_frames

        return read_frames(cfg.video, max_frames=cfg.frames, size=frame_hw)[None]
    from gatesearch.data import SyntheticConfig, make_clip

    synthetic = SyntheticConfig(height=frame_hw[0], width=frame_hw[1], frames=cfg.frames)
    return make_clip(synthetic, 0, "test")["clip"][None]


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
