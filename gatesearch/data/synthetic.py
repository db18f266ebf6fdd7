"""Synthetic moving-shape videos, generated on the fly and fully determined by a seed.

Why synthetic: searches must run on a laptop CPU in seconds, with a task that
needs both appearance (which shape) and motion (which direction), and with
the temporal redundancy that gated convolutions exploit: a mostly static,
slowly drifting background and one object that moves.

Coordinate convention: pixel column ``j`` has its centre at ``x = j`` (rows
likewise), so ``centers`` are in the same units as array indices. Heatmap cell
``k`` covers frame pixels ``[k*s, (k+1)*s)`` and sits at ``x = k*s + (s-1)/2``.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gatesearch.data.heatmap import render_heatmap

__all__ = [
    "SHAPES",
    "DIRECTIONS",
    "SPLITS",
    "SyntheticConfig",
    "SyntheticVideo",
    "make_clip",
]

# Class order is part of the label meaning: label = shape * num_directions + direction.
SHAPES: tuple[str, ...] = ("disk", "square", "triangle", "cross")
# Unit steps (dx, dy) with y pointing down; the first n are used for n directions.
DIRECTIONS: tuple[tuple[str, float, float], ...] = (
    ("right", 1.0, 0.0),
    ("left", -1.0, 0.0),
    ("down", 0.0, 1.0),
    ("up", 0.0, -1.0),
    ("down-right", math.sqrt(0.5), math.sqrt(0.5)),
    ("up-left", -math.sqrt(0.5), -math.sqrt(0.5)),
    ("up-right", math.sqrt(0.5), -math.sqrt(0.5)),
    ("down-left", -math.sqrt(0.5), math.sqrt(0.5)),
)
SPLITS: tuple[str, ...] = ("train", "val", "test")

_SUPERSAMPLE = 3  # sub-samples per pixel side for anti-aliased object edges
_BG_TEXTURE = 0.12  # background texture amplitude: visible, but weaker than the object edge
_STRIPES = 0.12  # object stripe depth: texture without breaking up the silhouette


@dataclass(frozen=True, kw_only=True)
class SyntheticConfig:
    """Everything that defines the synthetic task; hashable so it can key caches."""

    height: int = 64
    width: int = 64
    frames: int = 16
    num_shapes: int = 3
    num_directions: int = 4  # 1: every object moves right and the label is its shape alone, a task a per-frame
    #                           2D network can learn (direction needs frames in order)
    speed: float = 1.5
    noise: float = 0.02
    camera_motion: float = 0.25
    object_size: float = 0.25  # mean object diameter / shorter frame side (each clip draws ±20 % around it)
    heatmap_stride: int = 4
    heatmap_sigma: float = 1.5
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("height", "width", "frames", "num_shapes", "num_directions",
                     "heatmap_stride", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"SyntheticConfig.{name} must be an int, got {value!r}")
        for name in ("speed", "noise", "camera_motion", "object_size", "heatmap_sigma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                raise ValueError(f"SyntheticConfig.{name} must be a number, got {value!r}")
            if not math.isfinite(float(value)):
                raise ValueError(f"SyntheticConfig.{name} must be finite, got {value!r}")

        def check(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(
                    f"SyntheticConfig.{name} {rule}, got {getattr(self, name)!r}")

        check(self.height >= 16, "height", "must be >= 16")
        check(self.width >= 16, "width", "must be >= 16")
        check(self.frames >= 2, "frames", "must be >= 2 (motion needs two frames)")
        check(1 <= self.num_shapes <= len(SHAPES), "num_shapes", f"must be in 1..{len(SHAPES)}")
        check(self.num_directions in (1, 2, 4, 8), "num_directions", "must be one of 1, 2, 4, 8")
        check(self.speed > 0, "speed", "must be > 0")
        check(self.noise >= 0, "noise", "must be >= 0")
        check(self.camera_motion >= 0, "camera_motion", "must be >= 0")
        check(0 < self.object_size <= 0.5, "object_size", "must be in (0, 0.5] (a fraction of the shorter side)")
        check(1 <= self.heatmap_stride <= min(self.height, self.width), "heatmap_stride",
              "must be in 1..min(height, width)")
        check(self.heatmap_sigma > 0, "heatmap_sigma", "must be > 0")
        check(self.seed >= 0, "seed", "must be >= 0")

    @property
    def num_classes(self) -> int:
        return self.num_shapes * self.num_directions

    @property
    def heatmap_size(self) -> tuple[int, int]:
        """(h, w) of the centre heatmap."""
        return self.height // self.heatmap_stride, self.width // self.heatmap_stride

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SyntheticConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in known:
                raise ValueError(
                    f"unknown SyntheticConfig key {key!r} (known: {', '.join(sorted(known))})")
        return cls(**d)


# ----------------------------------------------------------------------------- shapes


def _shape_inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean inside test in normalised object coordinates (u, v in about [-1, 1])."""
    if shape == "disk":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.82
    if shape == "triangle":  # apex up, flat base down
        return (v <= 0.8) & (np.abs(u) <= (v + 0.95) * (0.95 / 1.75))
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.32) & (av <= 0.98)) | ((av <= 0.32) & (au <= 0.98))
    raise ValueError(f"unknown shape {shape!r}")


# ----------------------------------------------------------------------------- seeding


def _rng(cfg: SyntheticConfig, index: int, split: str) -> np.random.Generator:
    """Stable across processes and Python versions (no builtin hash())."""
    split_key = zlib.crc32(split.encode("utf-8"))
    return np.random.default_rng(np.random.SeedSequence([int(cfg.seed), int(index), split_key]))


# ----------------------------------------------------------------------------- pieces


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth colour texture on an (h, w) canvas: a few random low-frequency plane waves."""
    base = rng.uniform(0.18, 0.45, size=3).astype(np.float32)  # dark-ish so the object pops
    k = 5
    angle = rng.uniform(0, 2 * np.pi, size=k)
    cycles = rng.uniform(0.5, 3.0, size=k)  # cycles across the shorter canvas side
    freq = 2 * np.pi * cycles / min(h, w)
    phase = rng.uniform(0, 2 * np.pi, size=k)
    colour = rng.uniform(-1.0, 1.0, size=(3, k)) * (_BG_TEXTURE / k ** 0.5)
    ys = np.arange(h, dtype=np.float32)[:, None]
    xs = np.arange(w, dtype=np.float32)[None, :]
    waves = np.stack([
        np.sin(freq[i] * (np.cos(angle[i]) * xs + np.sin(angle[i]) * ys) + phase[i])
        for i in range(k)
    ]).astype(np.float32)  # (k, h, w)
    tex = np.tensordot(colour.astype(np.float32), waves, axes=1)  # (3, h, w)
    return base[:, None, None] + tex


def _drift_crop(canvas: np.ndarray, offsets: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear crops of `canvas` at sub-pixel (dx, dy) offsets: camera motion."""
    frames = np.empty((len(offsets), 3, h, w), dtype=np.float32)
    for t, (ox, oy) in enumerate(offsets):
        ix, iy = int(np.floor(ox)), int(np.floor(oy))
        fx, fy = np.float32(ox - ix), np.float32(oy - iy)
        a = canvas[:, iy:iy + h + 1, ix:ix + w + 1]  # (3, h+1, w+1)
        top = a[:, :h, :w] * (1 - fx) + a[:, :h, 1:] * fx
        bottom = a[:, 1:, :w] * (1 - fx) + a[:, 1:, 1:] * fx
        frames[t] = top * (1 - fy) + bottom * fy
    return frames


def _trajectory(rng: np.random.Generator, cfg: SyntheticConfig, direction: int,
                radius: float) -> np.ndarray:
    """(T, 2) centres moving along `direction`; starts where the whole path fits.

    If the frame is too small for the path, the object is clamped at the far
    edge (it stops) instead of bouncing, so the label still names the only
    direction it ever moves in.
    """
    t = cfg.frames
    _, dx, dy = DIRECTIONS[direction]
    step_len = cfg.speed * rng.uniform(0.9, 1.1)
    steps = np.empty((t - 1, 2))
    steps[:] = (dx * step_len, dy * step_len)
    steps += rng.normal(0.0, 0.05 * cfg.speed, size=steps.shape)  # small per-frame jitter
    cum = np.concatenate([np.zeros((1, 2)), np.cumsum(steps, axis=0)])  # (T, 2)
    margin = radius + 1.5
    centres = np.empty((t, 2))
    for axis, size in ((0, cfg.width), (1, cfg.height)):
        lo, hi = margin, size - 1 - margin
        start_lo = lo - cum[:, axis].min()
        start_hi = hi - cum[:, axis].max()
        if start_lo <= start_hi:
            start = rng.uniform(start_lo, start_hi)
        else:  # path longer than the frame: start at the trailing edge, clamp at the leading one
            d = (dx, dy)[axis]
            start = lo if d > 0 else hi if d < 0 else (lo + hi) / 2
        centres[:, axis] = np.clip(start + cum[:, axis], lo, hi)
    return centres


def _paint_object(frames: np.ndarray, rng: np.random.Generator, shape: str,
                  centres: np.ndarray, radius: float) -> None:
    """Alpha-blend one textured, anti-aliased object into `frames` (T, 3, H, W) in place."""
    t_len = frames.shape[0]
    # Bright, saturated colour: at least one channel near 1, the mean well above the background.
    colour = rng.uniform(0.55, 1.0, size=3)
    colour[rng.integers(3)] = rng.uniform(0.92, 1.0)
    stripe_angle = rng.uniform(0, np.pi)
    stripe_freq = rng.uniform(1.5, 3.5) * np.pi  # in normalised object units
    stripe_phase = rng.uniform(0, 2 * np.pi)
    sx, sy = np.cos(stripe_angle), np.sin(stripe_angle)

    p = int(math.ceil(2 * radius)) + 3  # patch side covering the object
    s = _SUPERSAMPLE
    sub = (np.arange(s) + 0.5) / s - 0.5  # sub-sample offsets within a pixel
    ones = np.arange(p)
    x0 = np.floor(centres[:, 0] - p / 2 + 0.5).astype(int)  # (T,) patch top-left
    y0 = np.floor(centres[:, 1] - p / 2 + 0.5).astype(int)
    # Sub-sample coordinates relative to the centre, normalised by the radius.
    u = (x0[:, None, None] + ones[None, :, None] + sub[None, None, :]
         - centres[:, 0, None, None]) / radius  # (T, p, s) along x
    v = (y0[:, None, None] + ones[None, :, None] + sub[None, None, :]
         - centres[:, 1, None, None]) / radius  # (T, p, s) along y
    uu = u[:, None, :, None, :]  # (T, 1, p, 1, s)
    vv = v[:, :, None, :, None]  # (T, p, 1, s, 1)
    inside = _shape_inside(shape, uu, vv)  # (T, p, p, s, s)
    alpha = inside.mean(axis=(3, 4)).astype(np.float32)  # (T, p, p)
    # Texture in object coordinates, so it travels with the object.
    uc = u.mean(axis=2)[:, None, :]  # (T, 1, p)
    vc = v.mean(axis=2)[:, :, None]  # (T, p, 1)
    stripes = 1.0 - _STRIPES + _STRIPES * np.sin(stripe_freq * (sx * uc + sy * vc) + stripe_phase)  # (T, p, p)
    patch = (colour[None, :, None, None] * stripes[:, None]).astype(np.float32)  # (T, 3, p, p)

    h, w = frames.shape[2:]
    for t in range(t_len):
        ya, xa = y0[t], x0[t]
        yb, xb = ya + p, xa + p
        # Clip the patch to the frame (only matters for tiny frames).
        cy0, cx0 = max(0, -ya), max(0, -xa)
        cy1, cx1 = p - max(0, yb - h), p - max(0, xb - w)
        region = frames[t, :, ya + cy0:ya + cy1, xa + cx0:xa + cx1]
        a = alpha[t, cy0:cy1, cx0:cx1]
        region += a * (patch[t, :, cy0:cy1, cx0:cx1] - region)


def _heatmap(cfg: SyntheticConfig, centres: np.ndarray) -> np.ndarray:
    """(T, 1, h, w) Gaussian at each centre, scaled so each frame's maximum is exactly 1."""
    return render_heatmap(centres, cfg.heatmap_size, cfg.heatmap_stride, cfg.heatmap_sigma)


# ----------------------------------------------------------------------------- public


def make_clip(cfg: SyntheticConfig, index: int, split: str = "train") -> dict[str, torch.Tensor]:
    """One clip; (cfg.seed, index, split) determine it completely.

    Returns "clip" (T, 3, H, W) float32 in [0, 1], "label" int64 scalar
    (shape * num_directions + direction), "centers" (T, 2) float32 (x, y) in
    frame pixels and "heatmap" (T, 1, H//stride, W//stride) float32.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index must be a non-negative int, got {index!r}")
    rng = _rng(cfg, index, split)
    h, w, t = cfg.height, cfg.width, cfg.frames

    label = index % cfg.num_classes  # exact class balance over any run of indices
    shape_idx, direction = divmod(label, cfg.num_directions)

    # Camera: constant sub-pixel drift, so the background is nearly static frame to frame.
    cam_speed = rng.uniform(0.0, cfg.camera_motion)
    cam_angle = rng.uniform(0, 2 * np.pi)
    drift = np.arange(t)[:, None] * cam_speed * np.array([np.cos(cam_angle), np.sin(cam_angle)])
    pad = int(math.ceil(cfg.camera_motion * (t - 1))) + 2
    canvas = _background(rng, h + 2 * pad, w + 2 * pad)  # (3, H+2p, W+2p)
    frames = _drift_crop(canvas, drift + pad, h, w)  # (T, 3, H, W)

    radius = 0.5 * min(h, w) * rng.uniform(0.20, 0.30) * (cfg.object_size / 0.25)  # the default draws as before
    centres = _trajectory(rng, cfg, direction, radius)  # (T, 2)
    _paint_object(frames, rng, SHAPES[shape_idx], centres, radius)

    if cfg.noise > 0:
        frames += np.float32(cfg.noise) * rng.standard_normal(frames.shape, dtype=np.float32)
    np.clip(frames, 0.0, 1.0, out=frames)

    return {
        "clip": torch.from_numpy(frames),
        "label": torch.tensor(label, dtype=torch.int64),
        "centers": torch.from_numpy(centres.astype(np.float32)),
        "heatmap": torch.from_numpy(_heatmap(cfg, centres)),
    }


class SyntheticVideo(torch.utils.data.Dataset):
    """Map-style dataset of `size` synthetic clips; nothing is stored, items are rebuilt."""

    def __init__(self, cfg: SyntheticConfig, size: int, split: str = "train"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"size must be a non-negative int, got {size!r}")
        self.cfg = cfg
        self.size = size
        self.split = split

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i = int(i)
        if i < 0:
            i += self.size
        if not 0 <= i < self.size:
            raise IndexError(f"index {i} out of range for SyntheticVideo of size {self.size}")
        return make_clip(self.cfg, i, self.split)

    def __repr__(self) -> str:
        return f"SyntheticVideo(size={self.size}, split={self.split!r}, cfg={self.cfg})"
