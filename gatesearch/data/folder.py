"""A folder of videos, one sub-folder per class, decoded with PyAV.

Layout: ``root/<class>/<video>.{mp4,avi,mkv,webm}``, with optional per-video
annotations ``root/<class>/<video>.json`` holding ``{"centers": [[x, y], ...]}``
(one object centre per frame, in the video's own pixels) for the per-frame
heatmap task. Decoding is streamed: only the frames a clip needs are decoded.
Unreadable videos are reported by name and skipped (``strict`` refuses them).
"""

from __future__ import annotations

import dataclasses
import json
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gatesearch.data.heatmap import render_heatmap
from gatesearch.data.video import VideoDecodeError

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm")
SAMPLINGS = ("clip", "uniform")


class DatasetError(Exception):
    """A dataset folder that cannot be used (one-line message naming the folder)."""


@dataclass(frozen=True, kw_only=True)
class FolderConfig:
    root: str  # folder of class sub-folders
    height: int = 64  # frames are resized (shorter side) and centre-cropped to height × width
    width: int = 64
    sampling: str = "clip"  # "clip": T consecutive frames; "uniform": T frames spread over the video
    val_ratio: float = 0.25  # last fraction of each class's (sorted) videos is held out
    split_file: str | None = None  # text file listing held-out videos (paths relative to root), overrides val_ratio
    strict: bool = False  # refuse unreadable videos instead of skipping them
    heatmap_stride: int = 4
    heatmap_sigma: float = 1.5
    seed: int = 0  # where "clip" sampling starts in each video

    def __post_init__(self) -> None:
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling: {self.sampling!r} is not one of {', '.join(SAMPLINGS)}")
        if not 0.0 < self.val_ratio < 1.0:
            raise ValueError(f"val_ratio: must be between 0 and 1, got {self.val_ratio}")
        if self.height < 8 or self.width < 8 or self.height % 2 or self.width % 2:
            raise ValueError(f"height/width: must be even and >= 8, got {self.height}x{self.width}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FolderConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in known:
                raise ValueError(f"unknown key {key!r}; known: {', '.join(sorted(known))}")
        if "root" not in d:
            raise ValueError("root: the folder of videos is required")
        return cls(**d)


@dataclass(frozen=True)
class VideoItem:
    path: Path
    label: int
    annotations: Path | None


@dataclass(frozen=True)
class FolderIndex:
    classes: tuple[str, ...]
    train: tuple[VideoItem, ...]
    val: tuple[VideoItem, ...]
    skipped: tuple[tuple[str, str], ...]  # (path, reason) of videos that could not be opened


def scan_folder(cfg: FolderConfig, *, probe: bool = True) -> FolderIndex:
    """List the videos and split them; ``probe`` opens each to find unreadable ones early."""
    from gatesearch.data.video import video_info

    root = Path(cfg.root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder")
    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")))
    if not classes:
        raise DatasetError(f"{root}: no class sub-folders (expected root/<class>/<video>.mp4)")
    held_out = _read_split_file(root, cfg.split_file)
    train, val, skipped = [], [], []
    for label, name in enumerate(classes):
        videos = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
        good = []
        for path in videos:
            if probe:
                try:
                    video_info(path)
                except VideoDecodeError as e:
                    if cfg.strict:
                        raise
                    skipped.append((str(path), e.reason))
                    continue
            ann = path.with_suffix(".json")
            good.append(VideoItem(path, label, ann if ann.is_file() else None))
        if held_out is not None:
            for item in good:
                (val if str(item.path.relative_to(root)) in held_out else train).append(item)
        else:
            n_val = max(1, math.ceil(len(good) * cfg.val_ratio)) if len(good) > 1 else 0
            train.extend(good[: len(good) - n_val])
            val.extend(good[len(good) - n_val :])
    if not train:
        raise DatasetError(f"{root}: no readable training videos")
    return FolderIndex(classes, tuple(train), tuple(val), tuple(skipped))


def _read_split_file(root: Path, split_file: str | None) -> set[str] | None:
    if split_file is None:
        return None
    path = Path(split_file)
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise DatasetError(f"{path}: split file not found")
    return {line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")}


def load_item(item: VideoItem, cfg: FolderConfig, *, frames: int) -> dict[str, torch.Tensor]:
    """Decode one clip of ``frames`` frames: clip (T, 3, H, W), label, and centers/heatmap if annotated."""
    from gatesearch.data.video import iter_frames, video_info

    total = max(1, video_info(item.path)["frames"])
    if cfg.sampling == "uniform":
        wanted = np.linspace(0, total - 1, frames).round().astype(int)
    else:
        start = _start(item.path, cfg.seed, total - frames)
        wanted = np.arange(start, start + frames)
    picked, indices, last = [], [], None
    want = iter(wanted.tolist())
    target = next(want)
    for i, frame in enumerate(iter_frames(item.path)):  # (3, h, w), streamed
        last = (i, frame)
        while target is not None and i == target:
            picked.append(frame)
            indices.append(i)
            target = next(want, None)
        if target is None:
            break
    while len(picked) < frames and last is not None:  # shorter than announced: repeat the last frame
        picked.append(last[1])
        indices.append(last[0])
    clip, scale, offset = _resize_crop(torch.stack(picked), cfg.height, cfg.width)
    out = {"clip": clip, "label": torch.tensor(item.label, dtype=torch.int64)}
    if item.annotations is not None:
        # pixel j's centre is at x = j: map centres through the resize, then the crop
        centres = (_centres(item.annotations, indices) + 0.5) * scale - 0.5 - offset
        out["centers"] = torch.from_numpy(centres.astype(np.float32))
        size = (cfg.height // cfg.heatmap_stride, cfg.width // cfg.heatmap_stride)
        out["heatmap"] = torch.from_numpy(render_heatmap(centres, size, cfg.heatmap_stride, cfg.heatmap_sigma))
    return out


def load_split(cfg: FolderConfig, split: str, *, frames: int, limit: int | None = None,
               on_skip: Callable[[str, str], None] | None = None) -> dict[str, torch.Tensor]:
    """Decode a whole split into stacked tensors; videos that fail to decode are skipped and reported."""
    index = scan_folder(cfg, probe=False)
    items = index.train if split == "train" else index.val
    clips = []
    for item in items[:limit] if limit else items:
        try:
            clips.append(load_item(item, cfg, frames=frames))
        except VideoDecodeError as e:
            if cfg.strict:
                raise
            if on_skip:
                on_skip(str(item.path), e.reason)
    if not clips:
        raise DatasetError(f"{cfg.root}: no decodable videos in the {split} split")
    keys = set.intersection(*(set(c) for c in clips))
    return {k: torch.stack([c[k] for c in clips]) for k in sorted(keys)}


def _start(path: Path, seed: int, last_start: int) -> int:
    if last_start <= 0:
        return 0
    return int(zlib.crc32(f"{seed}:{path.name}".encode()) % (last_start + 1))


def _resize_crop(clip: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, float, np.ndarray]:
    """Resize the shorter side, centre-crop; returns the clip and the pixel transform (scale, offset)."""
    h, w = clip.shape[-2:]
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    if (nh, nw) != (h, w):
        clip = F.interpolate(clip, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - height) // 2, (nw - width) // 2
    clip = clip[..., top : top + height, left : left + width].clamp(0, 1).contiguous()
    return clip, scale, np.array([left, top], dtype=np.float64)


def _centres(path: Path, indices: list[int]) -> np.ndarray:
    try:
        data = json.loads(path.read_text())
        centres = np.asarray(data["centers"], dtype=np.float64)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise VideoDecodeError(path, 'annotations must be JSON {"centers": [[x, y], ...]}') from None
    if centres.ndim != 2 or centres.shape[1] != 2 or len(centres) == 0:
        raise VideoDecodeError(path, "centers must be a list of [x, y] pairs, one per frame")
    return centres[np.minimum(indices, len(centres) - 1)]


def write_synthetic_folder(out: Path, cfg, *, clips_per_class: int,
                           on_video: Callable[[Path], None] | None = None) -> Path:
    """Write the synthetic dataset as a VideoFolder: real mp4 files plus centre annotations.

    Class folders are named ``<shape>-<direction>``; the same reader then runs
    end to end on files, exactly as it would on a user's videos.
    """
    from gatesearch.data.synthetic import DIRECTIONS, SHAPES, make_clip
    from gatesearch.data.video import write_video

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DatasetError(f"{out}: already exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    for label in range(cfg.num_classes):
        shape, direction = divmod(label, cfg.num_directions)
        folder = out / f"{SHAPES[shape]}-{DIRECTIONS[direction][0]}"
        folder.mkdir(exist_ok=True)
        for k in range(clips_per_class):
            item = make_clip(cfg, label + k * cfg.num_classes, "train")  # index % classes == label
            path = folder / f"clip{k:04d}.mp4"
            write_video(path, item["clip"])
            path.with_suffix(".json").write_text(json.dumps({"centers": item["centers"].tolist()}))
            if on_video:
                on_video(path)
    return out
