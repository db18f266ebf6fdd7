"""Real video decoding and writing with PyAV.

Decoding is streamed frame by frame so long videos never sit in memory at
full resolution; every failure to read becomes one `VideoDecodeError` that
names the file, so callers (CLI, export runner) can report it in one line.
`av` is imported inside the functions to keep `import gatesearch.data` light.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["VideoDecodeError", "read_frames", "iter_frames", "write_video", "video_info"]

PathLike = str | os.PathLike


class VideoDecodeError(Exception):
    """A video could not be read; str() is one line: '<path>: <reason>'."""

    def __init__(self, path: PathLike, reason: str):
        self.path = str(path)
        self.reason = " ".join(str(reason).split())  # force a single line
        super().__init__(f"cannot decode video {self.path}: {self.reason}")


def _check_size(size: tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"size must be (height, width), got {size!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive (height, width), got {size!r}")
    return h, w


def _open_video(path: PathLike):
    """Open `path` and return (container, stream), or raise VideoDecodeError."""
    import av

    p = Path(path)
    if not p.exists():
        raise VideoDecodeError(path, "file not found")
    if not p.is_file():
        raise VideoDecodeError(path, "not a regular file")
    if p.stat().st_size == 0:
        raise VideoDecodeError(path, "file is empty")
    try:
        container = av.open(str(p), mode="r")
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise VideoDecodeError(path, f"cannot open container ({exc})") from exc
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(path, "no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return container, stream


def _to_tensor(frame: Any, size: tuple[int, int] | None) -> torch.Tensor:
    """PyAV frame -> float32 (3, H, W) in [0, 1], optionally resized."""
    rgb = torch.from_numpy(frame.to_ndarray(format="rgb24"))  # (H, W, 3) uint8
    x = rgb.permute(2, 0, 1).float().div_(255.0)  # (3, H, W)
    if size is not None and tuple(x.shape[1:]) != size:
        x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False,
                          antialias=True)[0].clamp_(0.0, 1.0)
    return x


def _stream_frames(path: PathLike, container: Any, stream: Any,
                   size: tuple[int, int] | None, start: int,
                   max_frames: int | None) -> Iterator[torch.Tensor]:
    """Yield decoded frames [start, start + max_frames); closes the container at the end."""
    import av

    produced = 0
    try:
        for i, frame in enumerate(container.decode(stream)):
            if i < start:
                continue
            yield _to_tensor(frame, size)
            produced += 1
            if max_frames is not None and produced >= max_frames:
                return
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise VideoDecodeError(path, f"decoding failed after {produced} frames ({exc})") from exc
    finally:
        container.close()
    if produced == 0:
        where = f" at or after frame {start}" if start else ""
        raise VideoDecodeError(path, f"no decodable frames{where}")


def iter_frames(path: PathLike, *, size: tuple[int, int] | None = None) -> Iterator[torch.Tensor]:
    """Yield (3, H, W) float32 frames in [0, 1] one at a time.

    The file is opened here, so a missing, empty or unreadable file raises at
    call time; a file with no decodable frame raises on first iteration.
    """
    size = _check_size(size)
    container, stream = _open_video(path)
    return _stream_frames(path, container, stream, size, 0, None)


def read_frames(path: PathLike, *, max_frames: int | None = None,
                size: tuple[int, int] | None = None, start: int = 0) -> torch.Tensor:
    """Decode frames [start, start + max_frames) into (T, 3, H, W) float32 in [0, 1].

    Stops decoding as soon as `max_frames` frames are collected; `size=(H, W)`
    resizes each frame as it is decoded (bilinear, antialiased).
    """
    if max_frames is not None and (isinstance(max_frames, bool) or int(max_frames) < 1):
        raise ValueError(f"max_frames must be a positive int or None, got {max_frames!r}")
    if isinstance(start, bool) or int(start) < 0:
        raise ValueError(f"start must be a non-negative int, got {start!r}")
    size = _check_size(size)
    container, stream = _open_video(path)
    frames = list(_stream_frames(path, container, stream, size, int(start),
                                 None if max_frames is None else int(max_frames)))
    return torch.stack(frames)  # (T, 3, H, W)


def _pick_encoder() -> str:
    import av

    for name in ("libx264", "h264", "mpeg4"):
        if name in av.codecs_available:
            try:
                av.codec.Codec(name, "w")
            except Exception:  # listed but no encoder in this build
                continue
            return name
    raise RuntimeError("no usable H.264 or MPEG-4 encoder in this PyAV build")


def write_video(path: PathLike, frames: torch.Tensor, *, fps: int = 25) -> None:
    """Write (T, 3, H, W) frames in [0, 1] (or uint8) to an mp4 file, atomically.

    Encodes H.264 (libx264) when available, else MPEG-4 Part 2, as yuv420p,
    which needs even H and W (odd sizes raise ValueError rather than silently
    changing the size). The file is written next to `path` under a temporary
    name and renamed on success, so a failure never leaves a partial video.
    """
    import av

    if not isinstance(frames, torch.Tensor) or frames.dim() != 4 or frames.shape[1] != 3:
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise ValueError(f"frames must be a (T, 3, H, W) tensor, got {shape}")
    t, _, h, w = frames.shape
    if t == 0:
        raise ValueError("frames must contain at least one frame")
    if h % 2 or w % 2:
        raise ValueError(f"yuv420p needs even height and width, got {h}x{w}")
    if isinstance(fps, bool) or int(fps) != fps or fps < 1:
        raise ValueError(f"fps must be a positive int, got {fps!r}")

    if frames.dtype == torch.uint8:
        data = frames
    elif frames.is_floating_point():
        data = (frames.detach().float().clamp(0.0, 1.0) * 255.0).round_().to(torch.uint8)
    else:
        raise ValueError(f"frames must be float in [0, 1] or uint8, got {frames.dtype}")
    data = data.cpu().permute(0, 2, 3, 1).contiguous().numpy()  # (T, H, W, 3)

    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    codec = _pick_encoder()
    try:
        with av.open(tmp, mode="w", format="mp4") as container:
            stream = container.add_stream(codec, rate=Fraction(int(fps)))
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            if codec in ("libx264", "h264"):
                stream.options = {"crf": "16", "preset": "fast"}
            else:
                stream.bit_rate = max(2_000_000, 12 * w * h * int(fps))
            for rgb in data:
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))  # flush delayed packets
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def video_info(path: PathLike) -> dict[str, Any]:
    """Container metadata without decoding: frames (estimated when not stored), fps, height, width."""
    container, stream = _open_video(path)
    try:
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        frames = int(stream.frames or 0)
        if frames <= 0 and fps > 0:
            if stream.duration is not None and stream.time_base is not None:
                seconds = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                seconds = container.duration / 1_000_000  # av.time_base is microseconds
            else:
                seconds = 0.0
            frames = int(round(seconds * fps))
        ctx = stream.codec_context
        return {"frames": frames, "fps": fps, "height": int(ctx.height), "width": int(ctx.width)}
    finally:
        container.close()
