"""Online temporal shift: mix time into a 2D network at zero MACs.

Temporal Shift Module (Lin, Gan and Han, "TSM: Temporal Shift Module for
Efficient Video Understanding", ICCV 2019). A 2D network sees one frame at a
time; moving a fraction of the channels one step along time lets the next
convolution combine the current frame with the previous one for free. The
paper's *online* variant (Section 3.3) shifts only from the past, so a frame's
features never wait for future frames: that is what a stream needs, and what
the gated layers here assume (one call = one frame).

The same module runs two ways and must give the same numbers:

* batched: a clip's frames arrive flattened as (B*T, C, H, W); the module must
  know T to find each frame's predecessor. ``clip_length(model, T)`` tells every
  clip-aware layer (anything with a ``frames_per_clip`` attribute) for the
  duration of a batched forward. Outside it, ``frames_per_clip`` is None: a
  single frame is a one-frame clip (shifted channels zero, as at the first frame
  of a stream; this is what MAC counting traces), and a batch of several frames
  is refused rather than guessed.
* streaming (``gatesearch.stateful``): the module keeps the shifted channels of
  the previous frame; a reset makes the next frame a first frame (zeros).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class TemporalShift(nn.Module):
    """Replace the first ``channels // fold_div`` channels by the previous frame's.

    The first frame of a clip (and the first after a reset) gets zeros there,
    as zero padding in time. No parameters, no MACs; a stateful layer while
    streaming.
    """

    def __init__(self, channels: int, *, fold_div: int = 8) -> None:
        super().__init__()
        self.fold = max(1, channels // fold_div)  # channels taken from the previous frame
        self.frames_per_clip: int | None = None  # set by clip_length() around a batched forward
        self.streaming = False
        self.reset_state()

    def reset_state(self) -> None:
        self.prev: torch.Tensor | None = None  # (N, fold, H, W): the previous frame's shifted channels

    def extra_repr(self) -> str:
        return f"fold={self.fold}, online=True"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W)
        f = self.fold
        if self.streaming:
            head = x[:, :f]  # (N, f, H, W)
            past = self.prev if self.prev is not None and self.prev.shape == head.shape else torch.zeros_like(head)
            # a copy: the input may be a gated layer's state, which changes in place at the next frame
            self.prev = head.clone()
            return torch.cat([past, x[:, f:]], dim=1)
        t = self.frames_per_clip
        if t is None:
            if x.shape[0] > 1:  # frames of one clip or independent frames? guessing would train the wrong net
                raise ValueError(f"temporal shift: a batch of {x.shape[0]} frames but no clip length; "
                                 "run clips through VideoModel.forward or within clip_length(model, T)")
            t = 1
        if x.shape[0] % t:
            raise ValueError(f"temporal shift: batch of {x.shape[0]} frames is not a whole number of {t}-frame clips")
        head = x[:, :f].unflatten(0, (-1, t))  # (B, T, f, H, W)
        past = torch.cat([torch.zeros_like(head[:, :1]), head[:, :-1]], dim=1).flatten(0, 1)  # (B*T, f, H, W)
        return torch.cat([past, x[:, f:]], dim=1)


def clip_aware_layers(model: nn.Module) -> list[nn.Module]:
    """Layers that need the clip length in a batched forward (a ``frames_per_clip`` attribute)."""
    return [m for m in model.modules() if hasattr(m, "frames_per_clip")]


@contextlib.contextmanager
def clip_length(model: nn.Module, frames: int) -> Iterator[None]:
    """Within this block, batches given to ``model`` are clips of ``frames`` frames, flattened.

    ``VideoModel.forward`` opens it around its batched pass; nesting restores
    the outer value on exit, so calling it again around ``model(clip)`` is harmless.
    """
    layers = clip_aware_layers(model)
    before = [m.frames_per_clip for m in layers]
    for m in layers:
        m.frames_per_clip = frames
    try:
        yield
    finally:
        for m, value in zip(layers, before):
            m.frames_per_clip = value


__all__ = ["TemporalShift", "clip_aware_layers", "clip_length"]
