"""A folder of training videos from a few long ones: each video cut into short segments, one class sub-folder each.

The video-folder dataset (``data.folder``) takes one clip per file, so a handful of long recordings (a street
camera, a phone video) becomes a dataset by cutting them into consecutive segments of ``frames`` frames. Frames
are decoded as a stream (a long video never sits in memory) and each segment is written as its own mp4,
downscaled so that its shorter side is ``short_side`` (the search crops it to its frame size when it loads).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .folder import DatasetError
from .video import iter_frames, video_info, write_video


@dataclass(frozen=True, kw_only=True)
class CutPlan:
    frames: int = 16  # frames per segment (one clip of the dataset)
    every: int = 1  # keep one frame in `every` (a 30 fps video at every=2 is a 15 fps one)
    short_side: int = 128  # segments are resized so that their shorter side is this (even sizes)
    max_segments: int | None = None  # per video (None: as many as the video holds)


def segment_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(H, W) with the shorter side ``short_side`` and the aspect kept, both even (what yuv420p needs)."""
    scale = short_side / min(height, width)
    return tuple(max(2, 2 * round(v * scale / 2)) for v in (height, width))


def segments(path: Path, plan: CutPlan) -> Iterator[torch.Tensor]:
    """The video's consecutive segments, (frames, 3, H, W) in [0, 1]; a last, shorter one is dropped."""
    info = video_info(path)
    size = segment_size(info["height"], info["width"], plan.short_side)
    buf: list[torch.Tensor] = []
    count = 0
    for i, frame in enumerate(iter_frames(path, size=size)):
        if i % plan.every:
            continue
        buf.append(frame)
        if len(buf) == plan.frames:
            yield torch.stack(buf)
            buf, count = [], count + 1
            if plan.max_segments is not None and count >= plan.max_segments:
                return


def cut_videos(videos: list[Path], out: Path, plan: CutPlan, *, classes: list[str] | None = None,
               on_segment: Callable[[Path], None] | None = None) -> dict[str, int]:
    """Write ``out/<class>/<video stem>-<n>.mp4`` for every segment of every video; the class of a video is its
    stem unless ``classes`` names one per video. Returns the segments written per class. Refuses an ``out``
    that already holds a segment it would write (nothing is replaced)."""
    if classes is not None and len(classes) != len(videos):
        raise DatasetError(f"--class: give one per video ({len(videos)}), got {len(classes)}")
    names = classes or [Path(v).stem for v in videos]
    written: dict[str, int] = {}
    for video, name in zip(videos, names):
        fps = video_info(video)["fps"] or 25.0
        n = 0
        for n, clip in enumerate(segments(Path(video), plan), start=1):
            dest = out / name / f"{Path(video).stem}-{n:04d}.mp4"
            if dest.exists():
                raise DatasetError(f"{dest}: already exists (cut into a new folder)")
            write_video(dest, clip, fps=max(1, round(fps / plan.every)))
            if on_segment:
                on_segment(dest)
        if n == 0:
            raise DatasetError(f"{video}: shorter than one segment of {plan.frames} frames")
        written[name] = written.get(name, 0) + n
    return written


__all__ = ["CutPlan", "cut_videos", "segment_size", "segments"]
