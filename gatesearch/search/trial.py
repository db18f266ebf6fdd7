"""One trial, without Ray: build, train, evaluate. The unit Ray Tune runs.

Flow: TrialConfig -> the dense network (the search's shared trained weights, ``search.dense``, or random
weights when training from scratch) converted by the trial's gate -> fine-tune if the gate has parameters of its
own -> calibrate (a gate that sets itself from data, e.g. per-layer thresholds) -> stream held-out clips through
the gated model (per-clip quality, per-layer density, effective MACs) -> measured latency over several clips ->
quality drop and speedup against the search's dense baseline.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gatesearch.data.source import load_clips, num_classes
from gatesearch.models import build_model
from gatesearch.objectives.device import NoLock
from gatesearch.objectives.latency import LatencyStats
from gatesearch.policies import build_policy
from gatesearch.spaces import DataConfig, EvalConfig, TrialConfig

from .checkpoint import TrainState

CALIBRATION_CLIPS = 8  # training clips a gate calibrates on after training (Policy.calibrate)


@dataclass
class TrialOutcome:
    metrics: dict[str, float]
    model: torch.nn.Module
    per_clip: torch.Tensor  # (N,) quality of each held-out clip: top-1 as 0/1, or the clip's mean PCK
    latency: LatencyStats
    layer_density: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Baseline:
    """The dense network of a search, evaluated once on the held-out clips every trial is scored on: what a
    trial's ``quality_drop`` (paired per clip) and ``speedup`` (same device, same search) compare against."""

    per_clip: tuple[float, ...]  # dense quality of each held-out clip
    latency_ms: float  # median per-frame latency, measured as every trial's is
    macs: float  # per frame

    @property
    def quality(self) -> float:
        return sum(self.per_clip) / len(self.per_clip)

    def summary(self) -> dict[str, float]:
        """What a search reports of its dense network (and its plot marks)."""
        return {"quality": self.quality, "quality_clips": len(self.per_clip), "latency_ms": self.latency_ms,
                "macs": self.macs}

    def compare(self, outcome: TrialOutcome, *, seed: int) -> dict[str, float]:
        """The trial's ``quality_drop`` with its interval and clip count, and its ``speedup``."""
        from gatesearch.objectives.quality import quality_drop

        drop = quality_drop(torch.tensor(self.per_clip), outcome.per_clip, seed=seed)
        return {**drop.as_metrics(), "dense_quality": self.quality, "dense_latency_ms": self.latency_ms,
                "speedup": self.latency_ms / outcome.latency.median_ms}


def param_groups(model, scales: dict, lr: float) -> list[dict]:
    """The model's parameters in optimiser groups by learning rate: ``lr``, then ``lr`` × each scale a policy asks
    for (``Policy.lr_scales``), in the model's parameter order within a group (a resumed state lines up)."""
    by_scale: dict[float, list] = {}
    for p in model.parameters():
        by_scale.setdefault(float(scales.get(p, 1.0)), []).append(p)
    return [{"params": ps, "lr": lr * s} for s, ps in sorted(by_scale.items(), key=lambda item: item[0] != 1.0)]


def train(model, cfg: TrialConfig, clips: dict[str, torch.Tensor], *, lock=None,
          on_epoch: Callable[[int, float], None] | None = None,
          save_state: Callable[[TrainState], None] | None = None, resume: TrainState | None = None) -> float:
    """Train in place with AdamW for ``cfg.epochs`` (0: no optimiser step, NaN loss); returns the last epoch's
    mean loss.

    Each step holds ``lock.shared()`` so that a latency measurement of another
    trial on this machine can claim the device between steps. ``save_state``
    gets the training state after each epoch but the last (before ``on_epoch``);
    ``resume`` continues from such a state as if training had never stopped.
    """
    from gatesearch.objectives import task_loss

    lock = lock or NoLock()
    if cfg.epochs == 0:  # a gate without parameters, on trained weights: its knobs act at inference only
        return float("nan")
    policy = build_policy(cfg.gate, **cfg.knobs)
    groups = param_groups(model, policy.lr_scales(model), cfg.lr)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(clips["label"]) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups],
                                                total_steps=cfg.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    mean, first = float("nan"), 0
    if resume is not None and not resume.fits(model, opt):
        warnings.warn(f"the checkpoint after epoch {resume.epoch} does not fit this trial's model or optimiser "
                      "(saved by another gatesearch version?): training from the first epoch", stacklevel=2)
        resume = None
    if resume is not None:
        resume.restore(model=model, optimizer=opt, scheduler=sched, generator=gen)
        mean, first = resume.loss, resume.epoch
    for epoch in range(first, cfg.epochs):
        policy.on_epoch(model, epoch, cfg.epochs)
        stream = policy.streams(epoch, cfg.epochs)
        order = torch.randperm(len(clips["label"]), generator=gen)
        total = 0.0
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            batch = {k: v[idx] for k, v in clips.items()}
            with lock.shared():
                out = model.stream(batch["clip"], reset_every=cfg.clip_length) if stream else model(batch["clip"])
                loss = task_loss(cfg.task, out, batch)
                extra = policy.loss(model, output=out, batch=batch)
                if extra is not None:
                    loss = loss + extra
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            total += loss.item() * len(idx)
        mean = total / len(order)
        if not math.isfinite(mean):
            raise FloatingPointError(f"training diverged at epoch {epoch + 1} (loss {mean}); lower the learning rate")
        if save_state and epoch + 1 < cfg.epochs:
            save_state(TrainState.capture(epoch=epoch + 1, loss=mean, model=model, optimizer=opt, scheduler=sched,
                                          generator=gen))
        if on_epoch:
            on_epoch(epoch, mean)
    return mean


def stream_quality(model, cfg: TrialConfig, clips: dict[str, torch.Tensor], evaluation: EvalConfig, *, batch: int = 8,
                   lock=None) -> torch.Tensor:
    """Stream held-out clips through the model frame by frame; (N,) quality of each clip (top-1 as 0/1, or the
    clip's mean PCK). The caller chooses the grad mode and resets the gates' statistics."""
    from gatesearch.objectives import pck_correct, pck_radius, top1_correct

    lock = lock or NoLock()
    reset_every = evaluation.reset_every(cfg.clip_length)
    model.eval()
    hits = []
    for start in range(0, len(clips["label"]), batch):
        part = {k: v[start : start + batch] for k, v in clips.items()}
        with lock.shared():
            out = model.stream(part["clip"], reset_every=reset_every)
        if cfg.task == "classification":
            hits.append(top1_correct(out, part["label"]).float())  # (B,)
        else:
            h, w = part["clip"].shape[-2:]
            stride = h // out.shape[-2]
            hits.append(pck_correct(out, part["centers"], stride=stride, radius_px=pck_radius((h, w))).float().mean(1))
    return torch.cat(hits)


@torch.inference_mode()
def evaluate(model, cfg: TrialConfig, clips: dict[str, torch.Tensor], evaluation: EvalConfig, *, batch: int = 8,
             lock=None, latency_threads: int | None = None, meter=None) -> TrialOutcome:
    """Stream held-out clips through the gated model: per-clip quality, MACs, densities, latency.

    Latency is measured over the first ``evaluation.latency_clips`` clips by ``meter`` (``search.target``): by
    default here, holding the device alone (``lock.exclusive``) with ``latency_threads`` torch threads, so the
    deployed model gets the whole device.
    """
    from gatesearch.objectives import mac_report, reset_stats

    from .target import LocalMeter

    lock = lock or NoLock()
    reset_every = evaluation.reset_every(cfg.clip_length)
    reset_stats(model)
    per_clip = stream_quality(model, cfg, clips, evaluation, batch=batch, lock=lock)  # (N,)
    frame_shape = tuple(clips["clip"].shape[2:])
    macs = mac_report(model, frame_shape)
    meter = meter or LocalMeter(lock, latency_threads)
    measured = meter.measure(model, clips["clip"][: evaluation.latency_clips], reset_every=reset_every,
                             warmup=evaluation.latency_warmup, repeats=evaluation.latency_repeats)
    reset_stats(model)
    metrics = {
        "quality": float(per_clip.mean()),
        **measured.metrics(),
        "macs": macs.effective,
        "dense_macs": macs.dense,
        "mac_reduction": macs.reduction,
        "mean_density": macs.mean_density,
    }
    return TrialOutcome(metrics=metrics, model=model, per_clip=per_clip, latency=measured.stats,
                        layer_density={n: lm.density for n, lm in macs.layers.items()})


def run_trial(cfg: TrialConfig, data: DataConfig, evaluation: EvalConfig, *, start: dict | None = None,
              baseline: Baseline | None = None, lock=None, latency_threads: int | None = None, meter=None,
              on_epoch: Callable[[int, dict[str, float]], None] | None = None, probe_clips: int = 0,
              save_state: Callable[[TrainState], None] | None = None, resume: TrainState | None = None) -> TrialOutcome:
    """Build (from the dense state dict ``start``, or from random weights), train ``cfg.epochs`` (none: no
    optimiser step at all; continuing from ``resume`` if given), evaluate, and compare with ``baseline``; metrics
    include wall-clock phases. After each epoch ``on_epoch`` gets the epoch (0-based) and its metrics: the training
    loss and, with ``probe_clips``, quality and MACs on that many held-out clips (``search.probe``: what early
    stopping ranks); ``save_state`` gets the training state (``search.checkpoint``) after each epoch but the last."""
    t0 = time.perf_counter()
    val_clips = load_clips(data, frames=evaluation.frames, count=data.val_clips, split="val")
    # a trial that does not train reads only the few training clips a gate calibrates on
    count = data.train_clips if cfg.epochs else min(CALIBRATION_CLIPS, data.train_clips)
    train_clips = load_clips(data, frames=cfg.clip_length, count=count, split="train")
    if cfg.task == "heatmap" and "heatmap" not in train_clips:
        raise ValueError("task 'heatmap' needs per-frame centre annotations, and this data has none")
    model = build_model(cfg, num_classes(data), state=start)
    t1 = time.perf_counter()
    epoch_hook = None
    if on_epoch is not None:
        from .probe import EpochProbe

        probe = EpochProbe(model, cfg, val_clips, evaluation, count=probe_clips, lock=lock) if probe_clips else dict
        epoch_hook = lambda epoch, loss: on_epoch(epoch, {"train_loss": loss, **probe()})
    loss = train(model, cfg, train_clips, lock=lock, on_epoch=epoch_hook, save_state=save_state, resume=resume)
    with (lock or NoLock()).shared():  # a gate that sets itself from data (per-layer ε)
        build_policy(cfg.gate, **cfg.knobs).calibrate(model, train_clips["clip"][:CALIBRATION_CLIPS])
    t2 = time.perf_counter()
    outcome = evaluate(model, cfg, val_clips, evaluation, lock=lock, latency_threads=latency_threads, meter=meter)
    t3 = time.perf_counter()
    outcome.metrics.update(data_s=t1 - t0, train_s=t2 - t1, eval_s=t3 - t2)
    if cfg.epochs:
        outcome.metrics["train_loss"] = loss
    if baseline is not None:
        outcome.metrics.update(baseline.compare(outcome, seed=cfg.seed))
    return outcome


__all__ = ["Baseline", "TrialOutcome", "evaluate", "run_trial", "stream_quality", "train"]
