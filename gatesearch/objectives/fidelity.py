"""How far a gated network's output is from its dense twin's on the same clip.

A gate with ε > 0 trades exactness for skipped work: Skip-Convolutions (Section
3.2.1) picks ε by the task metric it keeps. The distance to the dense output on
the user's own footage is what tells which ε to accept, so it is measured frame
by frame on what the deployed model emits after each frame:

- classification: the clip logits of the frames seen so far (the prediction a
  streaming classifier would show at that frame);
- heatmap: that frame's heatmap logits.

Per frame, the relative error is ‖gated − dense‖₂ / ‖dense‖₂; agreement is
whether the gated output says the same thing as the dense one: the same top-1
class, or a heatmap peak within the PCK radius of the dense peak (Section 4.2).
A clip model (3D convs) emits one output per clip, which counts as one frame.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .quality import heatmap_peaks, pck_correct, pck_radius


@dataclass(frozen=True, kw_only=True)
class Fidelity:
    rel_error_median: float  # per-frame relative error of the task output, median over frames
    rel_error_max: float  # ... and the worst frame
    agreement: float  # fraction of frames whose top-1 (classification) or PCK hit (heatmap) matches dense
    agreement_kind: str  # "top1" or "pck"

    def to_dict(self) -> dict[str, float | str]:
        return asdict(self)


def stream_outputs(model: nn.Module, clip: torch.Tensor, *, reset_every: int | None) -> torch.Tensor:
    """What ``model`` emits after each frame of ``clip`` (B, T, 3, H, W), streamed: (B, T, ...) (see above)."""
    if not hasattr(model, "stream_frames"):  # a clip model: one output per clip
        return model.stream(clip, reset_every=reset_every)[:, None]
    return task_outputs(model, model.stream_frames(clip, reset_every=reset_every))


def task_outputs(model: nn.Module, per_frame: torch.Tensor) -> torch.Tensor:
    """A per-frame model's outputs (B, T, ...) of ``frame`` -> what it emits after each frame (see above)."""
    if model.task != "classification":
        return per_frame
    # (B, T, D) pooled features -> the clip head over frames 0..t, for every t: (B, T, K)
    return torch.stack([model.clip_head(per_frame[:, : t + 1]) for t in range(per_frame.shape[1])], 1)


def fidelity(dense_out: torch.Tensor, gated_out: torch.Tensor, *, task: str, frame_hw: tuple[int, int]) -> Fidelity:
    """Compare ``stream_outputs`` of the dense and the gated model on the same clip."""
    d, g = dense_out.flatten(2).float(), gated_out.flatten(2).float()  # (B, T, N)
    err = (g - d).norm(dim=-1) / d.norm(dim=-1).clamp_min(torch.finfo(d.dtype).tiny)  # (B, T)
    if task == "heatmap":
        stride = frame_hw[0] // dense_out.shape[-2]
        peaks = heatmap_peaks(dense_out, stride=stride)
        agree = pck_correct(gated_out, peaks, stride=stride, radius_px=pck_radius(frame_hw))
        kind = "pck"
    else:
        agree = d.argmax(-1) == g.argmax(-1)
        kind = "top1"
    errors = err.flatten().tolist()
    return Fidelity(rel_error_median=statistics.median(errors), rel_error_max=max(errors),
                    agreement=float(agree.float().mean()), agreement_kind=kind)
