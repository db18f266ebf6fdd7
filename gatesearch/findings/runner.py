"""One fidelity run: the shared networks and clips (built once, on first use), the findings in order, the report.

``Context`` is what a finding sees. It trains each shared network once per run and fine-tunes each (gate, knobs,
clip length) once, so findings that need the same model measure the same model ("from the same runs"), and it
holds the device lock while anything is timed.
"""

from __future__ import annotations

import dataclasses
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .measure import Score, score, side_by_side
from .networks import NetworkSpec, build_dense, convert, train_dense
from .profiles import Profile
from .progress import Progress, clock
from .registry import Claim, Finding, FindingSpec, ordered


@dataclass(frozen=True, kw_only=True)
class FidelityOptions:
    profile: Profile
    out: Path  # report folder (created; must not hold files already)
    workdir: Path = Path("gatesearch_runs")  # its MLflow store gets the run
    tracking_uri: str | None = None  # an MLflow server instead of the work folder's store
    video: Path | None = None  # a real clip to time on (findings about real motion)
    only: tuple[str, ...] = ()  # run these findings (and what they require); empty: all
    command: str = "gatesearch fidelity"  # as typed, for the report header


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """A gated model a finding trained or tuned, with its dense twin: what finding 7 times."""

    family: str  # gate family as the report names it
    label: str  # its operating point, e.g. "ε 12.5, b 4"
    spec: NetworkSpec
    dense: nn.Module
    gated: nn.Module
    score: Score  # on the spec's held-out clips
    dense_score: Score


@dataclass
class Context:
    options: FidelityOptions
    progress: Progress
    lock: Any  # objectives.device.DeviceLock
    candidates: dict[str, Candidate] = field(default_factory=dict)  # family -> the model finding 7 times
    _cache: dict[Any, Any] = field(default_factory=dict)

    @property
    def profile(self) -> Profile:
        return self.options.profile

    @property
    def out(self) -> Path:
        return self.options.out

    def step(self, line: str) -> None:
        self.progress.step(line)

    def _once(self, key: Any, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    # -- data --------------------------------------------------------------------------------------
    def clips(self, spec: NetworkSpec, *, split: str, frames: int, count: int) -> dict[str, torch.Tensor]:
        from gatesearch.data.source import load_clips

        return self._once(("clips", spec.size, split, frames, count),
                          lambda: load_clips(spec.data(), split=split, frames=frames, count=count))

    def held_out(self, spec: NetworkSpec) -> dict[str, torch.Tensor]:
        return self.clips(spec, split="val", frames=spec.val_frames, count=spec.val_clips)

    def timed_clip(self, spec: NetworkSpec) -> torch.Tensor:
        """(1, T, 3, H, W): the ``--video`` clip resized to the network's frames, else a synthetic test clip."""
        def make() -> torch.Tensor:
            from gatesearch.data import SyntheticConfig, make_clip, read_frames

            frames = self.profile.timing.frames
            if self.options.video is not None:
                return read_frames(self.options.video, max_frames=frames, size=(spec.size, spec.size))[None]
            cfg = SyntheticConfig(height=spec.size, width=spec.size, frames=frames)
            return make_clip(cfg, 0, "test")["clip"][None]

        return self._once(("timed", spec.size), make)

    def clip_source(self) -> str:
        t = self.profile.timing.frames
        video = self.options.video
        return f"`{video.name}` (first {t} frames)" if video else f"a synthetic test clip ({t} frames)"

    # -- networks ----------------------------------------------------------------------------------
    def dense(self, spec: NetworkSpec) -> nn.Module:
        """The trained dense network of ``spec`` (trained once per run). Findings convert copies of it."""
        def make() -> nn.Module:
            start = time.perf_counter()
            model = build_dense(spec)
            model.load_state_dict(train_dense(spec))
            self.step(f"trained the dense {spec.backbone} once ({spec.epochs} epochs, "
                      f"{clock(time.perf_counter() - start)})")
            return model.eval()

        return self._once(("dense", spec), make)

    def baseline(self, spec: NetworkSpec) -> Score:
        """The dense network's score on the held-out clips (a reference frame every ``spec.clip_length``)."""
        return self._once(("baseline", spec), lambda: score(self.dense(spec), spec.task, self.held_out(spec),
                                                             reset_every=spec.clip_length))

    def gated(self, spec: NetworkSpec, gate: str, knobs: dict[str, Any]) -> nn.Module:
        """A fresh copy of the shared network converted by ``gate`` (no training: norm gates)."""
        return convert(self.dense(spec), gate, knobs, seed=spec.seed).eval()

    def finetuned(self, spec: NetworkSpec, gate: str, knobs: dict[str, Any], *, clip_length: int | None = None,
                  epochs: int | None = None) -> nn.Module:
        """The shared network converted by ``gate`` and fine-tuned from it (once per gate, knobs and clip length),
        as the papers fine-tune a trained network: Gumbel gates, D-STEP, VA-RED²."""
        from gatesearch.search.trial import train

        t = clip_length or spec.clip_length
        n = epochs or self.profile.finetune_epochs

        def make() -> nn.Module:
            start = time.perf_counter()
            model = convert(self.dense(spec), gate, knobs, seed=spec.seed)
            cfg = spec.trial(gate, knobs, clip_length=t, epochs=n, lr=self.profile.finetune_lr)
            train(model, cfg, self.clips(spec, split="train", frames=t, count=spec.train_clips))
            knob_text = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in knobs.items())
            self.step(f"fine-tuned {gate} ({knob_text}, T {t}, {n} epochs) in {clock(time.perf_counter() - start)}")
            return model.eval()

        return self._once(("finetuned", spec, gate, tuple(sorted(knobs.items())), t, n), make)

    # -- timing ------------------------------------------------------------------------------------
    def threads(self) -> int:
        return self.profile.timing.threads or len(os.sched_getaffinity(0))

    def time(self, dense: nn.Module, gated: nn.Module, clip: torch.Tensor, *, reset_every: int | None) -> dict:
        """Side-by-side wall-clock of ``gated`` against ``dense`` on ``clip``, holding the device lock."""
        return side_by_side(dense, gated, clip, reset_every=reset_every, repeats=self.profile.timing.repeats,
                            threads=self.threads(), lock=self.lock)


@dataclass(frozen=True, kw_only=True)
class Outcome:
    spec: FindingSpec
    finding: Finding
    seconds: float
    error: str | None = None  # the exception that stopped the finding (its claims then say so)


@dataclass(frozen=True, kw_only=True)
class Report:
    options: FidelityOptions
    outcomes: tuple[Outcome, ...]
    planned: int  # findings the run set out to measure (more than outcomes: the report of a run still going)
    started: str  # local date and time
    wall_s: float
    machine: dict[str, Any]
    mlflow_run_id: str | None = None


def failed(spec: FindingSpec, error: BaseException) -> Finding:
    """What a finding that raised reports: not reproduced, with the error as our number."""
    line = " ".join(f"{type(error).__name__}: {error}".split())[:300]
    claim = Claim(statement=spec.title, paper=spec.source, ours=f"failed: {line}", reproduced=False,
                  rule="the experiment did not finish")
    return Finding(claims=(claim,), numbers={}, setup="", details="")


def machine() -> dict[str, Any]:
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "python": platform.python_version()}


def check_options(options: FidelityOptions) -> None:
    """Refuse bad input before anything runs (one line each): a used report folder, an unreadable clip."""
    from gatesearch.data import read_frames

    out = options.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not an empty folder; give another --out")
    if options.video is not None:
        read_frames(options.video, max_frames=2, size=(32, 32))  # VideoDecodeError names the file


def run_fidelity(options: FidelityOptions, *, echo: Callable[[str], None] = print, live: bool = False) -> Report:
    """Run the findings of ``options.profile`` (or ``options.only``), write the report, log it to MLflow.
    ``live``: also redraw a status line in place (rich; on a terminal)."""
    from gatesearch.objectives.device import DeviceLock

    from . import report as report_mod

    check_options(options)
    specs = ordered(list(options.only) or None)
    estimates = {s.key: options.profile.estimate_s.get(s.key, 60.0) for s in specs}
    started = time.strftime("%Y-%m-%d %H:%M")
    echo(f"fidelity ({options.profile.name}): {len(specs)} findings, about {clock(sum(estimates.values()))} on "
         f"2 quiet cores; report in {options.out}")
    options.out.mkdir(parents=True, exist_ok=True)
    progress = Progress(estimates, echo, live=live)
    lock = DeviceLock()
    ctx = Context(options=options, progress=progress, lock=lock)
    outcomes = []
    try:
        for spec in specs:
            progress.begin(spec.key, f"{spec.number}. {spec.title} ({spec.source})")
            start, error = time.perf_counter(), None
            try:
                finding = spec.run(ctx)
            except Exception as e:  # the report says which finding failed and why; the others still run
                (options.out / f"{spec.key}.error.txt").write_text(traceback.format_exc())
                finding, error = failed(spec, e), f"{type(e).__name__}: {e}"
            outcomes.append(Outcome(spec=spec, finding=finding, seconds=time.perf_counter() - start, error=error))
            verdicts = ", ".join(c.verdict for c in finding.claims)
            progress.end(spec.key, f"{spec.key}: {verdicts}")
            # the report so far, so that a run stopped midway leaves what it measured
            report_mod.write(Report(options=options, outcomes=tuple(outcomes), planned=len(specs), started=started,
                                    wall_s=progress.elapsed(), machine=machine()))
    finally:
        lock.close()
        progress.stop()
    report = Report(options=options, outcomes=tuple(outcomes), planned=len(specs), started=started,
                    wall_s=progress.elapsed(), machine=machine())
    report_mod.write(report)
    run_id = report_mod.log_mlflow(report)
    return dataclasses.replace(report, mlflow_run_id=run_id)


__all__ = ["Candidate", "Context", "FidelityOptions", "Outcome", "Report", "check_options", "run_fidelity"]
