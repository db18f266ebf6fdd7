"""Where a trial's clips come from: the built-in generator or a folder of videos.

One entry point per question (clips, classes, frame shape) so that trials,
the export runner and the CLI never care which kind of data a search uses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def load_clips(data, *, split: str, frames: int, count: int,
               on_skip: Callable[[str, str], None] | None = None) -> dict[str, torch.Tensor]:
    """Stacked clips of ``frames`` frames: clip (N, T, 3, H, W), label (N,), centers/heatmap when known."""
    if data.kind == "video_folder":
        from gatesearch.data.folder import load_split

        return load_split(data.folder_config(), split, frames=frames, limit=count, on_skip=on_skip)
    from gatesearch.data.synthetic import make_clip

    scfg = data.synthetic_config(frames)
    items = [make_clip(scfg, i, split) for i in range(count)]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def num_classes(data) -> int:
    if data.kind == "video_folder":
        from gatesearch.data.folder import scan_folder

        return len(scan_folder(data.folder_config(), probe=False).classes)
    return data.synthetic_config(2).num_classes


def frame_shape(data) -> tuple[int, int, int]:
    cfg = data.folder_config() if data.kind == "video_folder" else data.synthetic_config(2)
    return (3, cfg.height, cfg.width)


def check_data(data, *, tasks, echo: Callable[[str], None]) -> None:
    """Driver-side check before any trial: report unreadable videos by name, refuse what cannot work."""
    if data.kind != "video_folder":
        return
    from gatesearch.data.folder import DatasetError, scan_folder

    index = scan_folder(data.folder_config(), probe=True)
    for path, reason in index.skipped:
        echo(f"skipping unreadable video {path}: {reason}")
    if not index.val:
        raise DatasetError(f"{data.folder['root']}: no held-out videos (add videos or lower val_ratio)")
    if "heatmap" in tasks and any(item.annotations is None for item in index.train + index.val):
        raise DatasetError(f"{data.folder['root']}: task 'heatmap' needs a <video>.json with per-frame centers "
                           "next to every video")
    echo(f"data: {len(index.train)} training and {len(index.val)} held-out videos in {len(index.classes)} classes")
