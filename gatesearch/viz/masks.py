"""Gate masks over the frames: where each gated layer computed (in its gate's colour) and where it skipped
(dimmed), frame by frame — the picture Skip-Convolutions opens with (Fig. 2-3: gate masks over a video).

``MaskRecorder`` reads a ``Stream`` after each step: the masks of the chosen layers (``Stream.masks``); every
gated layer's density on each frame is in the stream's statistics (``FrameStats.layer_density``).
``write_masks`` turns the recording into an mp4 (one strip per frame: the frame, then one panel per layer), a
PNG contact sheet of a few frames with each panel's density, a plot of density per layer over time and the
numbers behind it as JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .colours import gate_colour

PANEL_MIN = 160  # panels are scaled up (nearest neighbour) to at least this many pixels high
SKIPPED_LEVEL = 0.25  # brightness of skipped positions (grey)
HIGHLIGHT = 0.45  # weight of the gate's colour on computed positions
FILES = {"video": "masks.mp4", "sheet": "masks.png", "density": "density.png", "numbers": "masks.json"}


@dataclass(frozen=True, kw_only=True)
class MaskRecording:
    gate: str
    frames: torch.Tensor  # (T, 3, H, W) in [0, 1], as the model saw them
    masks: dict[str, torch.Tensor]  # chosen layer -> (T, Ho, Wo) bool, True where computed
    density: dict[str, list[float]]  # every gated layer -> its density on each frame
    reference_frames: list[int]  # frames computed densely (stream start and resets)


def choose_layers(names: list[str], count: int = 4) -> list[str]:
    """``count`` layers spread over the depth (first and last included)."""
    if len(names) <= count:
        return list(names)
    return [names[round(i * (len(names) - 1) / (count - 1))] for i in range(count)]


class MaskRecorder:
    """Collects a stream's frames and the chosen layers' masks, one ``add`` after each ``step``; the densities
    come from the stream's own per-frame statistics."""

    def __init__(self, stream, layers: list[str] | None = None, *, count: int = 4) -> None:
        available = stream.masks_available()
        if layers:
            unknown = [name for name in layers if name not in available]
            if unknown:
                raise ValueError(f"no gate mask for layer {unknown[0]!r}; layers with masks: "
                                 f"{', '.join(available) or 'none'}")
        self.stream = stream
        self.layers = list(layers) if layers else choose_layers(available, count)
        self.frames: list[torch.Tensor] = []
        self.masks: dict[str, list[torch.Tensor]] = {name: [] for name in self.layers}

    def add(self, stream=None) -> None:
        """The frame just stepped, as the model saw it, and the chosen layers' masks on it (fit for
        ``Stream.run``'s ``after_step``)."""
        self.frames.append(self.stream.last_frame)
        masks = self.stream.masks()
        for name in self.layers:
            self.masks[name].append(masks[name].clone())

    def result(self) -> MaskRecording:
        stats = self.stream.stats
        if not self.frames or len(stats) != len(self.frames):
            raise ValueError("the stream had no frames" if not self.frames else "the stream was not flushed")
        return MaskRecording(gate=self.stream.artifact.trial.gate, frames=torch.stack(self.frames),
                             masks={name: torch.stack(m) for name, m in self.masks.items()},
                             density={name: [s.layer_density[name] for s in stats] for name in stats[0].layer_density},
                             reference_frames=[s.index for s in stats if s.reference])


def overlay(frame: torch.Tensor, mask: torch.Tensor, colour: str) -> torch.Tensor:
    """(3, H, W) frame, (Ho, Wo) bool mask -> (3, H, W): computed positions tinted, skipped ones dimmed grey."""
    h, w = frame.shape[-2:]
    m = F.interpolate(mask[None, None].float(), size=(h, w), mode="nearest")[0]  # (1, H, W)
    tint = torch.tensor([int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]).view(3, 1, 1)
    computed = (1 - HIGHLIGHT) * frame + HIGHLIGHT * tint
    skipped = SKIPPED_LEVEL * frame.mean(0, keepdim=True).expand_as(frame)
    return m * computed + (1 - m) * skipped


def strip(rec: MaskRecording, t: int) -> torch.Tensor:
    """Frame t and its masks side by side, scaled up to at least ``PANEL_MIN`` pixels high: (3, H', W')."""
    frame = rec.frames[t]
    colour = gate_colour(rec.gate)
    panels = [frame] + [overlay(frame, rec.masks[name][t], colour) for name in rec.masks]
    scale = max(1, math.ceil(PANEL_MIN / frame.shape[-2]))
    gap = torch.ones(3, frame.shape[-2] * scale, 2)
    parts = []
    for i, panel in enumerate(panels):
        if i:
            parts.append(gap)
        parts.append(panel.repeat_interleave(scale, 1).repeat_interleave(scale, 2))
    out = torch.cat(parts, 2).clamp(0, 1)
    return F.pad(out, (0, out.shape[2] % 2, 0, out.shape[1] % 2), value=1.0)  # yuv420p needs even sides


def save_masks(rec: MaskRecording, out: Path, *, fps: int = 8, title: str = "") -> dict:
    """``write_masks`` into a new folder ``out``, atomically: written in a temporary sibling, renamed when complete
    (an existing non-empty ``out`` is refused)."""
    import os
    import shutil
    import tempfile

    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise FileExistsError(f"{out}: already exists")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        written = write_masks(rec, tmp, fps=fps, title=title)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {kind: out / path.name for kind, path in written.items()}


def write_masks(rec: MaskRecording, out: Path, *, fps: int = 8, title: str = "", video: bool = True,
                sheet: bool = True) -> dict:
    """Write the mp4 (``video``), the contact sheet (``sheet``), the density plot and the JSON into the folder
    ``out`` (which must exist); returns {kind: path}."""
    from gatesearch.data import write_video

    from .plots import plot_density

    out = Path(out)
    paths = {}
    if video:
        paths["video"] = out / FILES["video"]
        write_video(paths["video"], torch.stack([strip(rec, t) for t in range(len(rec.frames))]), fps=fps)
    if sheet:
        paths["sheet"] = out / FILES["sheet"]
        contact_sheet(rec, paths["sheet"], title=title)
    paths["density"] = out / FILES["density"]
    plot_density(rec.density, paths["density"], reference_frames=rec.reference_frames,
                 title=title or "density per layer")
    paths["numbers"] = out / FILES["numbers"]
    paths["numbers"].write_text(json.dumps({
        "gate": rec.gate,
        "frames": len(rec.frames),
        "reference_frames": rec.reference_frames,
        "mask_layers": list(rec.masks),
        "density": rec.density,
        "mask_density": {name: m.float().mean((1, 2)).tolist() for name, m in rec.masks.items()},
    }, indent=1))
    return paths


def contact_sheet(rec: MaskRecording, path: Path, *, rows: int = 6, title: str = "") -> None:
    """A grid of a few frames (rows) by the input and each chosen layer (columns), each panel titled with the
    layer's density on that frame."""
    from .plots import pyplot

    plt = pyplot()
    t_all = len(rec.frames)
    picks = sorted({round(i * (t_all - 1) / max(1, rows - 1)) for i in range(min(rows, t_all))})
    names = list(rec.masks)
    cols = 1 + len(names)
    fig, axes = plt.subplots(len(picks), cols, figsize=(1.9 * cols, 1.9 * len(picks) + 0.4), dpi=110,
                             squeeze=False)
    colour = gate_colour(rec.gate)
    for r, t in enumerate(picks):
        frame = rec.frames[t]
        panels = [("frame" + (" (reference)" if t in rec.reference_frames else ""), frame)]
        panels += [(f"{name}\n{rec.masks[name][t].float().mean():.2f} computed",
                    overlay(frame, rec.masks[name][t], colour)) for name in names]
        for c, (label, img) in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(label, fontsize=6)
            if c == 0:
                ax.set_ylabel(f"frame {t}", fontsize=7)
    fig.suptitle(title or f"{rec.gate}: computed (coloured) and skipped (dimmed)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


__all__ = ["MaskRecorder", "MaskRecording", "choose_layers", "contact_sheet", "overlay", "save_masks", "strip",
           "write_masks"]
