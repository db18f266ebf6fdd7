"""What a trial reports after each epoch for early stopping: the two objectives, measured cheaply.

A rung (``search.dominance``) ranks trials mid-training, so each epoch the trial streams a few held-out clips
through its model as it stands: their quality, and the effective MACs per frame its gates spent on them (fvcore's
dense count taken once, times the densities the gates measured). No latency: timing needs the device alone, and a
gated model's MACs order its cost well enough to drop the clearly dominated; the measured latency comes at the end.
"""

from __future__ import annotations

import torch

from gatesearch.spaces import EvalConfig, TrialConfig


class EpochProbe:
    """``probe()`` after an epoch: ``{"epoch_quality", "epoch_macs"}`` on the first ``count`` held-out clips."""

    def __init__(self, model: torch.nn.Module, cfg: TrialConfig, clips: dict[str, torch.Tensor],
                 evaluation: EvalConfig, *, count: int, lock=None) -> None:
        from gatesearch.objectives import MacCounter

        self.model, self.cfg, self.evaluation, self.lock = model, cfg, evaluation, lock
        self.clips = {k: v[:count] for k, v in clips.items()}
        self.counter = MacCounter(model, tuple(clips["clip"].shape[2:]))

    @torch.no_grad()  # not inference mode: the stream's state tensors must stay usable by the next training step
    def __call__(self) -> dict[str, float]:
        from .trial import stream_quality

        was_training = self.model.training
        self.counter.reset()
        try:
            quality = stream_quality(self.model, self.cfg, self.clips, self.evaluation, lock=self.lock).mean()
            macs = self.counter.report().effective
        finally:
            self.counter.reset()
            self.model.train(was_training)
        return {"epoch_quality": float(quality), "epoch_macs": macs}


__all__ = ["EpochProbe"]
